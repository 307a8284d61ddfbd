"""Personalization metrics: CLIP-I, CLIP-T, DINO, face identity, and the DreamBench protocol.

Every metric has one signature, `score(images, references_or_prompts) -> Tensor[N]` (one score per
generated image), runs batched on CPU or GPU, and loads its backbone once:

    >>> from pimg.metrics import load_metric
    >>> dino = load_metric("dino", model="/models/dino-vits16")
    >>> dino.score(["gen/00_0.png", "gen/00_1.png"], ["photos/00.jpg", "photos/01.jpg"])
    tensor([0.61, 0.58])

Backends by name or local path: `list_metrics()`, `list_backends(metric)`.
"""

from pimg.metrics.base import (
    ImageSimilarity,
    TextSimilarity,
    cosine_matrix,
    cosine_rows,
    no_face_rate,
)
from pimg.metrics.images import DINO_224, OPENAI_CLIP_224, TOY_CLIP_64, Preprocess, load_image
from pimg.metrics.registry import list_backends, list_metrics, load_embedder, load_metric

__all__ = [
    "DINO_224",
    "OPENAI_CLIP_224",
    "TOY_CLIP_64",
    "ImageSimilarity",
    "Preprocess",
    "TextSimilarity",
    "cosine_matrix",
    "cosine_rows",
    "list_backends",
    "list_metrics",
    "load_embedder",
    "load_image",
    "load_metric",
    "no_face_rate",
]
