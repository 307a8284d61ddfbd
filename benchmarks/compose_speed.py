"""Time fused generation of two subjects against one LoRA and two LoRAs everywhere, on the same prompt.

    python benchmarks/compose_speed.py [--subjects out/eval-toycompose/subjects] [--images 8]
    python benchmarks/compose_speed.py --arch sd15 --device cuda --resolution 512 --images 4
    python benchmarks/compose_speed.py --arch sd15 --resolution 256 --images 1 --steps 4   # on CPU

On `tiny` it needs two LoRA results: by default two that `pimg eval toycompose` trained. `--arch sd15`
times Stable Diffusion 1.5's architecture with random weights and two random rank-8 LoRAs on the tiny
preset's layers (timings need the shapes, not trained weights). Prints the best of 3 runs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from random_bases import random_sd15_pipeline
from timing import DTYPES, best_of

from pimg.fusion import Composition, regional_subject
from pimg.inference.parts import LoraPart
from pimg.inference.pipeline import PersonalizedPipeline

PROMPT = "a sks diamond at the left and a sks circle at the right on a green background"


def best_time(pp, make_parts, images: int, steps: int, repeats: int = 3, **generation) -> float:
    for part in make_parts():
        pp.add(part)
    try:
        return best_of(
            repeats,
            lambda: pp.generate(PROMPT, num_images=images, num_inference_steps=steps, **generation),
            warm_up=lambda: pp.generate(PROMPT, num_images=images, num_inference_steps=2, **generation),
        )
    finally:
        pp.clear()


def random_sd15_subjects(folder: Path) -> tuple[Path, tuple[Path, Path]]:
    """The random SD1.5-architecture base and two random rank-8 LoRAs on the tiny preset's layers."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from pimg.formats.lora import lora_state_dict_from_peft, save_lora

    base = random_sd15_pipeline()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    loras = []
    for seed in (1, 2):
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets))
        with torch.no_grad():
            for name, parameter in unet.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 1e-3)  # non-zero, so no delta is skipped as empty
        loras.append(save_lora(folder / f"subject{seed}", lora_state_dict_from_peft(unet, "unet")))
    return base, (loras[0], loras[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the pipeline's dtype")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: the base's)")
    parser.add_argument("--subjects", default="out/eval-toycompose/subjects")
    parser.add_argument("--first", default="diagonal_diamond_obk")
    parser.add_argument("--second", default="diagonal_circle_wrp")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pimg-compose-speed-") as scratch:
        if args.arch == "sd15":
            base, (a, b) = random_sd15_subjects(Path(scratch))
            base = str(base)
        else:
            base = "tiny"
            a, b = (Path(args.subjects) / name / "result" for name in (args.first, args.second))
        pp = PersonalizedPipeline.from_base(base, device=args.device, dtype=DTYPES[args.dtype])
        pp.pipe.set_progress_bar_config(disable=True)
        size = {} if args.resolution is None else {"height": args.resolution, "width": args.resolution}
        generation = {"guidance_scale": 1.0 if args.arch == "tiny" else 7.5, **size}
        timing = dict(images=args.images, steps=args.steps, **generation)
        single = best_time(pp, lambda: [LoraPart(a, name="a")], **timing)
        fused = best_time(
            pp,
            lambda: [
                Composition([regional_subject(a, "left", name="a"), regional_subject(b, "right", name="b")])
            ],
            **timing,
        )
        both = best_time(pp, lambda: [LoraPart(a, name="a"), LoraPart(b, name="b")], **timing)
    print(
        f"{args.arch} ({'random weights' if args.arch == 'sd15' else 'trained LoRAs'}) on {args.device}, {args.dtype}, "
        f"{args.images} images, {args.steps} steps, {args.resolution or 'native'} px, guidance "
        f"{generation['guidance_scale']}: one LoRA {single:.2f} s; fusion {fused:.2f} s ({fused / single:.2f}x); "
        f"two LoRAs everywhere {both:.2f} s ({both / single:.2f}x)"
    )


if __name__ == "__main__":
    main()
