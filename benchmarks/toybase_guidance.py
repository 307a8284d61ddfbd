"""Two-object accuracy of a toy-world base across classifier-free guidance scales.

    python benchmarks/toybase_guidance.py --base runs/tiny-2h/decoder/model --guidance 5 7.5 10

Two-object prompts are where `tiny` follows prompts least (both small objects' colours on their named
sides), and guidance is free at sampling time, so this asks whether a scale other than the base's
recommended one reads better. Every scale draws the same held-out two-object prompts with the same
seeds (25 steps, as `pimg eval toybase`); a scale that wins here is then confirmed by the full
`pimg eval toybase --guidance G`, which also shows what it does to the one-object attributes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0, 5.0, 7.5, 10.0])
    parser.add_argument("--prompts", type=int, default=50, help="held-out two-object prompts")
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--split", default="heldout", choices=("heldout", "train"))
    args = parser.parse_args()

    from pimg.inference.pipeline import PersonalizedPipeline
    from pimg.toyworld.evaluate import ToyBaseEvalConfig, eval_prompts, score_generation

    pipe = PersonalizedPipeline.from_base(args.base)
    pipe.pipe.set_progress_bar_config(disable=True)
    defaults = ToyBaseEvalConfig()
    # The same prompts as the held-out (or seen) split of `pimg eval toybase` would draw, all two-object.
    offset = 1 if args.split == "heldout" else 0
    pairs = eval_prompts(args.split, args.prompts, defaults.seed + offset, two_object_prob=1.0)
    print(
        f"{args.base}: {args.prompts} {args.split} two-object prompts x {args.seeds} seeds, {args.steps} steps"
    )
    print(f"{'guidance':>8s} {'two-object':>11s} {'background':>11s} {'time':>7s}")
    for guidance in args.guidance:
        config = ToyBaseEvalConfig(
            base=args.base, seeds=args.seeds, num_inference_steps=args.steps, guidance_scale=guidance
        )
        started = time.perf_counter()
        results, _ = score_generation(pipe, pairs, config)
        print(
            f"{guidance:8.2f} {100 * np.mean(results['two_object']):10.1f}% "
            f"{100 * np.mean(results['background']):10.1f}% {time.perf_counter() - started:6.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
