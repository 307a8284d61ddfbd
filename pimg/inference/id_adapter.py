"""The ID adapter as a part: an IP-Adapter (or IP-Adapter-FaceID) file and a subject's embedding.

`IdAdapterPart` loads the adapter with diffusers' own `pipe.load_ip_adapter` (decoupled
cross-attention processors and the image projection) and gives each call the subject's embedding as
`ip_adapter_image_embeds`, so an image made through pimg is the image plain diffusers makes from the
same file and embedding. FaceID's companion LoRA, when the file holds one, is diffusers' peft
adapter `faceid_0`; the part owns it, so it stays active beside any LoRA added next to it.

A subject "made" with an ID adapter is a result folder like any other (`personalize`): its
embedding (`id_embedding.safetensors`, the mean over its photos) and a `config.json` naming the
adapter, so the demo's subject store, `pimg generate --subject` and `pimg eval toysubject` use it
as they use a trained LoRA.

Example:
    >>> part = IdAdapterPart(default_adapter("tiny"), ClipImageEmbedder(...).embed([photo]), scale=0.8)
    >>> pp.add(part); pp.generate("a star on a green background")
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from pimg.errors import InputError, ModelLoadError
from pimg.formats.ip_adapter import (
    COMPANION_LORA,
    IpAdapterInfo,
    check_embedding,
    check_face_tokens,
    check_ip_adapter,
    describe_ip_adapter,
    find_ip_adapter_file,
    read_ip_adapter,
)
from pimg.hub_files import local_file
from pimg.inference.parts import GenerationCall, Part
from pimg.methods import ID_EMBEDDING_FILE

#: Folder of the trained toy adapter shipped with pimg (IP-Adapter layout + `image_encoder/`).
TOY_ADAPTER = "tiny_id_adapter"


def default_adapter(base: str) -> Path | None:
    """The ID adapter shipped for a built-in base (`tiny`), or None."""
    from pimg.models import ASSETS

    folder = ASSETS / TOY_ADAPTER
    return folder if base == "tiny" and folder.is_dir() else None


def resolve_adapter(adapter: str | Path | None, base: str) -> Path:
    """The adapter file for `--id-adapter`: a file, a folder holding one, a hub file
    (`hf://h94/IP-Adapter-FaceID/ip-adapter-faceid_sd15.bin`), or None: the base's shipped one."""
    if adapter is None or str(adapter) == "default":
        found = default_adapter(base)
        if found is None:
            raise InputError(
                f"no ID adapter ships for base {base!r}: pass --id-adapter FILE (an IP-Adapter-FaceID .bin or "
                "safetensors, or a folder `pimg train id-adapter` wrote)."
            )
        adapter = found
    # a hub adapter of the CLIP kinds needs the image encoder its repository keeps beside it
    return find_ip_adapter_file(local_file(adapter, beside=("image_encoder",)))


def load_adapter_into(pipe, weights: dict, scale: float = 1.0) -> None:
    """Load an IP-Adapter state dict with diffusers' loader, without an image encoder (embeddings are given)."""
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.ERROR)  # it warns that no image encoder is loaded: intended
    try:
        pipe.load_ip_adapter(weights, subfolder="", weight_name="", image_encoder_folder=None)
    finally:
        diffusers_logging.set_verbosity(before)
    pipe.set_ip_adapter_scale(scale)


def image_embeds_argument(
    embedding: torch.Tensor, rows: int, guided: bool, negative: torch.Tensor | None = None
) -> torch.Tensor:
    """A subject's embedding ([D], or [T, D] tokens for IP-Adapter Plus) as one entry of diffusers'
    `ip_adapter_image_embeds` for `rows` prompts.

    Shape [rows, 1, ...], with as many unconditional rows in front under classifier-free guidance:
    `negative`, or zeros, the unconditional image embedding diffusers uses for IP-Adapter
    (`encode_image`) and FaceID (its docs). IP-Adapter Plus' is the encoder's hidden states of an
    all-zero image (`ClipImageEmbedder.negative`).
    """
    one = embedding.float()[None, None]
    positive = one.repeat(rows, *[1] * (one.ndim - 1))
    if not guided:
        return positive
    unconditional = (
        torch.zeros_like(positive) if negative is None else negative.to(positive).expand_as(positive)
    )
    return torch.cat([unconditional, positive])


def project_once_per_call(projection: torch.nn.Module) -> None:
    """Make the UNet's image projection reuse its output while its input stays the same object.

    diffusers' pipelines pass the same `image_embeds` list to the UNet at every step, and the UNet
    projects it each time; the image tokens do not change within a generation, and a resampler (IP-Adapter
    Plus: 4 attention layers) costs about 7% of a step on `tiny`. Training never goes through a part, so
    gradients are unaffected.
    """
    compute = projection.forward
    last: dict = {}

    def forward(image_embeds):
        if last.get("input") is not image_embeds:
            last.update(input=image_embeds, output=compute(image_embeds))
        return last["output"]

    projection.forward = forward


