"""Image embedders: a photo -> the vector an ID adapter is conditioned on.

- `ClipImageEmbedder`: a CLIP vision tower with its projection (`CLIPVisionModelWithProjection`), the
  embedding IP-Adapter uses (Ye et al. 2023, sec. 3.2: the global image embedding). On `tiny` it is
  the toy CLIP's vision tower, saved beside the toy adapter as `image_encoder/`, where diffusers'
  `load_ip_adapter` finds it; on real bases a hub id or folder (e.g. `h94/IP-Adapter`'s
  `models/image_encoder`). Photos are prepared exactly as diffusers' pipelines prepare
  `ip_adapter_image` (a `CLIPImageProcessor` at the tower's size), so an embedding made here and one
  diffusers makes from the same photo are the same.
- `FaceEmbedder`: the identity embedding of the largest face in a photo (`pimg.faces`: insightface
  ArcFace, 512-d, as IP-Adapter-FaceID uses; or dlib's 128-d recogniser), with clear errors when a
  photo shows no face and a note saying which face was used when it shows several.

Example:
    >>> embedder = ClipImageEmbedder("pimg/assets/tiny_id_adapter/image_encoder")
    >>> embedder.embed([photo]).shape
    torch.Size([1, 128])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pimg.errors import InputError, ModelLoadError

log = logging.getLogger(__name__)


def pil_images(images: Sequence) -> list:
    """Photos given as uint8 arrays (H, W, 3), PIL images or file paths -> RGB PIL images."""
    from PIL import Image

    from pimg.photos import read_photo

    if isinstance(images, str | Path | np.ndarray | Image.Image):
        images = [images]
    out = []
    for image in images:
        if isinstance(image, Image.Image):
            out.append(image.convert("RGB"))
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
                raise InputError(f"a photo array must be uint8 (H, W, 3); got {image.dtype} {image.shape}.")
            out.append(Image.fromarray(np.ascontiguousarray(image[..., :3])))
        else:
            out.append(read_photo(image))
    return out


class ClipImageEmbedder:
    """CLIP image embeddings (`image_embeds`, the projected pooled output) of photos.

    Args:
        source: a folder holding a `CLIPVisionModelWithProjection` (config.json + weights), a
            `CLIPModel` folder (its vision half is used), or a hub id.
        device, dtype: where the tower runs.
    """

    kind = "clip"

    def __init__(self, source: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.source = str(source)
        location, subfolder = self.source, ""
        if not Path(location).exists() and location.count("/") > 1:
            # "h94/IP-Adapter/models/image_encoder": a hub repository and a folder inside it
            owner, repo, subfolder = location.split("/", 2)
            location = f"{owner}/{repo}"
        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(
                location, subfolder=subfolder, dtype=dtype
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot load a CLIP vision model from {self.source!r} ({str(exc).splitlines()[0]}). Pass a "
                "folder with config.json and model.safetensors of a CLIPVisionModelWithProjection (an "
                "IP-Adapter's image_encoder/ folder), or a hub id where the hub can be reached."
            ) from exc
        self.model.requires_grad_(False).eval().to(device)
        size = self.model.config.image_size
        # The processor diffusers' load_ip_adapter makes when a pipeline has none (same size, CLIP's
        # mean and std): embeddings made here equal those diffusers makes from `ip_adapter_image`.
        self.processor = CLIPImageProcessor(size=size, crop_size=size)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @torch.no_grad()
    def embed(self, images: Sequence) -> torch.Tensor:
        """uint8 arrays or PIL images -> float32 embeddings [N, dim] on the CPU."""
        pixels = self.processor(pil_images(images), return_tensors="pt").pixel_values
        param = next(self.model.parameters())
        return self.model(pixels.to(param.device, param.dtype)).image_embeds.float().cpu()


class FaceEmbedder:
    """The identity embedding of the largest face in each photo.

    Args:
        backend: a face backend of `pimg.faces` (`InsightFaceBackend` for ArcFace 512-d, the
            embedding the public IP-Adapter-FaceID checkpoints take; `DlibFaceBackend` for 128-d).
    """

    kind = "face"

    def __init__(self, backend):
        self.backend = backend
        #: per embedded photo, what was found: {"faces": n, "used": box}
        self.reports: list[dict] = []

    @property
    def dim(self) -> int:
        return int(self.backend.dim)

    def embed(self, images: Sequence, names: Sequence[str] | None = None) -> torch.Tensor:
        """Photos -> [N, dim]; an InputError naming the photo when one shows no face."""
        rows, self.reports = [], []
        for index, image in enumerate(pil_images(images)):
            name = names[index] if names else f"photo {index + 1}"
            faces = self.backend.detect(image)
            if not faces:
                raise InputError(
                    f"no face found in {name}. Use a photo where one face is clearly visible, roughly frontal "
                    "and at least about 80 pixels wide."
                )
            used = faces[0]  # the backends sort faces largest first
            box = tuple(round(v) for v in used.box)
            self.reports.append({"photo": name, "faces": len(faces), "used_box": box})
            if len(faces) > 1:
                log.warning(
                    "%s shows %d faces; using the largest, at box %s (left, top, right, bottom).",
                    name,
                    len(faces),
                    box,
                )
            rows.append(np.asarray(used.embedding, np.float32))
        return torch.from_numpy(np.stack(rows))
