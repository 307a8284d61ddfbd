"""A CLIP tokenizer for the toy world, saved in the standard `vocab.json` + `merges.txt` form.

Every word of the caption grammar is one token, and so is each rare identifier (`sks`, `zwx`, ...)
that personalization methods bind a subject to; those never appear in base-model training, exactly
as rare tokens behave in real CLIP vocabularies. Single characters stay in the vocabulary so any
other word still tokenizes (into characters) instead of collapsing to an unknown token.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

#: Identifier tokens for subjects: in the vocabulary, never in a training caption.
RARE_TOKENS = ("sks", "zwx", "qpv", "vbk", "hjy", "olis", "xqz", "bnw", "pfk", "tqr")

#: Common prompt words outside the grammar, so prompts like "a photo of sks star" stay short.
EXTRA_WORDS = ("photo", "of", "picture", "image", "with", "in", "style", "drawing", "object", "person")

MODEL_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# Characters kept as tokens (plain and word-final), so no input word is ever unknown.
_CHARACTERS = string.ascii_lowercase + string.digits + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges, in order, that turn each of `words` into a single token.

    Plain BPE training on the word list itself: merge the most frequent adjacent pair, ties broken by
    the pair's spelling, until every word is whole. The tie-break makes the result the same on every
    run; the `tokenizers` trainer breaks ties by hash order, so each build of the same word list had its
    own token ids. BPE re-applies merges in the order they were learned, so every word encodes back to
    the single token it became.
    """
    pieces = [[*w[:-1], w[-1] + "</w>"] for w in sorted(set(words)) if w]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for word in pieces:
            for pair in zip(word[:-1], word[1:], strict=True):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        pieces = [_merge_pair(word, best) for word in pieces]


def _merge_pair(word: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def build_bpe_files(words: Iterable[str], out_dir: str | Path) -> Path:
    """Write `vocab.json` and `merges.txt` in which each of `words` is a single token (`learn_merges`).

    Args:
        words: the whole-word vocabulary (lower case, no spaces).
        out_dir: folder to write into.
    Returns:
        The folder.
    """
    merges = learn_merges(words)
    vocab: dict[str, int] = {}
    for token in list(_CHARACTERS) + [c + "</w>" for c in _CHARACTERS] + ["".join(pair) for pair in merges]:
        vocab.setdefault(token, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    lines = ["#version: 0.2"] + [" ".join(pair) for pair in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n")
    return out


def build_tokenizer(words: list[str], out_dir: str | Path):
    """Build and save a `CLIPTokenizer` whose vocabulary covers `words` as whole tokens.

    Example:
        >>> tok = build_tokenizer(["red", "star"], tmp / "tokenizer")
        >>> tok.tokenize("a red star")
        ['a</w>', 'red</w>', 'star</w>']
    """
    from transformers import CLIPTokenizer

    folder = build_bpe_files(words, out_dir)
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text().splitlines()[1:]]
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,  # as in Stable Diffusion 1.x: prompts are padded with the end token
        model_max_length=MODEL_MAX_LENGTH,
    )
    # tokenizer.json for transformers' fast path; vocab.json + merges.txt stay for other readers.
    tokenizer.save_pretrained(str(folder))
    whole = [w for w in words if len(tokenizer.tokenize(w)) != 1]
    if whole:
        raise RuntimeError(f"tokenizer split these vocabulary words into pieces: {whole[:10]}")
    return tokenizer
