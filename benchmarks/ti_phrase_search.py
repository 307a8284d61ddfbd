"""A lead for Textual Inversion on `tiny`: pick the subject's words by what they draw, not by a loss.

For each of the first 5 toy evaluation subjects, with nothing known about the subject but its 4
photos and class noun:

1. every two-word phrase of the tokenizer's whole words (`a {w1} {w2} {class noun}`) is scored by toy
   CLIP's text-image similarity to the photos, and the `--candidates` best are kept;
2. each is drawn (`--pick-guidance` 5, `--pick-images` 2 per background) and the one whose images have the highest
   toy-CLIP image similarity to the photos (CLIP-I) is chosen;
3. the chosen phrase is drawn again on fresh seeds, 4 images per background, and scored by subject
   fidelity as `pimg eval toysubject` scores, at guidance 5 and 1.

Prints, per subject and as a mean: the chosen phrase's fidelity at both guidances and the best fidelity
among the candidates (what a perfect pick would reach). `docs/experiments/ti_tiny.md` records the
figures and what happened when TI was trained from the chosen phrase.

    python benchmarks/ti_phrase_search.py [--base tiny] [--candidates 12]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch.nn.functional as F

from pimg.inference.pipeline import PersonalizedPipeline
from pimg.metrics.clip import ToyClipEmbedder
from pimg.toyworld.subjects import EVAL_SUBJECTS
from pimg.trainers.toy_subject_eval import ToySubjectEvalConfig, score


def whole_words(tokenizer) -> list[str]:
    """Vocabulary entries that are whole alphabetic words of 3+ letters (CLIP marks a word's end `</w>`)."""
    return sorted(
        w[:-4] for w in tokenizer.get_vocab() if w.endswith("</w>") and w[:-4].isalpha() and len(w) >= 7
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--candidates", type=int, default=12, help="phrases drawn per subject")
    parser.add_argument(
        "--pick-guidance", type=float, default=5.0, help="guidance of the candidates' drawings"
    )
    parser.add_argument("--pick-images", type=int, default=2, help="images per background of each candidate")
    args = parser.parse_args()

    clip = ToyClipEmbedder(args.base)
    pipe = PersonalizedPipeline.from_base(args.base)
    pipe.pipe.set_progress_bar_config(disable=True)
    search = ToySubjectEvalConfig(method="ti", base=args.base, images_per_background=args.pick_images)
    fresh = ToySubjectEvalConfig(method="ti", base=args.base, images_per_background=4, seed=99)
    words = whole_words(pipe.pipe.tokenizer)
    phrases = [f"{a} {b}" for a, b in itertools.permutations(words, 2)]
    rows = []
    for subject in list(EVAL_SUBJECTS.values())[:5]:
        photos = F.normalize(clip.features(subject.photos(4, seed=0)), dim=-1)
        texts = F.normalize(clip.text_features([f"a {p} {subject.class_noun}" for p in phrases]), dim=-1)
        shortlist = [phrases[i] for i in (texts @ photos.T).mean(1).topk(args.candidates).indices.tolist()]
        drawn = []
        for phrase in shortlist:
            images, fidelity, _ = score(
                pipe, subject, f"a {phrase} {subject.class_noun}", search, guidance=args.pick_guidance
            )
            clip_i = float((F.normalize(clip.features(images), dim=-1) @ photos.T).mean())
            drawn.append((clip_i, phrase, fidelity))
        _, chosen, _ = max(drawn)
        words_drawn = f"a {chosen} {subject.class_noun}"
        _, at5, _ = score(pipe, subject, words_drawn, fresh, guidance=5)
        _, at1, background = score(pipe, subject, words_drawn, fresh, guidance=1)
        best = max(f for _, _, f in drawn)
        rows.append((at5, at1, background, best))
        print(
            f"{subject.name:22s} chosen {chosen!r:22s} fidelity: guidance 5 {at5:.3f}, guidance 1 {at1:.3f} "
            f"(backgrounds {100 * background:.0f}%); best candidate {best:.3f}",
            flush=True,
        )
    at5, at1, background, best = np.mean(rows, axis=0)
    print(
        f"MEAN chosen phrase fidelity: guidance 5 {at5:.3f}, guidance 1 {at1:.3f} (backgrounds "
        f"{100 * background:.1f}%); best candidate {best:.3f}"
    )


if __name__ == "__main__":
    main()