class IdAdapterPart(Part):
    """An IP-Adapter / FaceID adapter driven by a subject's embedding, at a scale.

    Args:
        adapter: the adapter file (`.bin` or `.safetensors`), or a folder holding one.
        embedding: the subject's embedding, [D] or [N, D] (N photos: their mean is used); for IP-Adapter
            Plus its tokens, [T, D] or [N, T, D].
        scale: the image prompt's weight (`set_ip_adapter_scale`; 0 = no image prompt; a companion LoRA stays on).
        name: the part's name.
        negative: the unconditional embedding under guidance. None: zeros, except for IP-Adapter Plus,
            whose unconditional tokens are the hidden states of an all-zero image, as diffusers'
            `encode_image` makes them: they are computed at the first guided call with the
            `image_encoder/` beside the adapter (zeros, with a warning, when there is none).
        face_tokens: FaceID Plus only, and needed there: the CLIP tokens of the aligned face, [T, H]
            or [N, T, H] (`pimg.embedders.FacePlusEmbedder.embed_with_face_tokens`).
        face_tokens_negative: their unconditional form; None: as `negative` is found for Plus.
        shortcut: FaceID PlusV2 adds the face embedding's own tokens to the resampler's (diffusers'
            `shortcut`); None: on when the file's name says plusv2, as h94 names it.
        shortcut_scale: the weight of the resampler's tokens beside them (PlusV2's "s_scale").
    """

    kind = "id_adapter"

    def __init__(
        self,
        adapter: str | Path,
        embedding: torch.Tensor,
        scale: float = 1.0,
        name: str = "id_adapter",
        negative: torch.Tensor | None = None,
        face_tokens: torch.Tensor | None = None,
        face_tokens_negative: torch.Tensor | None = None,
        shortcut: bool | None = None,
        shortcut_scale: float = 1.0,
    ):
        super().__init__(name)
        self.path = find_ip_adapter_file(adapter)
        self.weights = read_ip_adapter(self.path)
        self.info: IpAdapterInfo = describe_ip_adapter(self.weights)
        embedding = torch.as_tensor(embedding, dtype=torch.float32)
        if embedding.ndim == (3 if self.info.kind == "plus" else 2):
            embedding = embedding.mean(0)
        check_embedding(self.info, embedding, str(self.path))
        self.embedding = embedding
        self.negative = negative
        self.scale = float(scale)
        if face_tokens is not None:
            face_tokens = torch.as_tensor(face_tokens, dtype=torch.float32)
            face_tokens = face_tokens.mean(0) if face_tokens.ndim == 3 else face_tokens
        check_face_tokens(self.info, face_tokens, str(self.path))
        self.face_tokens, self.face_tokens_negative = face_tokens, face_tokens_negative
        self.shortcut = "plusv2" in self.path.name.lower() if shortcut is None else bool(shortcut)
        self.shortcut_scale = float(shortcut_scale)
        self._face_projection = None
        self._dtype = torch.float32  # the UNet's, set on attach

    def attach(self, pipe) -> None:
        if getattr(pipe.unet, "encoder_hid_proj", None) is not None:
            raise InputError(
                "this pipeline already has an IP-Adapter loaded; pimg applies one ID adapter at a time. "
                "Remove the other one first."
            )
        check_ip_adapter(self.info, pipe.unet, str(self.path))
        load_adapter_into(pipe, self.weights, self.scale)
        project_once_per_call(pipe.unet.encoder_hid_proj)
        # diffusers moves `ip_adapter_image_embeds` to the device but keeps their dtype: a half-precision
        # UNet needs them in its own
        self._dtype = pipe.unet.dtype
        if self.info.kind == "faceid-plus":  # diffusers reads the face tokens from the projection itself
            self._face_projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
            self._face_projection.shortcut = self.shortcut
            self._face_projection.shortcut_scale = self.shortcut_scale

    def detach(self, pipe) -> None:
        pipe.unload_ip_adapter()
        self._face_projection = None
        if self.info.has_lora:
            pipe.delete_adapters(COMPANION_LORA)

    def adapters(self) -> dict[str, float]:
        return {COMPANION_LORA: 1.0} if self.info.has_lora else {}

    def call_arguments(self, call: GenerationCall) -> dict[str, Any]:
        rows = len(call.prompts) // call.images_per_prompt  # diffusers repeats each row per image
        guided = call.guidance_scale > 1
        if self.info.kind == "plus" and guided and self.negative is None:
            self.negative = self._encoder_negative(self.embedding, "negative")
        embeds = image_embeds_argument(self.embedding, rows, guided, self.negative).to(self._dtype)
        if self._face_projection is not None:
            if guided and self.face_tokens_negative is None:
                self.face_tokens_negative = self._encoder_negative(self.face_tokens, "face_tokens_negative")
            # one row per image, already repeated: diffusers repeats only ip_adapter_image_embeds
            tokens = image_embeds_argument(
                self.face_tokens, len(call.prompts), guided, self.face_tokens_negative
            )
            weight = self._face_projection.proj_in.weight
            self._face_projection.clip_embeds = tokens.to(weight.device, weight.dtype)
        return {"ip_adapter_image_embeds": [embeds]}

    def _encoder_negative(self, like: torch.Tensor, argument: str) -> torch.Tensor:
        """The image encoder's tokens of an all-zero image (diffusers' unconditional image prompt)."""
        try:
            return clip_embedder_for(self.path).negative()
        except ModelLoadError as exc:
            warnings.warn(
                f"{exc} Unconditional image tokens are zeros instead of an all-zero image's, so "
                f"guided images differ from diffusers' `ip_adapter_image` ones; pass {argument}=.",
                stacklevel=3,
            )
            return torch.zeros_like(like)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "adapter": str(self.path),
            "adapter_kind": self.info.kind,
            "scale": self.scale,
            **({"shortcut": self.shortcut} if self.info.kind == "faceid-plus" else {}),
            "faceid_lora": self.info.has_lora,
        }


