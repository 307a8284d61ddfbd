"""Time generation with the ID adapter against plain generation of the base, on the same prompts.

    python benchmarks/id_adapter_speed.py [--adapter default] [--base tiny] [--images 8] [--steps 25]

Both run in one process, interleaved, at the same guidance; prints the best of `--repeats` runs and
the ratio (the issue's bound: at most 1.15x). On a GPU pass `--device cuda` and a real base with an
adapter made for it (`--adapter ip-adapter-faceid_sd15.bin`).
"""

from __future__ import annotations

import argparse
import time

import torch

from pimg.inference.id_adapter import IdAdapterPart, resolve_adapter
from pimg.inference.pipeline import PersonalizedPipeline
from pimg.toyworld.subjects import EVAL_SUBJECTS

PROMPT = "a star on a green background"


def timed(pp, images: int, steps: int, guidance: float) -> float:
    if pp.pipe.device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    pp.generate(PROMPT, num_images=images, guidance_scale=guidance, num_inference_steps=steps)
    if pp.pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny")
    parser.add_argument(
        "--adapter", default="default", help="adapter file or folder (default: the shipped one)"
    )
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    adapter = resolve_adapter(args.adapter, args.base)
    from pimg.inference.id_adapter import embedder_for

    embedder = embedder_for(adapter)
    photo = next(iter(EVAL_SUBJECTS.values())).photos(1, seed=0)[0]
    embedding = embedder.embed([photo]) if embedder.kind == "clip" else torch.randn(embedder.dim)
    plain = PersonalizedPipeline.from_base(args.base, device=args.device)
    adapted = PersonalizedPipeline.from_base(args.base, device=args.device)
    adapted.add(IdAdapterPart(adapter, embedding))
    for pp in (plain, adapted):
        pp.pipe.set_progress_bar_config(disable=True)
        timed(pp, args.images, 2, args.guidance)  # warm-up
    times = {"plain": [], "adapter": []}
    for _ in range(args.repeats):
        times["plain"].append(timed(plain, args.images, args.steps, args.guidance))
        times["adapter"].append(timed(adapted, args.images, args.steps, args.guidance))
    best = {k: min(v) for k, v in times.items()}
    print(
        f"{args.base}, {args.images} images, {args.steps} steps, guidance {args.guidance:g}, {args.device}: "
        f"plain {best['plain']:.2f} s; with the ID adapter {best['adapter']:.2f} s "
        f"({best['adapter'] / best['plain']:.3f}x)"
    )


if __name__ == "__main__":
    main()
