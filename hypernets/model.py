"""The hypernetwork: a subject's photos -> LiDB LoRA factors in one forward pass (HyperDreamBooth, sec. 3.2).

    photos --frozen vision encoder--> patch tokens of every photo (one set, any number of photos)
           --transformer decoder, one learned query per target layer, `passes` refinements-->
           per-layer factors (a, b) of the LiDB space (`hypernets.lidb`)

Ruiz et al. (2023) refine the prediction iteratively: pass k reads the factors of pass k-1 (embedded
back into the queries) and adds a correction, with the decoder's weights shared across passes. The
output head's `b` half starts at zero, so at step 0 every predicted LoRA is zero and the UNet is the
base model (its `a` half starts small and random: with both halves zero the gradient of each would be
zero and nothing would train).

The encoder reads the photos at the encoder's own size through its image processor. On the toy world
the subject is first cut out of its plain background (`pimg.embedders.subject_crop`), which a global
embedding needs to tell subjects apart (docs/experiments/id_adapter_tiny.md); the decoder also sees an
uncropped view, so position and size cues stay available.

Saved as a folder: `hypernet.safetensors` (decoder weights; the frozen encoder is not repeated),
`hypernet.json` (architecture, LiDB space, base, encoder source) and `image_encoder/` (the vision model,
so the folder is self-contained).

Example:
    >>> hypernet = Hypernetwork.load("pimg/assets/tiny_hypernet", unet=pipe.unet)
    >>> factors = hypernet.predict(photos)            # one subject
    >>> pipe.load_lora_weights(hypernet.space.expand(factors), adapter_name="subject")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from pimg.errors import InputError, ModelLoadError
from pimg.hypernets.lidb import Factors, LidbConfig, LidbSpace

WEIGHTS_FILE = "hypernet.safetensors"
CONFIG_FILE = "hypernet.json"
ENCODER_FOLDER = "image_encoder"


@dataclass
class HypernetArchitecture:
    """The shape of a hypernetwork; saved as `hypernet.json` beside its weights.

    Attributes:
        lidb: the weight space it predicts.
        width: the decoder's token width.
        depth: decoder layers (each: self-attention among the layer queries, cross-attention to the
            photos' tokens, feed-forward).
        heads: attention heads.
        passes: refinement passes of the shared decoder (HyperDreamBooth's iterative prediction).
        subject_crop: also show the encoder each photo's subject cut out of a plain background.
        a_init_std: std of the `a` half of the output head at initialisation (the `b` half is zero).
    """

    lidb: LidbConfig = field(default_factory=LidbConfig)
    width: int = 128
    depth: int = 2
    heads: int = 4
    passes: int = 2
    subject_crop: bool = False
    a_init_std: float = 0.02

    def __post_init__(self):
        if isinstance(self.lidb, dict):
            self.lidb = LidbConfig(**self.lidb)
        for name in ("width", "depth", "heads", "passes"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.width % self.heads:
            raise InputError(f"width {self.width} is not divisible by heads {self.heads}.")


class PhotoEncoder(nn.Module):
    """A frozen vision model (CLIP's vision tower or DINOv2) -> patch tokens [B, n_photos * T, D].

    Args:
        source: a folder or hub id of a CLIPVisionModel / CLIPModel / Dinov2Model (any transformers
            vision model whose output has `last_hidden_state`), with its image processor config, or
            a folder without one (CLIP's processor at the model's image size is used).
        subject_crop: add each photo's `subject_crop` as a second view.
    """

    def __init__(self, source: str | Path, subject_crop: bool = False):
        super().__init__()
        self.source = str(source)
        self.model = _load_vision_model(self.source)
        self.model.requires_grad_(False).eval()
        self.processor = _image_processor(self.source, self.model)
        self.subject_crop = subject_crop

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def pixels(self, photos: Sequence) -> torch.Tensor:
        """One subject's photos (arrays, PIL images or paths) -> processed pixels [views, 3, H, W]."""
        from PIL import Image

        from pimg.embedders import pil_images, subject_crop

        images = pil_images(photos)
        if self.subject_crop:
            images = images + [Image.fromarray(subject_crop(p)) for p in images]
        return self.processor(images, return_tensors="pt").pixel_values

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, views, 3, H, W] -> tokens [B, views * T, D] (the encoder is frozen: no graph)."""
        batch, views = pixels.shape[:2]
        param = next(self.model.parameters())
        hidden = self.model(pixel_values=pixels.flatten(0, 1).to(param)).last_hidden_state
        return hidden.reshape(batch, views * hidden.shape[1], hidden.shape[2]).float()


def _load_vision_model(source: str):
    from transformers import AutoConfig, AutoModel, CLIPVisionModel
    from transformers.utils import logging as transformers_logging

    # A CLIPModel folder's text half is "unexpected" for its vision tower: expected here, not news.
    before = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(source)
        if config.model_type == "clip":  # a whole CLIPModel: its vision half
            return CLIPVisionModel.from_pretrained(source, dtype=torch.float32)
        return AutoModel.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load a vision model from {source!r} ({str(exc).splitlines()[0]}). Pass a folder or hub "
            "id of a CLIP vision model or DINOv2 (config.json and weights), e.g. openai/clip-vit-large-patch14 "
            "or facebook/dinov2-base."
        ) from exc
    finally:
        transformers_logging.set_verbosity(before)


def _image_processor(source: str, model):
    from transformers import AutoImageProcessor, CLIPImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        size = int(getattr(model.config, "image_size", 224))
        return CLIPImageProcessor(size=size, crop_size=size)


class Hypernetwork(nn.Module):
    """Photo tokens -> LiDB factors of every target layer (see the module docstring).

    Args:
        space: the LiDB space over the UNet's target layers.
        encoder: the frozen photo encoder.
        architecture: decoder sizes.
    """

    def __init__(self, space: LidbSpace, encoder: PhotoEncoder, architecture: HypernetArchitecture):
        super().__init__()
        self.space, self.encoder, self.architecture = space, encoder, architecture
        width, numbers = architecture.width, space.numbers_per_layer
        self.photo_in = nn.Sequential(nn.LayerNorm(encoder.dim), nn.Linear(encoder.dim, width))
        self.queries = nn.Parameter(torch.randn(len(space.layers), width) * 0.02)
        self.feedback = nn.Linear(numbers, width)  # the previous pass's factors, back into the queries
        layer = nn.TransformerDecoderLayer(
            width, architecture.heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, architecture.depth)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, numbers))
        a_numbers = space.config.rank * space.config.d_down
        with torch.no_grad():
            out = self.head[1]
            out.weight[:a_numbers].normal_(0, architecture.a_init_std)
            out.weight[a_numbers:].zero_()  # the b half: every LoRA starts at zero
            out.bias.zero_()
            self.feedback.weight.zero_()  # pass 1 and later start as pass 0 until feedback helps
            self.feedback.bias.zero_()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, views, 3, H, W] (`PhotoEncoder.pixels` of each subject, stacked) -> flat factors [B, size]."""
        memory = self.photo_in(self.encoder(pixels))
        batch = memory.shape[0]
        queries = self.queries.expand(batch, -1, -1)
        flat = torch.zeros(batch, len(self.space.layers), self.space.numbers_per_layer, device=memory.device)
        for _ in range(self.architecture.passes):
            hidden = self.decoder(queries + self.feedback(flat), memory)
            flat = flat + self.head(hidden)
        return flat.flatten(1)

    @torch.no_grad()
    def predict(self, photos: Sequence) -> Factors:
        """One subject's photos (1 to N) -> its factors (no batch dimension)."""
        if not len(photos):
            raise InputError("the hypernetwork needs at least one photo of the subject.")
        device = self.queries.device
        flat = self(self.encoder.pixels(photos)[None].to(device))[0]
        return self.space.split(flat)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The decoder's weights (what training changes; the encoder and the bases are not included)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("encoder.", "space."))}

    # ------------------------------------------------------------------------------------------ files

    def save(self, folder: str | Path, metadata: dict | None = None) -> Path:
        """Write `hypernet.safetensors`, `hypernet.json` and `image_encoder/` into `folder`."""
        from pimg.formats.safetensors_io import write_safetensors_atomically

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        write_safetensors_atomically(folder / WEIGHTS_FILE, weights, {"format": "pt"})
        self.encoder.model.save_pretrained(str(folder / ENCODER_FOLDER), safe_serialization=True)
        self.encoder.processor.save_pretrained(str(folder / ENCODER_FOLDER))
        record = {"architecture": asdict(self.architecture), **dict(metadata or {})}
        (folder / CONFIG_FILE).write_text(json.dumps(record, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, unet: nn.Module) -> Hypernetwork:
        """A saved hypernetwork for `unet` (the base it was trained on, or one of the same architecture)."""
        from pimg.formats.safetensors_io import read_safetensors

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise ModelLoadError(
                f"{folder} is not a hypernetwork folder (it needs {CONFIG_FILE} and {WEIGHTS_FILE}); pass the "
                "folder `pimg train hypernet` wrote, or omit it to use the one shipped for the base."
            )
        record = json.loads((folder / CONFIG_FILE).read_text())
        architecture = HypernetArchitecture(**record["architecture"])
        space = LidbSpace.from_unet(unet, architecture.lidb)
        model = cls(space, PhotoEncoder(folder / ENCODER_FOLDER, architecture.subject_crop), architecture)
        weights = read_safetensors(folder / WEIGHTS_FILE, what="hypernetwork weights")
        expected = model.trainable_state_dict()
        if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
            raise ModelLoadError(
                f"{folder / WEIGHTS_FILE} does not fit this base's UNet ({len(space.layers)} target layers): it "
                "was trained for another base architecture. Use a hypernetwork trained for this base."
            )
        model.load_state_dict(weights, strict=False)
        model.record = record
        return model.eval()
