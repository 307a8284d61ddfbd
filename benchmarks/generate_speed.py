"""Time pimg's generation against plain diffusers on the same model and settings.

    python benchmarks/generate_speed.py --base tiny --num-images 4 --steps 25 --repeats 5

Prints the median wall time of each and their ratio (pimg / diffusers; the goal is <= 1.05), and the
time of the whole `pimg generate` command (process start, imports and model load included).
Runs alternate between the two, so drift in machine load hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--prompt", default="a red star on a blue background")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-cli", action="store_true", help="do not time the whole CLI command")
    args = parser.parse_args()

    from pimg.inference.pipeline import PersonalizedPipeline
    from pimg.models import load_base, pick_device

    device, dtype, reason = pick_device(args.device)
    print(f"{reason}; torch threads: {torch.get_num_threads()}")
    plain = load_base(args.base, device=device, dtype=dtype)
    plain.set_progress_bar_config(disable=True)
    ours = PersonalizedPipeline(load_base(args.base, device=device, dtype=dtype), args.base)
    ours.pipe.set_progress_bar_config(disable=True)

    def run_plain():
        generators = [torch.Generator().manual_seed(k) for k in range(args.num_images)]
        plain(
            args.prompt,
            num_images_per_prompt=args.num_images,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generators,
        )

    def run_ours():
        ours.generate(
            args.prompt,
            num_images=args.num_images,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            seed=0,
        )

    run_plain(), run_ours()  # warm-up: allocator, kernels
    times = {"diffusers": [], "pimg": []}
    for _ in range(args.repeats):
        for name, fn in (("diffusers", run_plain), ("pimg", run_ours)):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.num_images} images, {args.steps} steps, guidance {args.guidance}, {args.repeats} repeats (median):"
    )
    print(f"  diffusers pipeline call: {med['diffusers']:.3f} s")
    print(f"  pimg generate():         {med['pimg']:.3f} s")
    print(f"  ratio pimg / diffusers:  {med['pimg'] / med['diffusers']:.3f}  (goal <= 1.05)")
    if not args.skip_cli:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pimg.frontends.cli",
                    "generate",
                    "--base",
                    args.base,
                    "--prompt",
                    args.prompt,
                    "--num-images",
                    str(args.num_images),
                    "--steps",
                    str(args.steps),
                    "--out",
                    out,
                    "--guidance",
                    str(args.guidance),
                    "--device",
                    args.device,
                ],
                check=True,
                capture_output=True,
            )
            print(
                f"  whole `pimg generate` command (start, imports, load, generate, save): "
                f"{time.perf_counter() - start:.2f} s"
            )


if __name__ == "__main__":
    main()
