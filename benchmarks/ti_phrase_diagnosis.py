"""Why Textual Inversion stays low on `tiny`: does TI's own objective prefer the phrases the base draws well?

For each of the first 5 toy evaluation subjects and each phrase made of the subject's colours in the
caption grammar (one colour, or `c1 and c2 {striped,dotted,checkered}`; "" is the class noun alone),
prints the denoising loss of the subject's 4 photos under `a {phrase} {class noun} on a {bg} background`
(the objective TI minimises, with its preset's loss settings; every phrase on the same noise and
timesteps) beside the subject fidelity of images the base draws from that phrase, scored as
`pimg eval toysubject` scores (guidance 5, 2 seeds per background the subject may be on).

A diagnosis, not a method: the phrases use the subjects' known colours, which no user-facing code may.

    python benchmarks/ti_phrase_diagnosis.py [--base tiny] [--draws 16]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from pimg.inference.pipeline import PersonalizedPipeline
from pimg.toyworld.checker import read_background
from pimg.toyworld.subjects import EVAL_SUBJECTS
from pimg.trainers.diffusion_training import (
    TextConditioner,
    denoising_loss,
    encode_latents,
    training_noise_scheduler,
)
from pimg.trainers.personalize import builtin_preset, load_train_config
from pimg.trainers.toy_subject_eval import ToySubjectEvalConfig, score


def phrases_of(subject) -> list[str]:
    pairs = itertools.permutations(subject.colours, 2)
    patterned = [f"{a} and {b} {p}" for a, b in pairs for p in ("striped", "dotted", "checkered")]
    return ["", *subject.colours, *patterned]


def described(phrase: str, subject) -> str:
    return " ".join(f"a {phrase} {subject.class_noun}".split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--draws", type=int, default=16, help="noise draws per photo in each loss")
    args = parser.parse_args()

    personalized = PersonalizedPipeline.from_base(args.base)
    pipe = personalized.pipe
    pipe.set_progress_bar_config(disable=True)
    # TI's loss as its preset trains it on this base (offset noise, Min-SNR); scored as `pimg eval toysubject`.
    ti = load_train_config("ti", builtin_preset("ti", args.base))
    eval_config = ToySubjectEvalConfig(method="ti", base=args.base, images_per_background=2)
    noise_scheduler = training_noise_scheduler(pipe.scheduler.config)
    conditioner = TextConditioner.from_pipeline(pipe)
    rows, noun_lowest = [], 0
    for subject in list(EVAL_SUBJECTS.values())[:5]:
        photos = subject.photos(4, seed=0)
        photo_backgrounds = [read_background(p) for p in photos]
        latents = encode_latents(pipe.vae, np.stack(photos)).repeat(args.draws, 1, 1, 1)
        scored = []
        for phrase in phrases_of(subject):
            words = described(phrase, subject)
            with torch.no_grad():
                cond = conditioner.encode(
                    [f"{words} on a {bg} background" for bg in photo_backgrounds] * args.draws
                )
                generator = torch.Generator().manual_seed(7)  # one seed: every phrase on the same noise
                losses = denoising_loss(
                    pipe.unet,
                    noise_scheduler,
                    latents,
                    cond,
                    generator,
                    noise_offset=ti.noise_offset,
                    min_snr_gamma=ti.min_snr_gamma,
                )
            _, fidelity, _ = score(personalized, subject, words, eval_config, guidance=5)
            scored.append((phrase, float(losses.mean()), fidelity))
        by_loss = sorted(scored, key=lambda r: r[1])
        noun = next(r for r in scored if r[0] == "")
        loss_best_phrase = next(r for r in by_loss if r[0])
        drawn_best = max(scored, key=lambda r: r[2])
        print(
            f"{subject.name:22s} lowest loss: {by_loss[0][0] or '(class noun alone)'!s:24s} "
            f"fidelity: class noun {noun[2]:.3f}, lowest-loss phrase {loss_best_phrase[2]:.3f} "
            f"({loss_best_phrase[0]}), best drawn {drawn_best[2]:.3f} ({drawn_best[0]})",
            flush=True,
        )
        rows.append((noun[2], loss_best_phrase[2], drawn_best[2]))
        noun_lowest += by_loss[0][0] == ""
    noun, loss_best, drawn_best = np.mean(rows, axis=0)
    print(
        f"MEAN fidelity: class noun alone {noun:.3f}, lowest-loss phrase {loss_best:.3f}, best drawn phrase "
        f"{drawn_best:.3f}; the class noun alone had the lowest loss for {noun_lowest}/{len(rows)} subjects"
    )


if __name__ == "__main__":
    main()
