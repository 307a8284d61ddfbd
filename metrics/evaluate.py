"""`pimg eval dreambench`: the DreamBench protocol, every choice written into the report.

Protocol (DreamBooth, Ruiz et al., CVPR 2023, Sec. 4.1), with the choices papers differ on as options:
- per subject, `images_per_prompt` images (4) for each of its 25 prompts (object or live list);
- DINO and CLIP-I of an image = mean cosine to each real photo of its subject;
- CLIP-T = cosine of the image and its prompt, with the identifier token stripped (default, as the
  token means nothing to CLIP) or kept (`clip_t_token="keep"`);
- face identity for subjects of a face class (largest face; images without a face are counted, not scored);
- per-prompt, per-subject, per-group (object/live) and overall figures are means over scored images.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pimg.errors import InputError
from pimg.metrics.dreambench import DEFAULT_TOKEN, BenchSubject, DreamBench, index_generated, read_dreambench
from pimg.metrics.images import load_image
from pimg.metrics.registry import METRICS, load_embedder, load_metric

DEFAULT_METRICS = ("dino", "clip-i", "clip-t", "face-id")


@dataclass
class DreamBenchConfig:
    """Settings of one DreamBench evaluation (each is recorded in the report).

    Attributes:
        dataset: DreamBench-layout folder (photos + prompts_and_classes.txt).
        generated: folder of `{subject}/{prompt_index:02d}_{k}.png`, or a manifest.jsonl (or its folder).
        out: folder for report.json, per_image.csv, per_subject.csv, report.md and per_subject.png.
        metrics: names from `pimg.metrics.list_metrics()`; face-id applies to face-class subjects only.
        subjects: subjects to evaluate; empty = every subject of the dataset.
        images_per_prompt: images expected per prompt (DreamBooth: 4).
        token: identifier token of subjects whose dataset line names none.
        clip_t_token: "strip" the identifier from the CLIP-T prompt, or "keep" it.
        clip_backend, clip_model, clip_pretrained: CLIP backbone for CLIP-I and CLIP-T
            (default open_clip ViT-B-32 with OpenAI weights).
        dino_backend, dino_model: DINO backbone (default facebook/dino-vits16 via transformers).
        face_backend, face_model: face identity backend ("auto": insightface where installed, else dlib).
        batch_size: images per forward pass.
        device: torch device of the backbones; scores are computed in float32.
    """

    dataset: str = "../shared/dreambench"
    generated: str = "out/dreambench"
    out: str = "out/eval-dreambench"
    metrics: tuple[str, ...] = DEFAULT_METRICS
    subjects: tuple[str, ...] = ()
    images_per_prompt: int = 4
    token: str = DEFAULT_TOKEN
    clip_t_token: str = "strip"
    clip_backend: str = "open_clip"
    clip_model: str | None = None
    clip_pretrained: str | None = None
    dino_backend: str = "transformers"
    dino_model: str | None = None
    face_backend: str = "auto"
    face_model: str | None = None
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self):
        self.metrics = tuple(self.metrics)
        self.subjects = tuple(self.subjects)
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise InputError(f"--metrics {','.join(self.metrics)!r}: choose from {', '.join(METRICS)}.")
        if self.clip_t_token not in ("strip", "keep"):
            raise InputError(f"clip_t_token must be 'strip' or 'keep', got {self.clip_t_token!r}.")
        if self.images_per_prompt < 1:
            raise InputError(f"--images-per-prompt must be >= 1, got {self.images_per_prompt}.")


def _load_metrics(config: DreamBenchConfig, need_face: bool) -> dict:
    """Each requested metric, its backbone loaded once (CLIP-I and CLIP-T share one CLIP)."""
    options = {"device": config.device, "batch_size": config.batch_size}
    metrics, clip = {}, None
    for name in config.metrics:
        family = METRICS[name].family
        if family == "clip":
            if clip is None:
                clip = load_embedder(
                    name, config.clip_backend, config.clip_model, pretrained=config.clip_pretrained, **options
                )
            metrics[name] = load_metric(name, embedder=clip)
        elif family == "dino":
            metrics[name] = load_metric(name, config.dino_backend, config.dino_model, **options)
        elif family == "face":
            if need_face:
                metrics[name] = load_metric(name, config.face_backend, config.face_model, **options)
        else:
            metrics[name] = load_metric(name, **options)
    return metrics


def _score_subject(
    bench: DreamBench,
    subject: BenchSubject,
    slots: list,
    metrics: dict,
    config: DreamBenchConfig,
    problems: dict,
) -> list[dict]:
    """Per-image rows for one subject's generated images (`slots`: (prompt_index, k, path))."""
    images, kept = [], []
    for prompt_index, k, path in slots:
        try:
            images.append(load_image(path))
            kept.append((prompt_index, k, path))
        except InputError as exc:
            problems["unreadable"].append({"file": str(path), "reason": str(exc)})
    references = []
    for path in subject.references:
        try:
            references.append(load_image(path))
        except InputError as exc:
            problems["unreadable_references"].append({"file": str(path), "reason": str(exc)})
    if not images or not references:
        return []
    token = subject.token or config.token
    clip_t_prompts = [
        bench.prompt(subject, p, token if config.clip_t_token == "keep" else None) for p, _, _ in kept
    ]
    scores: dict[str, torch.Tensor] = {}
    for name, metric in metrics.items():
        if METRICS[name].family == "face" and not subject.face:
            continue
        try:
            targets = clip_t_prompts if METRICS[name].kind == "text" else references
            scores[name] = metric.score(images, targets)
        except InputError as exc:  # e.g. no face in any reference photo
            problems["unscored"].append({"subject": subject.name, "metric": name, "reason": str(exc)})
    rows = []
    for i, (prompt_index, k, path) in enumerate(kept):
        row = {
            "subject": subject.name,
            "class": subject.class_noun,
            "group": "live" if subject.live else "object",
            "prompt_index": prompt_index,
            "k": k,
            "file": str(path),
            "prompt": bench.prompt(subject, prompt_index, token),
            "clip_t_prompt": clip_t_prompts[i],
        }
        # None = not applicable (face-id on a non-face subject); NaN = applicable but nothing to score (no face).
        row.update({name: float(scores[name][i]) if name in scores else None for name in metrics})
        rows.append(row)
    return rows


