"""Time fused generation of two subjects against one LoRA and two LoRAs everywhere, on the same prompt.

    python benchmarks/compose_speed.py [--subjects out/eval-toycompose/subjects] [--images 8]

Needs two LoRA results: by default two that `pimg eval toycompose` trained. Prints the best of 3 runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pimg.fusion import Composition, regional_subject
from pimg.inference.parts import LoraPart
from pimg.inference.pipeline import PersonalizedPipeline

PROMPT = "a sks diamond at the left and a sks circle at the right on a green background"


def best_time(pp, make_parts, images: int, steps: int, repeats: int = 3) -> float:
    for part in make_parts():
        pp.add(part)
    try:
        pp.generate(PROMPT, num_images=images, guidance_scale=1.0, num_inference_steps=2)  # warm-up
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            pp.generate(PROMPT, num_images=images, guidance_scale=1.0, num_inference_steps=steps)
            times.append(time.perf_counter() - began)
    finally:
        pp.clear()
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", default="out/eval-toycompose/subjects")
    parser.add_argument("--first", default="diagonal_diamond_obk")
    parser.add_argument("--second", default="diagonal_circle_wrp")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    a, b = (Path(args.subjects) / name / "result" for name in (args.first, args.second))
    pp = PersonalizedPipeline.from_base("tiny")
    pp.pipe.set_progress_bar_config(disable=True)
    single = best_time(pp, lambda: [LoraPart(a, name="a")], args.images, args.steps)
    fused = best_time(
        pp,
        lambda: [
            Composition([regional_subject(a, "left", name="a"), regional_subject(b, "right", name="b")])
        ],
        args.images,
        args.steps,
    )
    both = best_time(pp, lambda: [LoraPart(a, name="a"), LoraPart(b, name="b")], args.images, args.steps)
    print(
        f"{args.images} images, {args.steps} steps, CPU: one LoRA {single:.2f} s; fusion {fused:.2f} s "
        f"({fused / single:.2f}x); two LoRAs everywhere {both:.2f} s ({both / single:.2f}x)"
    )


if __name__ == "__main__":
    main()
