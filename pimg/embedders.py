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


#: How far (Euclidean RGB) a pixel must be from the border colour to count as the subject (as the toy
#: world's checker reads objects).
SUBJECT_DISTANCE = 60
#: Grey the subject is pasted on: no palette colour, so a toy subject's colours stay its own.
NEUTRAL = 128


def subject_crop(image, size: int | None = None, fill: float = 0.75) -> np.ndarray:
    """The subject of a photo on a plain background, cut out, centred and scaled on neutral grey.

    A photo's background, position and size say nothing of who the subject is, yet they dominate a
    global image embedding: on the toy world, same-subject retrieval among 200 subjects from one CLIP
    embedding is 19% from whole photos and 88% from these crops (docs/experiments/id_adapter_tiny.md).
    Face adapters crop to the detected face for the same reason. The background is the median of the
    1-pixel border; subject pixels lie more than `SUBJECT_DISTANCE` from it. A photo where no such
    subject stands out (a busy background) comes back unchanged.

    Args:
        image: a uint8 array (H, W, 3) or PIL image.
        size: side of the result (default: the photo's shorter side).
        fill: share of the side the subject's longer side takes.
    """
    from PIL import Image

    pixels = np.asarray(pil_images([image])[0])
    side = size or min(pixels.shape[:2])
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(np.float32)
    background = np.median(border, axis=0)
    mask = np.linalg.norm(pixels.astype(np.float32) - background, axis=-1) > SUBJECT_DISTANCE
    if not mask.any() or mask.mean() > 0.9:
        return pixels
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = max(y1 - y0, x1 - x0)
    cut = np.full((box, box, 3), NEUTRAL, np.uint8)
    oy, ox = (box - (y1 - y0)) // 2, (box - (x1 - x0)) // 2
    cut[oy : oy + y1 - y0, ox : ox + x1 - x0] = np.where(
        mask[y0:y1, x0:x1, None], pixels[y0:y1, x0:x1], NEUTRAL
    )
    inner = max(1, round(side * fill))
    out = np.full((side, side, 3), NEUTRAL, np.uint8)
    start = (side - inner) // 2
    out[start : start + inner, start : start + inner] = np.asarray(
        Image.fromarray(cut).resize((inner, inner), Image.NEAREST)
    )
    return out


class ClipImageEmbedder:
    """CLIP image embeddings (`image_embeds`, the projected pooled output) of photos.

    Args:
        source: a folder holding a `CLIPVisionModelWithProjection` (config.json + weights), a
            `CLIPModel` folder (its vision half is used), or a hub id.
        crop: embed `subject_crop` of each photo (what a toy adapter is trained on) instead of the photo.
        tokens: give the penultimate layer's hidden states [tokens, hidden] (what IP-Adapter Plus'
            resampler reads, as diffusers' pipelines compute them) instead of the projected embedding.
        device, dtype: where the tower runs.
    """

    kind = "clip"

    def __init__(
        self,
        source: str | Path,
        *,
        crop: bool = False,
        tokens: bool = False,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
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
        self.crop = crop
        self.tokens = tokens

    @property
    def dim(self) -> int:
        config = self.model.config
        return int(config.hidden_size if self.tokens else config.projection_dim)

    @torch.no_grad()
    def embed(self, images: Sequence, names: Sequence[str] | None = None) -> torch.Tensor:
        """uint8 arrays, PIL images or paths -> float32 embeddings [N, dim] (tokens: [N, T, dim]) on the CPU.

        `names` is the embedders' common signature (`FaceEmbedder` names a photo without a face); every
        photo has a CLIP embedding, so it is not needed here.
        """
        photos = pil_images(images)
        if self.crop:
            from PIL import Image

            photos = [Image.fromarray(subject_crop(p)) for p in photos]
        pixels = self.processor(photos, return_tensors="pt").pixel_values
        return self._encode(pixels)

    @torch.no_grad()
    def negative(self) -> torch.Tensor:
        """The embedding without an image: zeros, or for tokens the hidden states of an all-zero input,
        as diffusers' `encode_image` makes the unconditional image prompt of IP-Adapter Plus."""
        if not self.tokens:
            return torch.zeros(self.dim)
        size = self.model.config.image_size
        return self._encode(torch.zeros(1, 3, size, size))[0]

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        out = self.model(pixels.to(param.device, param.dtype), output_hidden_states=self.tokens)
        return (out.hidden_states[-2] if self.tokens else out.image_embeds).float().cpu()


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
        #: per embedded photo, the used face aligned to 224x224 (`pimg.faces.Face.aligned`)
        self.aligned: list[np.ndarray | None] = []

    @property
    def dim(self) -> int:
        return int(self.backend.dim)

    def embed(self, images: Sequence, names: Sequence[str] | None = None) -> torch.Tensor:
        """Photos -> [N, dim]; an InputError naming the photo when one shows no face."""
        rows, self.reports, self.aligned = [], [], []
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
            self.aligned.append(used.aligned)
        return torch.from_numpy(np.stack(rows))


class FacePlusEmbedder:
    """IP-Adapter-FaceID Plus' two inputs: the largest face's identity embedding, and the CLIP tokens
    (penultimate hidden states) of that face aligned on its landmarks, as its training computed them.

    Args:
        faces: the face embedder (insightface ArcFace for h94's checkpoints).
        clip: the CLIP image encoder, with `tokens=True` (ViT-H for h94's checkpoints).
    """

    kind = "face-plus"

    def __init__(self, faces: FaceEmbedder, clip: ClipImageEmbedder):
        if not clip.tokens:
            raise InputError("FaceID Plus reads the CLIP encoder's hidden states: build it with tokens=True.")
        self.faces, self.clip = faces, clip

    @property
    def dim(self) -> int:
        return self.faces.dim

    @property
    def reports(self) -> list[dict]:
        return self.faces.reports

    def embed(self, images: Sequence, names: Sequence[str] | None = None) -> torch.Tensor:
        """Photos -> the face embeddings [N, dim] (`embed_with_face_tokens` gives the tokens too)."""
        return self.embed_with_face_tokens(images, names)[0]

    def embed_with_face_tokens(
        self, images: Sequence, names: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Photos -> (face embeddings [N, dim], the aligned faces' CLIP tokens [N, T, hidden])."""
        identities = self.faces.embed(images, names)
        if any(crop is None for crop in self.faces.aligned):
            raise InputError(
                "this face backend gives no aligned faces; FaceID Plus needs them (use insightface)."
            )
        return identities, self.clip.embed(self.faces.aligned)

    def negative(self) -> torch.Tensor:
        """The unconditional face tokens: the CLIP hidden states of an all-zero image."""
        return self.clip.negative()