def _means(rows: list[dict], names: list[str]) -> dict:
    out: dict = {"n_images": len(rows)}
    for name in names:
        applicable = [r[name] for r in rows if r.get(name) is not None]
        values = [v for v in applicable if not math.isnan(v)]
        out[name] = sum(values) / len(values) if values else None
        if name == "face-id":
            out["face-id_no_face_rate"] = (
                (len(applicable) - len(values)) / len(applicable) if applicable else None
            )
    return out


def summarize(rows: list[dict], names: list[str], bench: DreamBench) -> dict:
    """Overall, per-group, per-subject and per-prompt means of the per-image rows."""
    groups = {g: _means([r for r in rows if r["group"] == g], names) for g in ("object", "live")}
    per_subject = {}
    for subject in dict.fromkeys(r["subject"] for r in rows):
        subject_rows = [r for r in rows if r["subject"] == subject]
        per_subject[subject] = {"class": subject_rows[0]["class"], "group": subject_rows[0]["group"]}
        per_subject[subject].update(_means(subject_rows, names))
    per_prompt = []
    for group, templates in (("object", bench.object_prompts), ("live", bench.live_prompts)):
        for index, template in enumerate(templates):
            prompt_rows = [r for r in rows if r["group"] == group and r["prompt_index"] == index]
            if prompt_rows:
                entry = {
                    "group": group,
                    "prompt_index": index,
                    "template": template.format("{token}", "{class}"),
                }
                per_prompt.append(entry | _means(prompt_rows, names))
    return {
        "overall": _means(rows, names),
        "groups": groups,
        "per_subject": per_subject,
        "per_prompt": per_prompt,
    }


def evaluate_dreambench(config: DreamBenchConfig) -> dict:
    """Score generated images by the DreamBench protocol and write the report files.

    Returns:
        The report (also in `config.out`/report.json); missing, extra and unreadable images are
        listed under "problems", never raised.

    Example:
        >>> evaluate_dreambench(DreamBenchConfig(generated="out/bench", clip_backend="toy", metrics=("clip-i", "clip-t")))
    """
    from pimg.metrics.report import print_summary, write_reports

    started = time.time()
    bench = read_dreambench(config.dataset)
    subjects = list(config.subjects) or list(bench.subjects)
    unknown = [s for s in subjects if s not in bench.subjects]
    if unknown:
        raise InputError(
            f"--subjects: {', '.join(unknown)} not in {config.dataset}; valid: {', '.join(bench.subjects)}."
        )
    index = index_generated(config.generated, bench, subjects, config.images_per_prompt)
    with_images = {s for s, _, _ in index.found}
    metrics = _load_metrics(config, need_face=any(bench.subjects[s].face for s in with_images))
    problems: dict[str, list] = {"unreadable": [], "unreadable_references": [], "unscored": []}
    rows: list[dict] = []
    for name in subjects:
        slots = sorted((p, k, path) for (s, p, k), path in index.found.items() if s == name)
        rows += _score_subject(bench, bench.subjects[name], slots, metrics, config, problems)
    names = list(metrics)
    report = {
        "protocol": _protocol(config, metrics),
        "counts": {
            "subjects": len(subjects),
            "expected_images": len(index.found) + len(index.missing),
            "scored_images": len(rows),
            "missing": len(index.missing),
            "extra": len(index.extra),
            "unreadable": len(problems["unreadable"]),
        },
        **summarize(rows, names, bench),
        "problems": {
            "missing": [{"subject": s, "prompt_index": p, "k": k} for s, p, k in index.missing],
            "extra": index.extra,
            **problems,
        },
        "wall_time_s": round(time.time() - started, 2),
    }
    write_reports(report, rows, names, Path(config.out))
    print_summary(report, names, Path(config.out))
    return report


def _protocol(config: DreamBenchConfig, metrics: dict) -> dict:
    import pimg

    return {
        "config": asdict(config),
        "backbones": {name: metric.embedder.description for name, metric in metrics.items()},
        "not_computed": {
            name: "no evaluated subject with images has a face class"
            for name in config.metrics
            if name not in metrics
        },
        "clip_t_prompt": "identifier token stripped"
        if config.clip_t_token == "strip"
        else "identifier token kept",
        "image_score": "mean cosine to each reference photo of the subject (toy-fidelity: histogram intersection)",
        "aggregation": "means over scored images; face-id over images with a detected face",
        "pimg_version": pimg.__version__,
    }
