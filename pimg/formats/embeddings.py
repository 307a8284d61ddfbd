"""Textual Inversion files: read the diffusers and A1111 forms, write the diffusers form, check a fit.

A Textual Inversion embedding is n learned vectors for one new token. diffusers stores
`{token: Tensor[n, dim]}` (`learned_embeds.safetensors` / `.bin`) and, for n > 1, adds the tokens
`token`, `token_1`, ..., `token_{n-1}` to the tokenizer; A1111 stores
`{"string_to_param": {"*": Tensor[n, dim]}, "name": token, ...}` in a `.pt`, and some safetensors
exports hold a single `emb_params` tensor named after the file. SDXL embeddings hold one part per
text encoder, `clip_l` and `clip_g` (`read_embedding_vectors` reads every form).

Example:
    >>> vectors = read_embedding_file("my-style.pt")  # {"my-style": Tensor[n, 768]}
    >>> check_embedding(pipe.tokenizer, pipe.text_encoder, "my-style", vectors["my-style"])
    >>> pipe.load_textual_inversion(save_embedding("out/learned_embeds.safetensors", "my-style", vectors["my-style"]))
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pimg.errors import InputError, ModelLoadError
from pimg.formats.safetensors_io import (
    check_finite,
    read_safetensors,
    read_safetensors_metadata,
    read_torch_weights,
    write_safetensors_atomically,
)

DIFFUSERS_EMBEDDING_FILENAME = "learned_embeds.safetensors"
#: The parts of an SDXL embedding, in the order of the pipeline's text encoders.
SDXL_ENCODER_KEYS = ("clip_l", "clip_g")

_ACCEPTED_FORMS = (
    "diffusers form ({token: tensor} in learned_embeds.safetensors or .bin), A1111 form (.pt or .safetensors "
    "with 'string_to_param': {'*': tensor} and an optional 'name'), or a safetensors file with one 'emb_params' "
    "tensor"
)
# Text encoder widths of the families pimg knows, to say which base an embedding was trained for.
_FAMILY_BY_WIDTH = {
    768: "SD 1.x (CLIP ViT-L, also SDXL's first text encoder)",
    1024: "SD 2.x (OpenCLIP ViT-H)",
    1280: "SDXL's second text encoder (OpenCLIP ViT-bigG)",
}


def read_embedding_file(path: str | os.PathLike, token: str | None = None) -> dict[str, torch.Tensor]:
    """Read a Textual Inversion file in the diffusers or the A1111 form.

    Args:
        path: a `.safetensors`, `.bin` or `.pt` file, or a folder holding `learned_embeds.safetensors`.
        token: the token to use instead of the one stored in the file (the A1111 `name`, the diffusers
            key, or for `emb_params` files the file name).

    Returns:
        `{token: Tensor[n_vectors, dim]}`; a single 1-D vector becomes [1, dim].

    Raises:
        ModelLoadError: the file is missing, damaged, in none of the accepted forms, or holds NaN/Inf
            (the first such tensor named).

    Example:
        >>> read_embedding_file("learned_embeds.safetensors", token="<my-cat>")["<my-cat>"].shape
        torch.Size([1, 768])
    """
    path, contents = _read_contents(path)
    stored_token, vectors = _token_and_vectors(contents, path)
    return {token or stored_token: _as_matrix(vectors, path)}


def read_embedding_vectors(
    path: str | os.PathLike, token: str | None = None
) -> tuple[str, list[torch.Tensor]]:
    """Read a Textual Inversion file of any accepted form, SDXL's included.

    Returns:
        (token, vectors per text encoder): one Tensor[n_vectors, dim] for SD 1.x/2.x forms, two
        (`clip_l`, then `clip_g`) for an SDXL file. An SDXL file's token is `token`, else the one pimg
        wrote in its metadata, else the file name (as A1111 names SDXL embeddings).

    Example:
        >>> token, (clip_l, clip_g) = read_embedding_vectors("out/ti/embeddings_sdxl.safetensors")
    """
    path, contents = _read_contents(path)
    if not set(SDXL_ENCODER_KEYS) <= set(contents):
        stored_token, vectors = _token_and_vectors(contents, path)
        return token or stored_token, [_as_matrix(vectors, path)]
    vectors = [_as_matrix(contents[key], path) for key in SDXL_ENCODER_KEYS]
    if vectors[0].shape[0] != vectors[1].shape[0]:
        raise ModelLoadError(
            f"SDXL embedding file '{path}' needs 'clip_l' and 'clip_g' with the same number of vectors; it holds "
            f"{vectors[0].shape[0]} and {vectors[1].shape[0]}."
        )
    stored = None
    if path.suffix == ".safetensors":
        stored = read_safetensors_metadata(path, what="embedding file").get("token")
    return token or stored or path.stem, vectors


def _read_contents(path: str | os.PathLike) -> tuple[Path, dict]:
    """The file (a folder means its `learned_embeds.safetensors`) and what it holds."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_EMBEDDING_FILENAME
    if path.suffix == ".safetensors":
        contents = read_safetensors(path, what="embedding file")
    else:
        # weights_only: A1111 files hold tensors, strings and numbers only; never run pickled code.
        contents = read_torch_weights(path, what="embedding file")
    check_finite(contents, f"embedding file '{path}'")
    return path, contents