def embedder_for(
    adapter_file: Path,
    face_backend: str | None = None,
    face_model: str | None = None,
    image_encoder: str | Path | None = None,
):
    """The embedder an adapter takes: a face backend (FaceID), a CLIP image encoder (IP-Adapter, Plus:
    `image_encoder`, else the `image_encoder/` beside the adapter), or both (FaceID Plus)."""
    from pimg.embedders import FaceEmbedder, FacePlusEmbedder
    from pimg.formats.safetensors_io import read_safetensors_metadata

    info = describe_ip_adapter(read_ip_adapter(adapter_file))
    if not info.kind.startswith("faceid"):
        return clip_embedder_for(adapter_file, image_encoder)
    from pimg.faces import face_backend as make_backend

    metadata = read_safetensors_metadata(adapter_file) if adapter_file.suffix == ".safetensors" else {}
    recorded = metadata.get("pimg.embedder", "")
    backend = face_backend or (
        recorded.removeprefix("face:") if recorded.startswith("face:") else "insightface"
    )
    faces = FaceEmbedder(make_backend(backend, face_model))
    if info.kind == "faceid":
        return faces
    return FacePlusEmbedder(faces, clip_embedder_for(adapter_file, image_encoder))


def clip_embedder_for(adapter_file: Path, image_encoder: str | Path | None = None):
    """The CLIP image encoder of an IP-Adapter, Plus or FaceID Plus adapter, giving what it reads."""
    from pimg.embedders import ClipImageEmbedder
    from pimg.formats.safetensors_io import read_safetensors_metadata

    info = describe_ip_adapter(read_ip_adapter(adapter_file))
    encoder = Path(image_encoder) if image_encoder else adapter_file.parent / "image_encoder"
    if not (encoder / "config.json").is_file():
        what = "the aligned face's CLIP tokens" if info.kind == "faceid-plus" else "CLIP image embeddings"
        where = (
            f"{encoder} holds no CLIP vision model"
            if image_encoder
            else "no image_encoder/ folder lies beside it"
        )
        raise ModelLoadError(
            f"{adapter_file} takes {what}, but {where}. Pass the CLIP vision model it was trained with as "
            "--id-image-encoder FOLDER, or put it beside the adapter as image_encoder/ (h94/IP-Adapter: "
            "models/image_encoder, ViT-H), or pass --id-embedding FILE."
        )
    metadata = read_safetensors_metadata(adapter_file) if adapter_file.suffix == ".safetensors" else {}
    crop = metadata.get("pimg.subject_crop") == "true"
    return ClipImageEmbedder(encoder, crop=crop, tokens=info.kind in ("plus", "faceid-plus"))


def adapter_guidance(adapter_file: Path) -> float | None:
    """The guidance the adapter's training recommends (`guidance_scale` of its config.json), or None."""
    try:
        value = json.loads((adapter_file.parent / "config.json").read_text()).get("guidance_scale")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None


