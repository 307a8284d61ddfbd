"""`pimg eval toysubject`: train a method on toy-world subjects and read the results by pixels.

For each of the first N `EVAL_SUBJECTS` (or, with `subject_set="held-out"`, of N fresh subjects from
`held_out_stream`, which no cross-subject training has seen): write 4 of its photos (with sidecar captions naming their
background, so the background is not learned as part of the subject), train, load the result the way
a user would (`LoraPart`, `EmbeddingPart`, or the DreamBooth folder as a base), then generate
`images_per_background` images for every background the subject may appear on and score:

- subject fidelity: `subject_fidelity` of `a <token> <class> on a <bg> background` images;
- background accuracy: `read_background(image) == bg` on the same images;
- base fidelity: the untrained base with `a <class> on a <bg> background` (how far the class noun
  alone gets; a method must beat it);
- drift: the trained model with the same token-free prompt (the class noun taking on the subject);
- placement (with `placed`): every prompt also names a size and a position (`a large <token> <class>
  at the left on a <bg> background`), and the share of images whose object reads at both: whether
  the subject still follows the rest of the prompt (the toy analogue of DreamBench's prompt fidelity);
- training wall time (photo loading, class images, training and saving: everything `train` does).
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pimg.errors import InputError
from pimg.inference.guidance import choose_guidance
from pimg.methods import evaluation_variants, load_result, preset_path
from pimg.toyworld.palette import POSITIONS, SIZES
from pimg.trainers.subject_training import config_record


@dataclass
class ToySubjectEvalConfig:
    """Settings of `pimg eval toysubject`.

    Attributes:
        method: a registered method or one of its variants (`pimg.methods.evaluation_variants`).
        base: the toy base model (built-in `tiny` or a folder).
        subjects: how many subjects to evaluate.
        subject_set: "eval": the first `subjects` of `EVAL_SUBJECTS`, in their fixed order;
            "held-out": `subjects` fresh ones from `held_out_stream(subject_seed)`, to check that a
            figure is not one of the fixed eight's.
        subject_seed: seed of the held-out subjects.
        steps: training steps; None keeps the preset's.
        images_per_background: images generated per background and prompt.
        method_config: the method's YAML; None: its installed preset `<method>_tiny.yaml`.
        photos_per_subject: training photos per subject.
        photo_seed: seed of `Subject.photos`.
        caption_backgrounds: give each photo the caption `a {token} {class_noun} on a <bg> background`.
        placed: prompts also name a size and a position (the grammar's 2 x 5, in turn) and placement is
            scored; False: `a <token> <class> on a <bg> background`, as the method presets were tuned on.
        num_inference_steps, guidance_scale: generation settings. guidance None: the one the result
            recorded (`choose_guidance`), else the base's; the base and drift images use the same
            guidance, so the three fidelities compare.
        seed: seed of the first generated image of each prompt.
        scales: also score the result at each of these scales (LoRA scale, ID adapter scale); a sweep
            table is printed. Empty: only at 1.
        beside: a report.json of another method's run on the same subjects and seeds (e.g. LoRA's):
            its figures are printed next to these.
        model: for a method that personalizes without training (an ID adapter, a hypernetwork), the
            model it uses (adapter or hypernetwork file or folder); None: the one shipped for the base.
        finetune_steps: for such a method, continue from its result with this many training steps
            (the hypernetwork's fast fine-tune); 0: none.
        hm_cfg: sample the subject's LoRA with Hybrid-Model CFG at this subject scale
            (`pimg.inference.hybrid_guidance`; the base scale is the guidance); None: plain guidance.
        out_dir: report, sample grid and per-subject runs; None: `out/eval-toysubject-<method>`.
    """

    method: str
    base: str = "tiny"
    subjects: int = 5
    subject_set: str = "eval"
    subject_seed: int = 0
    steps: int | None = None
    images_per_background: int = 4
    method_config: str | None = None
    photos_per_subject: int = 4
    photo_seed: int = 0
    caption_backgrounds: bool = True
    placed: bool = False
    num_inference_steps: int = 25
    guidance_scale: float | None = None
    seed: int = 1234
    scales: tuple[float, ...] = ()
    model: str | None = None
    finetune_steps: int = 0
    hm_cfg: float | None = None
    beside: str | None = None
    out_dir: str | None = None

    def __post_init__(self):
        if self.method not in evaluation_variants():
            raise InputError(f"method {self.method!r} is not one of {', '.join(evaluation_variants())}.")
        if self.subjects < 1:
            raise InputError(f"subjects must be >= 1, got {self.subjects}.")
        if self.subject_set not in ("eval", "held-out"):
            raise InputError(f"subject_set must be 'eval' or 'held-out', got {self.subject_set!r}.")
        if self.images_per_background < 1:
            raise InputError(f"images_per_background must be >= 1, got {self.images_per_background}.")
        if self.finetune_steps < 0:
            raise InputError(f"finetune_steps must be >= 0, got {self.finetune_steps}.")


def method_config(config: ToySubjectEvalConfig, subject, run_dir: Path, overrides: dict):
    """The training config of one subject: preset <- method overrides <- eval settings <- user overrides."""
    from pimg.trainers.personalize import load_train_config

    method, method_overrides = evaluation_variants()[config.method]
    train_method = method.name
    preset = config.method_config or preset_path(f"{method.preset_stem}_tiny")
    values = {
        **method_overrides,
        "base": config.base,
        "photos": str(run_dir / "photos"),
        "class_noun": subject.class_noun,
        "out_dir": str(run_dir / "result"),
        "loop.steps": config.steps,
        **overrides,
    }
    if method.has_setting("class_images_dir"):
        # class images depend on the class only: share them across subjects
        values.setdefault("class_images_dir", str(run_dir.parent / "class_images" / subject.class_noun))
    return train_method, load_train_config(train_method, preset, values)


# Every size and position the caption grammar names, taken in turn by the placed prompts.
PLACEMENTS = tuple(itertools.product(SIZES, POSITIONS))


@dataclass(frozen=True)
class Scores:
    """One `score` call: the images and their means (placement None unless the prompts placed the object)."""

    images: list
    fidelity: float
    background_accuracy: float
    placement: float | None


def asked_placements(n: int) -> list[tuple[str, str]]:
    """The (size, position) placed prompt i asks for: `PLACEMENTS[i % 10]`, so each equally often."""
    return [PLACEMENTS[i % len(PLACEMENTS)] for i in range(n)]


def subject_prompts(words: str, backgrounds: list[str], placed: bool) -> list[str]:
    """One prompt per background entry; `words` is what follows the article (`sks circle`); placed
    prompts name `asked_placements` too."""
    if not placed:
        return [f"a {words} on a {bg} background" for bg in backgrounds]
    return [
        f"a {size} {words} at the {position} on a {bg} background"
        for (size, position), bg in zip(asked_placements(len(backgrounds)), backgrounds, strict=True)
    ]


def score(pipe, subject, words: str, config: ToySubjectEvalConfig, guidance: float) -> Scores:
    """Generate for every background the subject may appear on and read the images by pixels.

    One pipeline call for all backgrounds (batched is faster on any device); image k of each
    background uses seed `config.seed + k`, as `PersonalizedPipeline.generate` would, and every
    part of `pipe` applies (the pipeline's own call, not diffusers' directly).
    """
    from pimg.toyworld.checker import read_background, read_object, subject_fidelity

    n = config.images_per_background
    backgrounds = [bg for bg in subject.backgrounds for _ in range(n)]
    generated = pipe.generate(
        subject_prompts(words, backgrounds, config.placed),
        num_inference_steps=config.num_inference_steps,
        guidance_scale=guidance,
        seeds=[config.seed + k % n for k in range(len(backgrounds))],
    )
    images = [np.asarray(g.image) for g in generated]
    fidelity = [subject_fidelity(image, subject) for image in images]
    background = [read_background(image) == bg for image, bg in zip(images, backgrounds, strict=True)]
    placement = None
    if config.placed:
        readings = [read_object(image) for image in images]
        placed = [
            r is not None and (r.size, r.position) == asked
            for r, asked in zip(readings, asked_placements(len(images)), strict=True)
        ]
        placement = float(np.mean(placed))
    return Scores(images, float(np.mean(fidelity)), float(np.mean(background)), placement)


def evaluate_subject(
    subject, config: ToySubjectEvalConfig, base_pipe, out: Path, overrides: dict, progress: bool
):
    """Train on one subject and score it; returns (report row, photos, one generated image per background)."""
    from pimg.photos import save_photos
    from pimg.toyworld.checker import read_background
    from pimg.trainers.personalize import train

    run_dir = out / subject.name
    shutil.rmtree(run_dir / "result", ignore_errors=True)
    photos = subject.photos(config.photos_per_subject, seed=config.photo_seed)
    method = evaluation_variants()[config.method][0]
    personalize = method.personalize_function()
    class_words = subject.class_noun
    began = time.time()
    if personalize is not None:
        # No training (or a short fine-tune): the subject comes from its photos alone, without
        # captions (a user gives the photos, not a description of them).
        base = config.base
        result = personalize(
            photos,
            run_dir / "result",
            base=base,
            model=config.model,
            **_personalize_extras(personalize, config, subject, base_pipe),
        )
        recorded = _recorded(result)
        subject_words, record = class_words, {"model": config.model, "finetune_steps": config.finetune_steps}
        if recorded.get("token"):  # a predicted LoRA is bound to a word (the hypernetwork's `sks`)
            subject_words = f"{recorded['token']} {subject.class_noun}"
    else:
        train_method, train_config = method_config(config, subject, run_dir, overrides)
        captions = None
        if config.caption_backgrounds:
            captions = [f"a {{token}} {{class_noun}} on a {read_background(p)} background" for p in photos]
        save_photos(run_dir / "photos", photos, captions)
        result = train(train_method, train_config, progress=progress)
        recorded = _recorded(result)
        base, subject_words = train_config.base, f"{train_config.token} {subject.class_noun}"
        record = config_record(train_config)
    train_seconds = time.time() - began
    # The guidance a user of the result gets (the one it recorded, unless --guidance is given); the
    # base's images are drawn at the same guidance so the fidelities compare.
    guidance, _ = choose_guidance(base, [result], config.guidance_scale)
    base_scores = score(base_pipe, subject, class_words, config, guidance)
    trained = _load_trained(base, result, hm_cfg=config.hm_cfg)
    scores = score(trained, subject, subject_words, config, guidance)
    # Drift (the class noun taking on the subject) needs a token; without one it is the fidelity itself.
    drift = (
        scores.fidelity
        if subject_words == class_words
        else score(trained, subject, class_words, config, guidance).fidelity
    )
    by_scale = {}
    for scale in config.scales:
        scaled = trained if scale == 1.0 else _load_trained(base, result, scale=scale, hm_cfg=config.hm_cfg)
        scaled_scores = score(scaled, subject, subject_words, config, guidance)
        by_scale[f"{scale:g}"] = {
            "fidelity": scaled_scores.fidelity,
            "background_accuracy": scaled_scores.background_accuracy,
            **({"placement": scaled_scores.placement} if config.placed else {}),
        }
    shutil.rmtree(result / "checkpoints", ignore_errors=True)  # the result is saved; keep the disk free
    row = {
        "subject": subject.name,
        "class_noun": subject.class_noun,
        "prompt_words": f"a {subject_words}",
        "backgrounds": list(subject.backgrounds),
        "fidelity": scores.fidelity,
        "background_accuracy": scores.background_accuracy,
        "base_fidelity": base_scores.fidelity,
        "base_background_accuracy": base_scores.background_accuracy,
        "drift_fidelity": drift,
        **({"placement": scores.placement, "base_placement": base_scores.placement} if config.placed else {}),
        "train_seconds": train_seconds,
        **{k: v for k, v in recorded.items() if k in ("predict_seconds", "finetune_seconds")},
        "guidance_scale": guidance,
        "by_scale": by_scale,
        "train_config": record,
    }
    per_bg = config.images_per_background
    return row, list(photos), [scores.images[i * per_bg] for i in range(len(subject.backgrounds))]


def evaluate_subjects(
    config: ToySubjectEvalConfig, overrides: dict | None = None, progress: bool = True
) -> dict:
    """Run the evaluation, print the table, write `report.json` and `samples.png`; returns the report.

    Example:
        >>> evaluate_subjects(ToySubjectEvalConfig(method="lora", subjects=5))["mean"]["fidelity"]
    """
    from pimg.imaging import row_grid
    from pimg.inference.pipeline import PersonalizedPipeline
    from pimg.toyworld.subjects import EVAL_SUBJECTS, held_out_stream

    if config.subject_set == "eval":
        subjects = list(EVAL_SUBJECTS.values())
    else:
        subjects = list(itertools.islice(held_out_stream(config.subject_seed), config.subjects))
    if config.subjects > len(subjects):
        raise InputError(
            f"subjects={config.subjects}, but there are {len(subjects)} {config.subject_set} subjects."
        )
    out = Path(config.out_dir or f"out/eval-toysubject-{config.method}")
    out.mkdir(parents=True, exist_ok=True)
    base_pipe = PersonalizedPipeline.from_base(config.base)
    base_pipe.pipe.set_progress_bar_config(disable=True)
    rows, grid_rows = [], []
    for subject in subjects[: config.subjects]:
        row, photos, generated = evaluate_subject(subject, config, base_pipe, out, overrides or {}, progress)
        rows.append(row)
        grid_rows.append(photos + generated)
        print(_format_row(row), flush=True)
    keys = ("fidelity", "background_accuracy", "base_fidelity", "drift_fidelity", "train_seconds")
    optional = ("placement", "base_placement", "predict_seconds", "finetune_seconds")
    keys += tuple(k for k in optional if all(k in r for r in rows))
    report = {
        "config": asdict(config),
        "overrides": overrides or {},
        "subjects": rows,
        "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys},
    }
    row_grid(grid_rows).save(out / "samples.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    if config.beside:
        print(format_beside(report, json.loads(Path(config.beside).read_text())))
    print(
        f"report: {out / 'report.json'}; samples (photos, then one image per background): {out / 'samples.png'}"
    )
    return report


def _personalize_extras(personalize, config: ToySubjectEvalConfig, subject, base_pipe) -> dict:
    """The optional arguments a method's `personalize` takes (fine-tune steps, class noun, a loaded base)."""
    import inspect

    accepted = inspect.signature(personalize).parameters
    if config.finetune_steps and "finetune_steps" not in accepted:
        raise InputError(f"method {config.method!r} has no fine-tune; leave --finetune-steps out.")
    extras = {
        "finetune_steps": config.finetune_steps,
        "class_noun": subject.class_noun,
        "pipe": base_pipe.pipe,
    }
    return {k: v for k, v in extras.items() if k in accepted and (k != "finetune_steps" or v)}


def _recorded(result: Path) -> dict:
    try:
        return json.loads((Path(result) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _load_trained(base: str, result: Path, scale: float = 1.0, hm_cfg: float | None = None):
    """The trained result loaded the way a user loads it (`pimg.methods.load_result`): its parts on
    the base, or its folder as the base for a whole-model method; with `hm_cfg`, its LoRA sampled by
    Hybrid-Model CFG at that subject scale."""
    from pimg.inference.parts import LoraPart
    from pimg.inference.pipeline import PersonalizedPipeline

    loaded = load_result(result, scale=scale)
    pipe = PersonalizedPipeline.from_base(loaded.base or base)
    parts = loaded.parts
    if hm_cfg is not None:
        from pimg.inference.hybrid_guidance import HybridGuidance

        loras = [p for p in parts if isinstance(p, LoraPart)]
        if not loras:
            raise InputError(f"--hm-cfg needs a LoRA subject; {result} ({loaded.method.name}) has none.")
        parts = [p for p in parts if not isinstance(p, LoraPart)] + [
            HybridGuidance(loras, subject_scale=hm_cfg)
        ]
    for part in parts:
        pipe.add(part)
    pipe.pipe.set_progress_bar_config(disable=True)
    return pipe


def _format_row(row: dict) -> str:
    return (
        f"{row['subject']:28s} fidelity {row['fidelity']:.3f}  background {100 * row['background_accuracy']:5.1f}%  "
        f"base {row['base_fidelity']:.3f}  drift {row['drift_fidelity']:.3f}  train {row['train_seconds']:5.1f} s"
        + (
            f"  placed {100 * row['placement']:5.1f}% (base {100 * row['base_placement']:5.1f}%)"
            if "placement" in row
            else ""
        )
        + (f"  guidance {row['guidance_scale']:g}" if "guidance_scale" in row else "")
        + (f"  predict {row['predict_seconds']:.2f} s" if "predict_seconds" in row else "")
    )


def format_report(report: dict) -> str:
    """The per-subject rows and the mean, as plain text."""
    mean = report["mean"]
    lines = [f"method: {report['config']['method']}, base: {report['config']['base']}"]
    lines += [_format_row(r) for r in report["subjects"]]
    lines.append(_format_row({"subject": "MEAN", **mean}))
    scales = list(report["subjects"][0].get("by_scale", {})) if report["subjects"] else []
    if scales:
        lines.append("scale sweep (mean over subjects):")
        for scale in scales:
            rows = [r["by_scale"][scale] for r in report["subjects"]]
            fidelity = np.mean([r["fidelity"] for r in rows])
            background = np.mean([r["background_accuracy"] for r in rows])
            placed = (
                f"  placed {100 * np.mean([r['placement'] for r in rows]):5.1f}%"
                if "placement" in rows[0]
                else ""
            )
            lines.append(
                f"  scale {scale:>5s}  fidelity {fidelity:.3f}  background {100 * background:5.1f}%{placed}"
            )
    return "\n".join(lines)


def format_beside(report: dict, other: dict) -> str:
    """This run's per-subject fidelity and backgrounds next to another method's on the same subjects."""
    mine, theirs = report["config"], other["config"]
    for key in ("seed", "images_per_background", "num_inference_steps"):
        if mine[key] != theirs[key]:
            raise InputError(
                f"the --beside report used {key}={theirs[key]}, this run {mine[key]}: not comparable."
            )
    rows = {r["subject"]: r for r in other["subjects"]}
    a, b = mine["method"], theirs["method"]
    lines = [f"{'subject':28s} {a + ' fid':>14s} {b + ' fid':>14s} {a + ' bg':>12s} {b + ' bg':>12s}"]
    shared = [r for r in report["subjects"] if r["subject"] in rows]
    for r in shared:
        o = rows[r["subject"]]
        lines.append(
            f"{r['subject']:28s} {r['fidelity']:14.3f} {o['fidelity']:14.3f} "
            f"{100 * r['background_accuracy']:11.1f}% {100 * o['background_accuracy']:11.1f}%"
        )
    if shared:
        mean = lambda rs, k: float(np.mean([x[k] for x in rs]))  # noqa: E731
        others = [rows[r["subject"]] for r in shared]
        lines.append(
            f"{'MEAN (' + str(len(shared)) + ' subjects)':28s} {mean(shared, 'fidelity'):14.3f} "
            f"{mean(others, 'fidelity'):14.3f} {100 * mean(shared, 'background_accuracy'):11.1f}% "
            f"{100 * mean(others, 'background_accuracy'):11.1f}%"
        )
        lines.append(
            f"{'time per subject (s)':28s} {mean(shared, 'train_seconds'):14.1f} {mean(others, 'train_seconds'):14.1f}"
        )
        theirs_time = mean(others, "train_seconds")
        for key, what in (("train_seconds", "all it did"), ("predict_seconds", "the prediction alone")):
            if all(key in r for r in shared) and mean(shared, key) > 0:
                lines.append(f"{b} time / {a} time ({what}): {theirs_time / mean(shared, key):.1f}x")
    return "\n".join(lines)
