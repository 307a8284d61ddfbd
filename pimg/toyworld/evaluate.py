"""`pimg eval toybase`: how well a toy-world base model follows prompts, read by pixels.

Prompts are sampled from the training split ("seen" compositions) and from the held-out split
(compositions never in training), each with every attribute stated, so the checker can read every
attribute back. Also reports VAE reconstruction PSNR and CLIP caption retrieval on held-out pairs.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pimg.imaging import grid, to_model_range, to_uint8
from pimg.inference.guidance import choose_guidance
from pimg.toyworld.captions import SceneStream, caption
from pimg.toyworld.checker import check_prompt
from pimg.toyworld.scene import sample_scene

KEYS = ("background", "colour", "position", "size", "shape", "two_object")


@dataclass
class ToyBaseEvalConfig:
    """Settings of `pimg eval toybase`.

    Attributes:
        base: model to evaluate (built-in name or folder holding a `clip/` subfolder too).
        num_prompts: prompts per split (seen, held-out).
        seeds: images per prompt.
        two_object_prob: share of two-object prompts.
        guidance_scale: classifier-free guidance; None: the base's (`choose_guidance`; `tiny`'s for a
            toy-world model folder).
        batch_prompts: prompts per pipeline call (x seeds images per call).
    """

    base: str = "tiny"
    num_prompts: int = 120
    seeds: int = 8
    num_inference_steps: int = 25
    guidance_scale: float | None = None
    two_object_prob: float = 0.3
    batch_prompts: int = 4
    seed: int = 2024
    out_dir: str = "out/eval-toybase"


def eval_prompts(split: str, n: int, seed: int, two_object_prob: float) -> list[tuple[str, object]]:
    """n (caption, scene) pairs from `split`, every attribute stated in the caption."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        scene = sample_scene(rng, two_object_prob=two_object_prob, split=split)
        pairs.append((caption(scene), scene))
    return pairs


def score_generation(pipe, pairs, config: ToyBaseEvalConfig, bar=None) -> tuple[dict[str, list[bool]], list]:
    """With `pipe` (a `PersonalizedPipeline`), generate `config.seeds` images per prompt and check each one; returns per-key results and images."""
    results: dict[str, list[bool]] = defaultdict(list)
    samples = []
    for start in range(0, len(pairs), config.batch_prompts):
        chunk = pairs[start : start + config.batch_prompts]
        prompts = [p for p, _ in chunk for _ in range(config.seeds)]
        generated = pipe.generate(
            prompts,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            seeds=[config.seed + start * config.seeds + k for k in range(len(prompts))],
        )
        images = [np.asarray(g.image) for g in generated]
        for k, image in enumerate(images):
            scene = chunk[k // config.seeds][1]
            checks = check_prompt(image, scene)
            if len(scene.objects) == 2:
                # Two-object prompts count towards background and the two-object reading only, so the
                # per-object attributes stay a one-object measure.
                checks = {k: v for k, v in checks.items() if k in ("background", "two_object")}
            for key, ok in checks.items():
                results[key].append(bool(ok))
            if k % config.seeds == 0 and len(samples) < 32:
                samples.append(image)
        if bar is not None:
            bar.update(len(chunk))
    return results, samples


def vae_psnr(vae, n: int = 256, seed: int = 77) -> float:
    """Mean PSNR (dB, 8-bit) of VAE reconstructions of held-out renders."""
    images, _, _ = SceneStream(seed=seed, split="heldout").batch(n)
    with torch.no_grad():
        recon = vae(to_model_range(images).to(vae.device, vae.dtype)).sample
    diff = to_uint8(recon.float().cpu()).astype(np.float64) - images.astype(np.float64)
    mse = (diff**2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def clip_retrieval_top1(clip, tokenizer, n: int = 100, seed: int = 78) -> float:
    """Image->caption top-1 among n held-out pairs (chance = 1/n)."""
    images, captions, _ = SceneStream(seed=seed, split="heldout", drop_prob=0.0).batch(n)
    with torch.no_grad():
        tokens = tokenizer(captions, padding="longest", return_tensors="pt")
        out = clip(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            pixel_values=to_model_range(images).to(clip.dtype),
        )
    return float((out.logits_per_image.argmax(1) == torch.arange(n)).float().mean())


def evaluate_base(config: ToyBaseEvalConfig) -> dict:
    """Run the evaluation, print the table, write `report.json` and `samples.png`; returns the report."""
    from tqdm.auto import tqdm
    from transformers import CLIPModel

    from pimg.inference.pipeline import PersonalizedPipeline
    from pimg.models import describe_base

    started = time.time()
    if config.guidance_scale is None:
        config = replace(config, guidance_scale=choose_guidance(config.base)[0])
    pipe = PersonalizedPipeline.from_base(config.base)
    pipe.pipe.set_progress_bar_config(disable=True)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": asdict(config), "splits": {}}
    bar = tqdm(total=2 * config.num_prompts, desc="eval prompts")
    all_samples = []
    for split, offset in (("train", 0), ("heldout", 1)):
        pairs = eval_prompts(split, config.num_prompts, config.seed + offset, config.two_object_prob)
        results, samples = score_generation(pipe, pairs, config, bar)
        all_samples += samples[:16]
        report["splits"]["seen" if split == "train" else "held-out"] = {
            key: {"accuracy": float(np.mean(v)), "n": len(v)} for key, v in results.items()
        }
    bar.close()
    folder = Path(describe_base(config.base)[1])
    report["vae_psnr_db"] = vae_psnr(pipe.pipe.vae)
    if (folder / "clip").is_dir():
        clip = CLIPModel.from_pretrained(str(folder / "clip")).float().eval()
        report["clip_retrieval_top1_heldout"] = clip_retrieval_top1(clip, pipe.pipe.tokenizer)
    report["wall_time_s"] = time.time() - started
    grid(all_samples, columns=8).save(out / "samples.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"report: {out / 'report.json'}; sample grid: {out / 'samples.png'}")
    return report


def format_report(report: dict) -> str:
    """The accuracy table, seen vs held-out, as plain text."""
    lines = [
        "attribute    (colour/position/size/shape: one-object prompts; two_object: two-object prompts)",
        f"{'':12s} {'seen':>16s} {'held-out':>16s}",
    ]
    for key in KEYS:
        cells = []
        for split in ("seen", "held-out"):
            entry = report["splits"].get(split, {}).get(key)
            cells.append(f"{100 * entry['accuracy']:6.1f}% (n={entry['n']})" if entry else "-")
        lines.append(f"{key:12s} {cells[0]:>16s} {cells[1]:>16s}")
    lines.append(f"VAE PSNR (held-out renders): {report['vae_psnr_db']:.2f} dB")
    if "clip_retrieval_top1_heldout" in report:
        lines.append(
            f"CLIP caption retrieval top-1 (held-out, 100 candidates): "
            f"{100 * report['clip_retrieval_top1_heldout']:.1f}%"
        )
    settings = report["config"]
    lines.append(
        f"{settings['num_prompts']} prompts per split x {settings['seeds']} seeds, "
        f"{settings['num_inference_steps']} steps, guidance {settings['guidance_scale']:g}"
    )
    lines.append(f"wall time: {report['wall_time_s']:.0f} s")
    return "\n".join(lines)
