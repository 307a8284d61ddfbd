"""`pimg eval toycompose`: two (or three) toy subjects in one image, each in its region, read by pixels.

For each pair of subjects: train (or reuse) each subject's LoRA with the `lora_tiny` preset, then
generate `a sks <shape 1> at the left and a sks <shape 2> at the right on a <bg> background` on the
backgrounds both subjects may appear on, and score each half of every image:

- own fidelity: `subject_fidelity` of the half against the subject placed there;
- other fidelity: the same half against the other subject (bleed shows as a high value here);
- background accuracy, and whether both halves hold an object (>= `MIN_OBJECT_PIXELS`).

Methods, on the same subjects, prompts and seeds:
- `fusion`: `pimg.fusion.Composition`, one UNet pass per step;
- `all_loras`: baseline (a), both LoRAs active everywhere (diffusers `set_adapters`);
- `separate_passes`: baseline (b), one pass per subject plus one for the base, noise predictions
  blended by the masks (`SeparatePasses`, here only: it costs k + 1 passes);
- `single_lora`: one subject's LoRA alone on the same prompt, timed as the cost reference.

Pairs: by default the evaluation subjects (`EVAL_SUBJECTS`) paired so that both share at least two
backgrounds, least alike first (no two of them share four: each excludes its own three colours);
`--subjects generated` draws pairs from the toy world's subject generator instead, to check that the
figures hold on subjects nobody chose.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pimg.errors import InputError
from pimg.fusion.composition import Composition
from pimg.fusion.regions import parse_region, resize_weights
from pimg.fusion.routing import Routing

#: A half with fewer object pixels than this holds no object (a small toy object covers 150-320).
MIN_OBJECT_PIXELS = 30
#: Pairs whose reference colours overlap more than this cannot show a margin of 0.3, so are not drawn.
MAX_REFERENCE_OVERLAP = 0.45
METHODS = ("fusion", "all_loras", "separate_passes", "single_lora")
SIDES = {2: ("left", "right"), 3: ("left", "center", "right")}
#: Three subjects sit in thirds; the prompt grammar has no third position, so the middle one's words omit it.
THIRDS = ("0,0,0.333,1", "0.333,0,0.667,1", "0.667,0,1,1")


@dataclass
class ToyComposeEvalConfig:
    """Settings of `pimg eval toycompose`.

    Attributes:
        base: the toy base model.
        pairs: how many subject pairs to compose.
        triples: how many three-subject compositions (left, center, right thirds) to add.
        subjects: "eval" (the fixed evaluation subjects) or "generated" (the subject generator).
        subject_seed: seed of the generated subjects.
        images_per_pair: images per pair, spread evenly over the backgrounds the pair shares.
        steps: LoRA training steps; None keeps the preset's.
        region_prompts: give each region its own prompt (`a sks <shape> at the <side> ...`);
            False: every region reads the global prompt.
        base_steps: `Composition.base_steps` (steps the base lays out alone).
        num_inference_steps, guidance_scale: generation settings (guidance None: the LoRAs' recorded).
        seed: seed of each background's first image.
        out_dir: report, samples and the subjects' LoRAs (reused by later runs); None:
            `out/eval-toycompose`.
    """

    base: str = "tiny"
    pairs: int = 6
    triples: int = 2
    subjects: str = "eval"
    subject_seed: int = 0
    images_per_pair: int = 16
    steps: int | None = None
    region_prompts: bool = True
    base_steps: int = 0
    num_inference_steps: int = 25
    guidance_scale: float | None = None
    seed: int = 1234
    out_dir: str | None = None

    def __post_init__(self):
        if self.subjects not in ("eval", "generated"):
            raise InputError(f"subjects must be 'eval' or 'generated', got {self.subjects!r}.")
        if self.pairs < 1 or self.triples < 0 or self.images_per_pair < 1:
            raise InputError("pairs and images_per_pair must be >= 1 and triples >= 0.")


# ------------------------------------------------------------------------------------ subjects


def shared_backgrounds(subjects) -> list[str]:
    """The backgrounds every one of `subjects` may appear on."""
    return [bg for bg in subjects[0].backgrounds if all(bg in s.backgrounds for s in subjects[1:])]


def reference_overlap(subjects) -> float:
    """The largest histogram intersection between two of the subjects' reference colours."""
    from pimg.toyworld.subjects import reference_histogram

    return max(
        float(np.minimum(reference_histogram(a), reference_histogram(b)).sum())
        for a, b in itertools.combinations(subjects, 2)
    )


def _usable(group, need_backgrounds: int) -> bool:
    return (
        len(shared_backgrounds(group)) >= need_backgrounds
        and reference_overlap(group) <= MAX_REFERENCE_OVERLAP
    )


def choose_groups(config: ToyComposeEvalConfig, size: int, count: int) -> list[tuple]:
    """`count` groups of `size` subjects that share backgrounds and differ in colour."""
    from pimg.toyworld.subjects import EVAL_SUBJECTS, subject_stream

    need = 2 if size == 2 else 1
    if config.subjects == "eval":
        groups = [g for g in itertools.combinations(EVAL_SUBJECTS.values(), size) if _usable(g, need)]
        groups.sort(key=reference_overlap)
        if len(groups) < count:
            raise InputError(
                f"only {len(groups)} groups of {size} evaluation subjects qualify; ask for fewer."
            )
        return groups[:count]
    groups, pool = [], subject_stream(config.subject_seed + 1000 * size)
    while len(groups) < count:
        group = tuple(itertools.islice(pool, size))
        if len(group) < size:
            raise InputError("the subject generator ran out of subjects; ask for fewer groups.")
        if _usable(group, need):
            groups.append(group)
    return groups


def lora_method() -> str:
    """The registered method whose results are LoRA files: what the composed subjects are trained with."""
    from pimg.methods import LORA_FILE, list_methods

    return next(m.name for m in list_methods() if m.result_files[0] == LORA_FILE)


def train_subject(subject, config: ToyComposeEvalConfig, out: Path, progress: bool) -> tuple[Path, float]:
    """The subject's LoRA (trained now, or reused from an earlier run with the same settings); (folder, seconds)."""
    from pimg.photos import save_photos
    from pimg.toyworld.checker import read_background
    from pimg.trainers.personalize import train
    from pimg.trainers.toy_subject_eval import ToySubjectEvalConfig, method_config

    run_dir = out / "subjects" / subject.name
    result = run_dir / "result"
    subject_config = ToySubjectEvalConfig(method=lora_method(), base=config.base, steps=config.steps)
    train_method, train_config = method_config(subject_config, subject, run_dir, {})
    record = result / "config.json"
    if (result / "pytorch_lora_weights.safetensors").is_file() and record.is_file():
        if json.loads(record.read_text()).get("loop", {}).get("steps") == train_config.loop.steps:
            return result, 0.0
    shutil.rmtree(result, ignore_errors=True)
    photos = subject.photos(subject_config.photos_per_subject, seed=subject_config.photo_seed)
    save_photos(
        run_dir / "photos",
        photos,
        [f"a {{token}} {{class_noun}} on a {read_background(p)} background" for p in photos],
    )
    began = time.time()
    train(train_method, train_config, progress=progress)
    shutil.rmtree(result / "checkpoints", ignore_errors=True)
    return result, time.time() - began


# ------------------------------------------------------------------------------------ baseline (b)


class SeparatePasses(Composition):
    """Baseline (b): one UNet pass per subject (its LoRA everywhere, its region's prompt) and one for
    the base (the global prompt), noise predictions blended by the region masks: k + 1 passes a step."""

    kind = "separate-passes"

    def wrap_noise_prediction(self, predict, call):
        routing = self.routing_for(call)
        passes = []
        for index in range(routing.count):
            alone = torch.zeros_like(routing.weights)
            alone[index] = 1
            passes.append(Routing(alone, routing.contexts))
        passes.append(Routing(torch.zeros_like(routing.weights), routing.contexts))

        def blended(sample, timestep, encoder_hidden_states=None, *args, **kwargs):
            predictions = []
            for routed in passes:
                self.routing = routed
                try:
                    predictions.append(predict(sample, timestep, encoder_hidden_states, *args, **kwargs))
                finally:
                    self.routing = None
            masks = resize_weights(routing.weights, *sample.shape[-2:]).to(sample)
            out = predictions[-1] * (1 - masks.sum(0)).clamp(min=0)
            for index in range(routing.count):
                out = out + predictions[index] * masks[index]
            return out

        return blended


# ------------------------------------------------------------------------------------ scoring


def region_columns(count: int, width: int) -> list[slice]:
    """The image columns of each side: halves for two subjects, thirds for three."""
    edges = [round(width * i / count) for i in range(count + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(count)]


def score_images(images: list[np.ndarray], subjects, backgrounds: list[str]) -> dict[str, float]:
    """Per-side own and other fidelity, background accuracy and presence of every object."""
    from pimg.toyworld.checker import object_mask, read_background, subject_fidelity

    own, other, background, present = [], [], [], []
    for image, bg in zip(images, backgrounds, strict=True):
        seen = read_background(image)
        background.append(seen == bg)
        mask = object_mask(image, seen)
        sides = region_columns(len(subjects), image.shape[1])
        present.append(all(int(mask[:, cols].sum()) >= MIN_OBJECT_PIXELS for cols in sides))
        for index, cols in enumerate(sides):
            crop = np.ascontiguousarray(image[:, cols])
            own.append(subject_fidelity(crop, subjects[index]))
            other.append(max(subject_fidelity(crop, s) for j, s in enumerate(subjects) if j != index))
    return {
        "own_fidelity": float(np.mean(own)),
        "other_fidelity": float(np.mean(other)),
        "margin": float(np.mean(own) - np.mean(other)),
        "background_accuracy": float(np.mean(background)),
        "both_present": float(np.mean(present)),
    }


# ------------------------------------------------------------------------------------ one group


def _words(subject, side: str, count: int) -> str:
    if count == 3 and side == "center":
        return f"a sks {subject.class_noun}"
    return f"a sks {subject.class_noun} at the {side}"


def global_prompt(subjects, bg: str) -> str:
    """The image's prompt: the two outer subjects in the toy grammar (it has no third position)."""
    sides = SIDES[len(subjects)]
    outer = [(s, side) for s, side in zip(subjects, sides, strict=True) if side != "center"]
    return " and ".join(_words(s, side, 2) for s, side in outer) + f" on a {bg} background"


def evaluate_group(pipe, subjects, results: list[Path], config: ToyComposeEvalConfig, guidance: float):
    """Every method on one group; returns (rows by method, {method: seconds}, one image per method)."""
    from pimg.fusion.composition import regional_subject
    from pimg.inference.parts import LoraPart

    count = len(subjects)
    regions = SIDES[count] if count == 2 else THIRDS
    backgrounds = shared_backgrounds(subjects)[:4]
    per_background = math.ceil(config.images_per_pair / len(backgrounds))
    wanted = [bg for bg in backgrounds for _ in range(per_background)][: config.images_per_pair]

    def composed(kind):
        members = [
            regional_subject(result, parse_region(region), name=f"s{i}")
            for i, (result, region) in enumerate(zip(results, regions, strict=True))
        ]
        return [kind(members, base_steps=config.base_steps)]

    makers = {
        "fusion": lambda: composed(Composition),
        "all_loras": lambda: [
            LoraPart(r / "pytorch_lora_weights.safetensors", name=f"s{i}") for i, r in enumerate(results)
        ],
        "separate_passes": lambda: composed(SeparatePasses),
        "single_lora": lambda: [LoraPart(results[0] / "pytorch_lora_weights.safetensors", name="s0")],
    }
    rows, seconds, samples = {}, {}, {}
    for method, make in makers.items():
        parts = make()
        for part in parts:
            pipe.add(part)
        images, elapsed = [], 0.0
        try:
            for bg in backgrounds:
                n = wanted.count(bg)
                if n == 0:
                    continue
                for part in parts:
                    if isinstance(part, Composition):
                        for index, member in enumerate(part.subjects):
                            side = SIDES[count][index]
                            words = _words(subjects[index], side, count)
                            member.prompt = f"{words} on a {bg} background" if config.region_prompts else None
                began = time.perf_counter()
                generated = pipe.generate(
                    global_prompt(subjects, bg),
                    num_images=n,
                    seed=config.seed,
                    num_inference_steps=config.num_inference_steps,
                    guidance_scale=guidance,
                )
                elapsed += time.perf_counter() - began
                images += [np.asarray(g.image) for g in generated]
        finally:
            pipe.clear()
        seconds[method] = elapsed
        samples[method] = images[::per_background][: len(backgrounds)]
        if method != "single_lora":
            rows[method] = score_images(images, subjects, wanted)
    return rows, seconds, samples


# ------------------------------------------------------------------------------------ the run


def evaluate_compositions(config: ToyComposeEvalConfig, progress: bool = True) -> dict:
    """Run the evaluation, print the table, write `report.json` and `samples.png`; returns the report.

    Example:
        >>> evaluate_compositions(ToyComposeEvalConfig(pairs=6))["mean"]["fusion"]["margin"]
    """
    from pimg.imaging import row_grid
    from pimg.inference.guidance import choose_guidance
    from pimg.inference.pipeline import PersonalizedPipeline

    out = Path(config.out_dir or "out/eval-toycompose")
    out.mkdir(parents=True, exist_ok=True)
    groups = choose_groups(config, 2, config.pairs) + (
        choose_groups(config, 3, config.triples) if config.triples else []
    )
    trained: dict[str, Path] = {}
    train_seconds = []
    for subject in {s.name: s for g in groups for s in g}.values():
        trained[subject.name], spent = train_subject(subject, config, out, progress)
        if spent:
            train_seconds.append(spent)
            print(f"trained {subject.name} in {spent:.1f} s", flush=True)

    pipe = PersonalizedPipeline.from_base(config.base)
    pipe.pipe.set_progress_bar_config(disable=True)
    report_groups, grid_rows = [], []
    for group in groups:
        results = [trained[s.name] for s in group]
        guidance, _ = choose_guidance(config.base, results, config.guidance_scale)
        rows, seconds, samples = evaluate_group(pipe, group, results, config, guidance)
        entry = {
            "subjects": [s.name for s in group],
            "backgrounds": shared_backgrounds(group)[:4],
            "guidance_scale": guidance,
            "methods": rows,
            "seconds": seconds,
        }
        report_groups.append(entry)
        print(_format_group(entry), flush=True)
        grid_rows.append(
            [im for method in ("fusion", "all_loras", "separate_passes") for im in samples[method]]
        )

    report = {"config": asdict(config), "groups": report_groups, "train_seconds": train_seconds}
    for size in (2, 3):
        chosen = [g for g in report_groups if len(g["subjects"]) == size]
        if chosen:
            report["mean" if size == 2 else "mean_three"] = _means(chosen)
    row_grid(grid_rows).save(out / "samples.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(
        f"report: {out / 'report.json'}; samples (fusion, all LoRAs, separate passes per row): {out / 'samples.png'}"
    )
    return report


def _means(groups: list[dict]) -> dict:
    means = {
        method: {
            key: float(np.mean([g["methods"][method][key] for g in groups]))
            for key in groups[0]["methods"][method]
        }
        for method in groups[0]["methods"]
    }
    total = {m: sum(g["seconds"][m] for g in groups) for m in METHODS}
    means["cost"] = {
        "fusion_vs_single": total["fusion"] / total["single_lora"],
        "separate_passes_vs_single": total["separate_passes"] / total["single_lora"],
        "all_loras_vs_single": total["all_loras"] / total["single_lora"],
    }
    return means


def _format_method(name: str, row: dict) -> str:
    return (
        f"  {name:16s} own {row['own_fidelity']:.3f}  other {row['other_fidelity']:.3f}  margin {row['margin']:+.3f}  "
        f"background {100 * row['background_accuracy']:5.1f}%  both present {100 * row['both_present']:5.1f}%"
    )


def _format_group(entry: dict) -> str:
    lines = [" + ".join(entry["subjects"]) + f"  (backgrounds {', '.join(entry['backgrounds'])})"]
    lines += [_format_method(m, row) for m, row in entry["methods"].items()]
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """The mean table of pairs (and of triples), and the cost ratios, as plain text."""
    lines = []
    for key, title in (("mean", "pairs"), ("mean_three", "three subjects")):
        if key not in report:
            continue
        mean = report[key]
        count = sum(1 for g in report["groups"] if len(g["subjects"]) == (2 if key == "mean" else 3))
        lines.append(f"MEAN over {count} {title}:")
        lines += [_format_method(m, row) for m, row in mean.items() if m != "cost"]
        cost = mean["cost"]
        lines.append(
            f"  cost vs one LoRA at the same steps: fusion {cost['fusion_vs_single']:.2f}x, separate passes "
            f"{cost['separate_passes_vs_single']:.2f}x, all LoRAs {cost['all_loras_vs_single']:.2f}x"
        )
    return "\n".join(lines)
