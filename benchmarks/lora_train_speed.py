"""Time LoRA training steps at Stable Diffusion 1.5's architecture (random weights), with pimg's SD1.5 preset.

    python benchmarks/lora_train_speed.py --device cuda --steps 50     # a GPU; bf16 autocast, 512 px

Runs of `pimg train lora --config lora_sd15` on four toy photos: `--warm-steps` steps (twice, the
faster counted), and `--warm-steps + --steps`; their difference over `--steps` is the time of one
optimizer step, apart from model loading and saving, which every run pays alike (samples and
auto-captions are off). Prints the wall times and the seconds per step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from random_bases import random_sd15_pipeline


def timed_training(base: Path, photos: Path, out: Path, steps: int, args) -> float:
    from pimg.trainers.personalize import load_train_config, train

    config = load_train_config(
        "lora",
        "lora_sd15",
        {
            "base": str(base),
            "photos": str(photos),
            "class_noun": "star",
            "out_dir": str(out),
            "loop.steps": steps,
            "loop.checkpoint_every": 0,
            "sample_images": 0,  # the end-of-run grid is not a training step
            "auto_caption": False,  # nor is captioning the photos once
            "resolution": args.resolution,
            **({"loop.mixed_precision": "no"} if args.device == "cpu" else {}),
        },
    )
    began = time.perf_counter()
    train("lora", config, progress=False)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (fp32, slow: for a smoke run)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warm-steps", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=512, help="training size (the preset's: 512)")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # the shared loop's accelerate then stays off any GPU
    from pimg.photos import save_photos
    from pimg.toyworld.subjects import EVAL_SUBJECTS

    scratch = Path(tempfile.mkdtemp(prefix="pimg-lora-speed-"))
    base = random_sd15_pipeline()
    save_photos(scratch / "photos", next(iter(EVAL_SUBJECTS.values())).photos(4, seed=0), None)
    photos = scratch / "photos"
    # short, long, short: the first run also pays for reading the model files from disk
    first = timed_training(base, photos, scratch / "short1", args.warm_steps, args)
    long = timed_training(base, photos, scratch / "long", args.warm_steps + args.steps, args)
    short = min(first, timed_training(base, photos, scratch / "short2", args.warm_steps, args))
    per_step = (long - short) / args.steps
    print(
        f"LoRA (lora_sd15 preset: rank 16, {args.resolution} px, batch 1) at SD1.5 scale, random weights, on {args.device}: "
        f"{args.warm_steps} steps {short:.1f} s, {args.warm_steps + args.steps} steps {long:.1f} s -> "
        f"{per_step:.3f} s per step (the preset's 500 steps: {500 * per_step:.0f} s of steps)"
    )


if __name__ == "__main__":
    main()
