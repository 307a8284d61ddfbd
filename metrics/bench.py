"""`pimg bench generate`: the DreamBench image set for trained subjects, resumable.

For each subject with a result in `subject_weights/{subject}/` (what any registered method's training
writes, e.g. a LoRA `pytorch_lora_weights.safetensors` and/or a Textual Inversion
`learned_embeds.safetensors`; see `pimg.methods`), every prompt of its list (25) x
`images_per_prompt` (4) images, written as `{subject}/{prompt_index:02d}_{k}.png`, the layout
`pimg eval dreambench` reads. Image k of every prompt uses seed `seed + k`, so methods compared on
the same seeds start from the same noise. Existing images are skipped: rerun to resume.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pimg.errors import InputError, ModelLoadError
from pimg.metrics.dreambench import DEFAULT_TOKEN, BenchSubject, read_dreambench


@dataclass
class BenchGenerateConfig:
    """Settings of `pimg bench generate`.

    Attributes:
        dataset: DreamBench-layout folder (subjects, classes and prompts).
        subject_weights: folder of `{subject}/` result folders (a LoRA, an embedding, a whole model).
        out: output folder (`{subject}/{prompt_index:02d}_{k}.png` and bench.json).
        base: base model (built-in name, diffusers folder, single file or hub id).
        subjects: subjects to generate; empty = every subject that has weights.
        prompts: prompt indices to generate; empty = all (a subset makes a quick smoke run).
        images_per_prompt: images per prompt (DreamBooth: 4).
        token: identifier of subjects whose dataset line names none and that have no embedding
            (an embedding's own token is used otherwise; a token in the dataset file wins over both).
        lora_scale: scale of each subject's LoRA.
        num_inference_steps, guidance_scale, negative_prompt: as in diffusers; guidance None = the
            one each subject's training recorded, else the base's (`choose_guidance`).
        seed: seed of image 0 of each prompt; image k uses seed + k.
        device: "auto" (CUDA in half precision when present, else CPU fp32), "cpu", "cuda", ...
    """

    dataset: str = "../shared/dreambench"
    subject_weights: str = "out/subjects"
    out: str = "out/dreambench"
    base: str = "tiny"
    subjects: tuple[str, ...] = ()
    prompts: tuple[int, ...] = ()
    images_per_prompt: int = 4
    token: str = DEFAULT_TOKEN
    lora_scale: float = 1.0
    num_inference_steps: int = 25
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        self.subjects = tuple(self.subjects)
        self.prompts = tuple(int(p) for p in self.prompts)
        if self.images_per_prompt < 1:
            raise InputError(f"--images-per-prompt must be >= 1, got {self.images_per_prompt}.")
        if not Path(self.subject_weights).is_dir():
            raise InputError(
                f"--subject-weights {self.subject_weights} is not a folder of {{subject}}/ weight folders."
            )


def subject_result(folder: Path, token: str | None, lora_scale: float):
    """The subject's result in `folder` (`pimg.methods.load_result`), or None when it holds none."""
    from pimg.methods import detect_method, load_result

    try:
        detect_method(folder)
    except ModelLoadError:
        return None
    return load_result(folder, scale=lora_scale, name=f"subject_{folder.name}", token=token)


def _missing_runs(missing: list[int]) -> list[tuple[int, int]]:
    """[0, 1, 3] -> [(0, 2), (3, 1)]: (first k, count) runs, so each run is one batched call."""
    runs: list[tuple[int, int]] = []
    for k in missing:
        if runs and runs[-1][0] + runs[-1][1] == k:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((k, 1))
    return runs


def _generate_subject(
    pp, bench, subject: BenchSubject, token: str, config, guidance: float, out: Path, bar
) -> int:
    """Generate the subject's missing images; returns how many were written."""
    written = 0
    indices = config.prompts or range(len(bench.templates(subject)))
    for prompt_index in indices:
        paths = [out / subject.name / f"{prompt_index:02d}_{k}.png" for k in range(config.images_per_prompt)]
        missing = [k for k, path in enumerate(paths) if not path.is_file()]
        for first, count in _missing_runs(missing):
            images = pp.generate(
                bench.prompt(subject, prompt_index, token),
                negative_prompt=config.negative_prompt,
                num_images=count,
                num_inference_steps=config.num_inference_steps,
                guidance_scale=guidance,
                seed=config.seed + first,
            )
            for offset, generated in enumerate(images):
                path = paths[first + offset]
                path.parent.mkdir(parents=True, exist_ok=True)
                # Write then rename: an interrupted run never leaves a partial PNG that resuming would skip.
                partial = generated.save(
                    path.with_name(f".{path.stem}.partial.png")
                )  # hidden: never read as an image
                os.replace(partial, path)
                written += 1
        bar.update(len(paths))
    return written


def generate_bench(config: BenchGenerateConfig) -> dict:
    """Generate (or complete) the DreamBench image set; returns a summary also written to bench.json.

    Example:
        >>> generate_bench(BenchGenerateConfig(subject_weights="out/subjects", out="out/bench", prompts=(0, 1)))
    """
    from tqdm.auto import tqdm

    from pimg.inference.guidance import choose_guidance
    from pimg.inference.pipeline import PersonalizedPipeline
    from pimg.models import pick_device

    started = time.time()
    bench = read_dreambench(config.dataset)
    weights = Path(config.subject_weights)
    names = list(config.subjects) or [s for s in bench.subjects if (weights / s).is_dir()]
    unknown = [s for s in names if s not in bench.subjects]
    if unknown:
        raise InputError(
            f"--subjects: {', '.join(unknown)} not in {config.dataset}; valid: {', '.join(bench.subjects)}."
        )
    for index in config.prompts:
        if not 0 <= index < min(len(bench.object_prompts), len(bench.live_prompts)):
            raise InputError(f"--prompts: index {index} is outside 0-{len(bench.object_prompts) - 1}.")
    device, dtype, reason = pick_device(config.device)
    print(f"pimg: {reason}")

    def load(base: str):
        pipe = PersonalizedPipeline.from_base(base, device=device, dtype=dtype)
        pipe.pipe.set_progress_bar_config(disable=True)
        return pipe

    pp = load(config.base)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"config": asdict(config), "subjects": {}, "without_weights": []}
    per_subject = len(config.prompts or bench.object_prompts) * config.images_per_prompt
    bar = tqdm(total=len(names) * per_subject, desc="bench generate", unit="image")
    for name in names:
        subject = bench.subjects[name]
        folder = weights / name
        result = subject_result(folder, subject.token, config.lora_scale) if folder.is_dir() else None
        if result is None:
            summary["without_weights"].append(name)
            bar.update(per_subject)
            continue
        token = subject.token or result.learned_token or config.token
        guidance, _ = choose_guidance(config.base, [folder], config.guidance_scale)
        # A whole-model result (DreamBooth) is a base of its own; other results are parts on the base.
        pipe = load(result.base) if result.base is not None else pp
        for part in result.parts:
            pipe.add(part)
        try:
            written = _generate_subject(pipe, bench, subject, token, config, guidance, out, bar)
        finally:
            pipe.clear()
        summary["subjects"][name] = {
            "token": token,
            "method": result.method.name,
            "guidance_scale": guidance,
            "parts": [p.describe() for p in result.parts],
            "written": written,
        }
    bar.close()
    summary["written"] = sum(s["written"] for s in summary["subjects"].values())
    summary["wall_time_s"] = round(time.time() - started, 2)
    (out / "bench.json").write_text(json.dumps(summary, indent=2))
    print(
        f"pimg: wrote {summary['written']} images for {len(summary['subjects'])} subjects to {out}"
        + (f"; no weights for: {', '.join(summary['without_weights'])}" if summary["without_weights"] else "")
    )
    return summary
