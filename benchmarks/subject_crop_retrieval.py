"""How much of a toy subject's identity one CLIP image embedding carries, from whole photos and from crops.

    python benchmarks/subject_crop_retrieval.py [--subjects 200]

For N random training subjects, two photos each: embed both with the toy CLIP's vision tower and count
how often a subject's first photo is nearest (cosine) to its own second photo among all N second
photos. Printed for the whole photos and for `pimg.embedders.subject_crop` of them (what the toy ID
adapter embeds).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pimg.embedders import ClipImageEmbedder
from pimg.models import toy_clip_folder
from pimg.toyworld.subjects import random_subject


def top1(first: torch.Tensor, second: torch.Tensor) -> float:
    sims = torch.nn.functional.normalize(first, dim=-1) @ torch.nn.functional.normalize(second, dim=-1).T
    return float(sims.argmax(1).eq(torch.arange(len(first))).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    pairs = [random_subject(rng).photos(2, seed=i) for i in range(args.subjects)]
    for crop in (False, True):
        embedder = ClipImageEmbedder(toy_clip_folder(), crop=crop)
        first = embedder.embed([p[0] for p in pairs])
        second = embedder.embed([p[1] for p in pairs])
        what = "subject crops" if crop else "whole photos"
        print(f"{what:14s}: same-subject top-1 among {args.subjects}: {100 * top1(first, second):.1f}%")


if __name__ == "__main__":
    main()
