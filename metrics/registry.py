"""Metrics and backends by name: plain dicts, `list_*()` helpers, one `load_metric` entry point.

A backend is picked by its registry name or by a local path (whose files say which backend reads
it); its model by a hub id, a built-in name or a local path. Unknown names list the valid ones.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pimg.errors import InputError
from pimg.metrics.base import ImageSimilarity, TextSimilarity


@dataclass(frozen=True)
class MetricInfo:
    """What a metric compares and which backbone family computes it.

    Attributes:
        kind: "image" (each image against the subject's reference photos) or "text" (against its prompt).
        family: key of `BACKENDS`.
        description: one line for listings and reports.
    """

    kind: str
    family: str
    description: str


METRICS: dict[str, MetricInfo] = {
    "dino": MetricInfo(
        "image", "dino", "mean cosine of DINO ViT-S/16 CLS embeddings to the subject's photos"
    ),
    "clip-i": MetricInfo("image", "clip", "mean cosine of CLIP image embeddings to the subject's photos"),
    "clip-t": MetricInfo("text", "clip", "cosine of CLIP image and prompt embeddings"),
    "face-id": MetricInfo(
        "image", "face", "mean cosine of the largest face's identity embedding to the photos' faces"
    ),
    "toy-fidelity": MetricInfo(
        "image", "toy", "palette-histogram intersection with the photos (toy-world checker)"
    ),
}


def _open_clip(model, pretrained, device, batch_size):
    from pimg.metrics.clip import DEFAULT_OPEN_CLIP, OpenClipEmbedder

    if model is None:
        model, pretrained = DEFAULT_OPEN_CLIP[0], pretrained or DEFAULT_OPEN_CLIP[1]
    return OpenClipEmbedder(model, pretrained, device=device, batch_size=batch_size)


def _transformers_clip(model, pretrained, device, batch_size):
    from pimg.metrics.clip import DEFAULT_TRANSFORMERS_CLIP, TransformersClipEmbedder

    return TransformersClipEmbedder(model or DEFAULT_TRANSFORMERS_CLIP, device=device, batch_size=batch_size)


def _toy_clip(model, pretrained, device, batch_size):
    from pimg.metrics.clip import ToyClipEmbedder

    return ToyClipEmbedder(model or "tiny", device=device, batch_size=batch_size)


def _dino(model, pretrained, device, batch_size):
    from pimg.metrics.dino import DEFAULT_DINO, DinoEmbedder

    return DinoEmbedder(model or DEFAULT_DINO, device=device, batch_size=batch_size)


def _dlib(model, pretrained, device, batch_size):
    from pimg.faces import DlibFaceBackend

    return DlibFaceBackend(model)


def _insightface(model, pretrained, device, batch_size):
    from pimg.faces import DEFAULT_INSIGHTFACE_PACK, InsightFaceBackend

    return InsightFaceBackend(model or DEFAULT_INSIGHTFACE_PACK, device=str(device))


def _face_auto(model, pretrained, device, batch_size):
    # insightface's packs are the field's usual ID metric: use them where installed, else dlib (offline, CC0).
    if model is not None and Path(model).is_dir():
        return BACKENDS["face"][backend_for_path("face", Path(model))](model, pretrained, device, batch_size)
    pack = Path("~/.insightface/models").expanduser() / str(model or "buffalo_l")
    if importlib.util.find_spec("insightface") is not None and pack.is_dir():
        return _insightface(model, pretrained, device, batch_size)
    return _dlib(model, pretrained, device, batch_size)


def _checker(model, pretrained, device, batch_size):
    from pimg.metrics.toy import ToyFidelityEmbedder

    return ToyFidelityEmbedder()


#: family -> backend name -> loader(model, pretrained, device, batch_size).
BACKENDS: dict[str, dict[str, Callable]] = {
    "clip": {"open_clip": _open_clip, "transformers": _transformers_clip, "toy": _toy_clip},
    "dino": {"transformers": _dino},
    "face": {"auto": _face_auto, "insightface": _insightface, "dlib": _dlib},
    "toy": {"checker": _checker},
}
DEFAULT_BACKENDS = {"clip": "open_clip", "dino": "transformers", "face": "auto", "toy": "checker"}


def list_metrics() -> list[str]:
    """Metric names accepted by `load_metric`."""
    return list(METRICS)


def list_backends(metric: str) -> list[str]:
    """Backend names for `metric` (first = default)."""
    family = _info(metric).family
    default = DEFAULT_BACKENDS[family]
    return [default] + [b for b in BACKENDS[family] if b != default]


def _info(metric: str) -> MetricInfo:
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}.")
    return METRICS[metric]


def backend_for_path(family: str, path: Path) -> str:
    """Which backend of `family` reads the local model folder or file `path`."""
    names = {p.name for p in path.iterdir()} if path.is_dir() else {path.name}
    if family == "clip":
        if "open_clip_config.json" in names or path.suffix in (".bin", ".pt", ".safetensors"):
            return "open_clip"
        if "model_index.json" in names or (path.parent / "model_index.json").is_file():
            return "toy"
        if "config.json" in names:
            return "transformers"
    if family == "dino" and "config.json" in names:
        return "transformers"
    if family == "face":
        if any(n.endswith(".dat") for n in names):
            return "dlib"
        if any(n.endswith(".onnx") for n in names):
            return "insightface"
    raise InputError(
        f"cannot tell which {family} backend reads {path}; pass a backend name ({', '.join(BACKENDS[family])}) "
        "and the path as the model."
    )


def load_embedder(
    metric: str,
    backend: str | None = None,
    model: str | None = None,
    *,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
):
    """Load the backbone that computes `metric` (once; share it between CLIP-I and CLIP-T).

    Args:
        metric: a name from `list_metrics()`.
        backend: a name from `list_backends(metric)`, or a local model path (the backend is read
            from its files and the path becomes the model); None for the default.
        model: hub id, built-in name or local path; None for the backend's default.
        pretrained: open_clip only: pretrained tag or local checkpoint file.
        device: torch device for the backbone (features are returned on the CPU).
        batch_size: images per forward pass.
    """
    family = _info(metric).family
    backend = backend or DEFAULT_BACKENDS[family]
    if backend not in BACKENDS[family]:
        path = Path(backend).expanduser()
        if not path.exists():
            raise InputError(
                f"unknown {metric} backend {backend!r}; valid backends: {', '.join(list_backends(metric))}, "
                "or a local model path."
            )
        backend, model = backend_for_path(family, path), str(path)
    return BACKENDS[family][backend](model, pretrained, device, batch_size)


def load_metric(
    metric: str,
    backend: str | None = None,
    model: str | None = None,
    *,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    embedder=None,
) -> ImageSimilarity | TextSimilarity:
    """A metric with the one signature `score(images, references_or_prompts) -> Tensor[N]`.

    Args:
        metric, backend, model, pretrained, device, batch_size: as in `load_embedder`.
        embedder: an already loaded backbone to reuse (e.g. one CLIP for both CLIP-I and CLIP-T).

    Example:
        >>> clip_i = load_metric("clip-i", "toy", "tiny")
        >>> clip_i.score(["gen/00_0.png"], ["photos/00.png", "photos/01.png"])
        tensor([0.8312])
    """
    info = _info(metric)
    if embedder is None:
        embedder = load_embedder(
            metric, backend, model, pretrained=pretrained, device=device, batch_size=batch_size
        )
    return TextSimilarity(metric, embedder) if info.kind == "text" else ImageSimilarity(metric, embedder)