def _as_matrix(vectors: object, path: Path) -> torch.Tensor:
    """A stored embedding as Tensor[n_vectors, dim] (a single 1-D vector becomes [1, dim])."""
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2):
        shape = list(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise ModelLoadError(
            f"embedding file '{path}' holds {shape} where a [n_vectors, dim] tensor belongs. "
            f"Accepted forms: {_ACCEPTED_FORMS}."
        )
    return (vectors.unsqueeze(0) if vectors.ndim == 1 else vectors).detach()


def _token_and_vectors(contents: dict, path: Path) -> tuple[str, object]:
    if "string_to_param" in contents:  # A1111
        params = contents["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise ModelLoadError(
                f"embedding file '{path}' has 'string_to_param' without its '*' entry. "
                f"Accepted forms: {_ACCEPTED_FORMS}."
            )
        name = contents.get("name")
        return (name if isinstance(name, str) and name else path.stem), params["*"]
    if "string_to_param.*" in contents:  # A1111 form flattened into safetensors
        return path.stem, contents["string_to_param.*"]
    if set(contents) == {"emb_params"}:  # A1111 safetensors export: the token is the file name
        return path.stem, contents["emb_params"]
    if len(contents) == 1:  # diffusers
        return next(iter(contents.items()))
    if set(SDXL_ENCODER_KEYS) <= set(contents):
        raise ModelLoadError(
            f"embedding file '{path}' is an SDXL embedding (one part per text encoder: 'clip_l', 'clip_g'); "
            "read it with read_embedding_vectors (as pimg's pipeline does), on an SDXL base."
        )
    keys = ", ".join(repr(k) for k in list(contents)[:5])
    raise ModelLoadError(
        f"embedding file '{path}' holds keys {keys}, which match no Textual Inversion form. "
        f"Accepted forms: {_ACCEPTED_FORMS}."
    )


def save_embedding(path: str | os.PathLike, token: str, vectors: torch.Tensor) -> Path:
    """Write an embedding in the diffusers form that `pipe.load_textual_inversion(path)` reads.

    Args:
        path: a `.safetensors` file, or a folder (the file is `learned_embeds.safetensors` inside it).
        token: the token the vectors stand for, e.g. "<my-cat>".
        vectors: Tensor[n_vectors, dim] (a 1-D vector is stored as [1, dim]).

    Returns:
        The path of the written file.

    Example:
        >>> save_embedding("out/run1", "<my-cat>", text_encoder.get_input_embeddings().weight[new_ids])
    """
    if not token or any(c.isspace() for c in token):
        raise InputError(f"Embedding token {token!r} must be one word without spaces, e.g. '<my-cat>'.")
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2:
        raise InputError(f"Embedding vectors must be [n_vectors, dim]; got shape {list(vectors.shape)}.")
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / DIFFUSERS_EMBEDDING_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomically(path, {token: vectors}, {"format": "pt"})
    return path


def multi_vector_tokens(token: str, n_vectors: int) -> list[str]:
    """The tokens diffusers adds for an n-vector embedding: `token`, `token_1`, ..., `token_{n-1}`.

    Example:
        >>> multi_vector_tokens("<cat>", 3)
        ['<cat>', '<cat>_1', '<cat>_2']
    """
    return [token] + [f"{token}_{i}" for i in range(1, n_vectors)]


def check_embedding(tokenizer, text_encoder: torch.nn.Module, token: str, vectors: torch.Tensor) -> None:
    """Check an embedding can be added to a tokenizer and text encoder before loading it.

    A token already in the vocabulary would be redefined (and as CLIP stores whole words as
    `word</w>`, a token "dog" would capture every "dog" in a prompt), so both spellings count as taken.

    Args:
        tokenizer: the pipeline's tokenizer.
        text_encoder: the pipeline's text encoder.
        token: the token the embedding will be loaded under.
        vectors: Tensor[n_vectors, dim].

    Raises:
        InputError: the token, or one of its multi-vector tokens, already exists.
        ModelLoadError: the vectors' width is not the text encoder's embedding width.

    Example:
        >>> check_embedding(pipe.tokenizer, pipe.text_encoder, "<my-cat>", vectors)
    """
    if vectors.ndim != 2:
        raise InputError(f"Embedding '{token}' must be [n_vectors, dim]; got shape {list(vectors.shape)}.")
    vocab = tokenizer.get_vocab()
    for name in multi_vector_tokens(token, vectors.shape[0]):
        if name in vocab or f"{name}</w>" in vocab:
            raise InputError(
                f"token '{name}' already exists in the tokenizer; pick a new one with --embedding PATH:NEWTOKEN "
                "(for example a bracketed name like '<my-subject>')."
            )
    width = text_encoder.get_input_embeddings().weight.shape[1]
    if vectors.shape[1] != width:
        trained_for = _FAMILY_BY_WIDTH.get(vectors.shape[1], "a base with that text encoder width")
        raise ModelLoadError(
            f"Embedding '{token}' has vectors of width {vectors.shape[1]}, but this base's text encoder takes "
            f"width {width}. It was trained for {trained_for}: pass --base with that family."
        )
