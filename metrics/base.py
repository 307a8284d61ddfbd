"""The one metric signature, `score(images, references_or_prompts) -> Tensor[N]`, and its math.

A metric pairs an embedder (a backbone with its own preprocessing, loaded once) with a rule:
`ImageSimilarity` scores each generated image by its mean similarity to the reference photos
(CLIP-I, DINO, face identity, toy fidelity); `TextSimilarity` by the cosine between each image and
its prompt (CLIP-T). Similarities are pure tensor functions, apart from the model wiring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from pimg.errors import InputError, ModelLoadError
from pimg.metrics.images import ImageLike, Preprocess, load_images


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of `a` [A, D] with every row of `b` [B, D] -> [A, B].

    A row of NaN (an image with nothing to embed, such as no face) gives a row or column of NaN.
    """
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of `a` [N, D] and `b` [N, D] -> [N]."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def mean_over_references(similarity: torch.Tensor) -> torch.Tensor:
    """[N, R] similarities -> [N]: the mean over references that could be embedded.

    Rows that are all NaN (the generated image had nothing to embed) stay NaN.
    """
    return similarity.nanmean(dim=1)


class ImageEmbedder(Protocol):
    """A backbone that turns images into features, and the similarity between feature sets."""

    #: What was loaded, for reports (backend, model id or path).
    description: dict

    def features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """[N, D] float32 on CPU; a NaN row where the image holds nothing to embed."""
        ...

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[A, D] x [B, D] -> [A, B]."""
        ...


class TextImageEmbedder(ImageEmbedder, Protocol):
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, D] float32 on CPU, in the image features' space."""
        ...


def embed_in_batches(
    images: Sequence[ImageLike],
    preprocess: Preprocess,
    forward: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int,
    device: str | torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Load, preprocess and embed `images` `batch_size` at a time (files are decoded per batch).

    Returns:
        float32 CPU tensor [N, D].
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = preprocess(load_images(images[start : start + batch_size]))
        with torch.inference_mode():
            chunks.append(forward(pixels.to(device, dtype)).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def _check_images(images, what: str) -> None:
    if isinstance(images, str | bytes) or not isinstance(images, Sequence):
        raise InputError(
            f"{what} must be a list of images (paths, PIL images or uint8 arrays), got {type(images).__name__}."
        )
    if len(images) == 0:
        raise InputError(f"{what} is empty; pass at least one image.")


class ImageSimilarity:
    """Per generated image, the mean similarity to the reference images (CLIP-I, DINO, face ID).

    Example:
        >>> dino = load_metric("dino", model="/models/dino-vits16")
        >>> dino.score(["gen/00_0.png", "gen/00_1.png"], ["ref/00.jpg", "ref/01.jpg"])  # Tensor[2]
    """

    def __init__(self, name: str, embedder: ImageEmbedder):
        self.name = name
        self.embedder = embedder

    def score(self, images: Sequence[ImageLike], references: Sequence[ImageLike]) -> torch.Tensor:
        """Mean over references of similarity(image, reference), for each image.

        Args:
            images: generated images.
            references: the subject's real photos (for toy fidelity also a toy-world `Subject`).
        Returns:
            float32 [len(images)]; NaN where an image had nothing to embed (face ID: no face).
        Raises:
            InputError: an empty list, an unreadable image, or no reference that could be embedded.
        """
        _check_images(images, "images")
        _check_images(references, "references")
        reference_features = self.embedder.features(references)
        if torch.isnan(reference_features).all(dim=1).all():
            raise InputError(
                f"{self.name}: none of the {len(references)} reference images could be embedded "
                "(for face identity: no face was found in any of them)."
            )
        similarity = self.embedder.similarity(self.embedder.features(images), reference_features)
        return mean_over_references(similarity)


class TextSimilarity:
    """Per generated image, the cosine between its embedding and its prompt's (CLIP-T).

    Example:
        >>> clip_t = load_metric("clip-t")
        >>> clip_t.score(["gen/00_0.png"], ["a dog in the jungle"])
    """

    def __init__(self, name: str, embedder: TextImageEmbedder):
        self.name = name
        self.embedder = embedder

    def score(self, images: Sequence[ImageLike], prompts: str | Sequence[str]) -> torch.Tensor:
        """cos(image_i, prompt_i); a single prompt string applies to every image.

        Returns:
            float32 [len(images)].
        """
        _check_images(images, "images")
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images) or not all(isinstance(p, str) for p in prompts):
            raise InputError(
                f"prompts must be one string or one string per image; got {len(prompts)} for {len(images)} images."
            )
        return cosine_rows(self.embedder.features(images), self.embedder.text_features(list(prompts)))


def no_face_rate(scores: torch.Tensor) -> float:
    """Share of images whose score is NaN (face identity: no face found)."""
    return float(torch.isnan(scores).float().mean()) if scores.numel() else 0.0


def model_load_error(what: str, model: str, flag: str, install: str, exc: BaseException) -> ModelLoadError:
    """The error for a model that cannot be loaded: which model, how to pass a local copy, what to install.

    Args:
        what: e.g. "DINO model".
        model: the model id or path that failed.
        flag: the CLI flag that takes a local copy, e.g. "--dino-model /path/to/dino-vits16".
        install: the pip command that installs the backend.
        exc: the underlying error (its first line is quoted).
    """
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return ModelLoadError(
        f"could not load {what} {model!r} ({reason}). Without hub access, download it elsewhere and pass the "
        f"local copy with {flag}; set HF_HUB_OFFLINE=1 so hub look-ups fail at once instead of retrying. "
        f"The backend installs with `{install}`."
    )


def is_missing_local_path(model: str) -> bool:
    """True for a string that names a local path (absolute, ./, ~/) which does not exist.

    Such a string must not reach `from_pretrained`, which would take it for a hub id.
    """
    text = str(model)
    return text.startswith(("/", "./", "../", "~", "\\")) and not Path(text).expanduser().exists()