def personalize(photos, out_dir: str | Path, *, base: str = "tiny", model: str | Path | None = None) -> Path:
    """A subject's result folder made from its photos with no training: their embedding and the adapter.

    Args:
        photos: the photos (a folder, paths, or uint8 arrays).
        out_dir: the result folder to write.
        base: the base the adapter is for (picks the shipped adapter when `model` is None).
        model: the adapter file or folder; None: the one shipped for `base`.

    Returns:
        `out_dir`, holding `id_embedding.safetensors` and `config.json` (method id-adapter).
    """
    from pimg.formats.safetensors_io import write_safetensors_atomically
    from pimg.photos import photo_inputs

    adapter = resolve_adapter(model, base)
    photos, names = photo_inputs(photos)
    embedder = embedder_for(adapter)
    tensors = subject_embeddings(embedder, list(photos), names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomically(out / ID_EMBEDDING_FILE, tensors, {"format": "pt"})
    record = {
        "method": "id-adapter",
        "base": base,
        "adapter": str(adapter.resolve()),
        "photos": len(names),
        "faces": getattr(embedder, "reports", None),
        # what `pimg.inference.guidance` reads: no learned word, the adapter's recommended guidance
        "token": "",
        "class_noun": "",
        "guidance_scale": adapter_guidance(adapter),
    }
    (out / "config.json").write_text(json.dumps(record, indent=2))
    return out


def id_adapter_parts(folder: Path, *, scale: float = 1.0, name: str | None = None, token: str | None = None):
    """A subject folder `personalize` wrote -> its `IdAdapterPart`."""
    from pimg.formats.safetensors_io import read_safetensors

    folder = Path(folder)
    if not (folder / ID_EMBEDDING_FILE).is_file():
        raise InputError(
            f"{folder} is an ID adapter, not a subject: give it a photo, e.g. `pimg generate --id-adapter "
            f"{folder} --id-image photo.png`, or make a subject folder with `personalize`."
        )
    record = json.loads((folder / "config.json").read_text())
    tensors = read_safetensors(folder / ID_EMBEDDING_FILE, what="ID embedding file")
    known = {k: v for k, v in tensors.items() if k in SUBJECT_TENSORS}
    return [IdAdapterPart(record["adapter"], scale=scale, name=name or "id_adapter", **known)]


#: What `subject_embeddings` gives and `IdAdapterPart` takes, by its argument names.
SUBJECT_TENSORS = ("embedding", "negative", "face_tokens", "face_tokens_negative")


def subject_embeddings(embedder, photos, names) -> dict[str, torch.Tensor]:
    """The photos as `IdAdapterPart`'s arguments: the embedding, and for IP-Adapter Plus its
    unconditional tokens, for FaceID Plus the aligned face's CLIP tokens and their unconditional form."""
    if hasattr(embedder, "embed_with_face_tokens"):
        embedding, tokens = embedder.embed_with_face_tokens(photos, names)
        return {"embedding": embedding, "face_tokens": tokens, "face_tokens_negative": embedder.negative()}
    tensors = {"embedding": embedder.embed(photos, names)}
    if getattr(embedder, "tokens", False):
        tensors["negative"] = embedder.negative()
    return tensors


def read_embedding_file(path: str | Path) -> torch.Tensor:
    """A ready embedding: a `.safetensors` file holding one tensor (or `embedding`), or a `.npy` array."""
    import numpy as np

    from pimg.formats.safetensors_io import read_safetensors

    path = Path(path)
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} cannot be read as a .npy array ({exc}).") from exc
        return torch.from_numpy(np.asarray(array, np.float32))
    if path.suffix != ".safetensors":
        raise InputError(f"{path}: an embedding file is .safetensors or .npy.")
    tensors = read_safetensors(path, what="embedding file")
    if "embedding" in tensors:
        return tensors["embedding"].float()
    if len(tensors) != 1:
        raise InputError(
            f"{path} holds {len(tensors)} tensors ({', '.join(tensors)}); name the embedding 'embedding'."
        )
    return next(iter(tensors.values())).float()


def part_from_request(request) -> IdAdapterPart:
    """`pimg generate --id-adapter/--id-image/--id-embedding` as a part; says which face was used."""
    adapter = resolve_adapter(request.id_adapter, request.base)
    if request.id_embedding:
        tensors = {"embedding": read_embedding_file(request.id_embedding)}
    else:
        embedder = embedder_for(adapter, request.face_backend, image_encoder=request.id_image_encoder)
        tensors = subject_embeddings(embedder, request.id_images, request.id_images)
        for report in getattr(embedder, "reports", []):
            if report["faces"] > 1:
                print(
                    f"pimg: {report['photo']} shows {report['faces']} faces; used the largest, at "
                    f"{report['used_box']} (left, top, right, bottom)"
                )
    print(f"pimg: ID adapter {adapter} at scale {request.id_scale:g}")
    return IdAdapterPart(adapter, scale=request.id_scale, **tensors)
