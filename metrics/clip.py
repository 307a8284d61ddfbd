"""CLIP backbones for CLIP-I and CLIP-T: open_clip, transformers `CLIPModel`, and the toy world's CLIP.

Each backend loads its model once, applies the preprocessing its weights were trained with (read
from the model's own config, never assumed), and returns L2-comparable features: cosine similarity
of image-image pairs is CLIP-I, of image-prompt pairs CLIP-T (Ruiz et al., DreamBooth, CVPR 2023,
Sec. 4.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pimg.errors import ModelLoadError
from pimg.metrics.base import cosine_matrix, embed_in_batches, is_missing_local_path, model_load_error
from pimg.metrics.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TOY_CLIP_64, ImageLike, Preprocess

DEFAULT_OPEN_CLIP = ("ViT-B-32", "openai")
DEFAULT_TRANSFORMERS_CLIP = "openai/clip-vit-base-patch32"

# open_clip and the hub raise a handful of error types for a model that is not there.
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError)


class _ClipBase:
    """Shared batching of a CLIP backend; subclasses set `preprocess` and the two encode functions."""

    preprocess: Preprocess
    description: dict

    def __init__(self, device: str | torch.device, batch_size: int):
        self.device = torch.device(device)
        self.batch_size = batch_size

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        return embed_in_batches(
            images,
            self.preprocess,
            self._encode_image,
            batch_size=self.batch_size,
            device=self.device,
            dtype=torch.float32,
        )

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            with torch.inference_mode():
                chunks.append(self._encode_text(list(texts[start : start + self.batch_size])).float().cpu())
        return torch.cat(chunks)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return cosine_matrix(a, b)


class OpenClipEmbedder(_ClipBase):
    """An open_clip model (default ViT-B-32 with OpenAI weights, as most DreamBench numbers use).

    Args:
        model: an open_clip architecture name (`open_clip.list_models()`), `hf-hub:org/repo`, or a
            local folder holding `open_clip_config.json` and the weights.
        pretrained: a pretrained tag (`open_clip.list_pretrained()`), a local checkpoint file, or
            None for random weights (tests).
        device: where the model runs; features come back on the CPU as float32.
        batch_size: images (or prompts) per forward pass.

    Example:
        >>> clip = OpenClipEmbedder("ViT-B-32", "/models/vit-b-32-openai/open_clip_pytorch_model.bin")
    """

    def __init__(
        self,
        model: str = DEFAULT_OPEN_CLIP[0],
        pretrained: str | None = DEFAULT_OPEN_CLIP[1],
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ):
        super().__init__(device, batch_size)
        import open_clip

        name = f"local-dir:{model}" if Path(model).is_dir() else model
        if ":" not in name and name not in open_clip.list_models():
            import difflib

            near = difflib.get_close_matches(name, open_clip.list_models(), n=5)
            raise ModelLoadError(
                f"open_clip has no architecture {model!r}; close names: {', '.join(near) or 'none'} "
                "(all: open_clip.list_models()). Pass --clip-model NAME, or a local folder with open_clip_config.json."
            )
        if pretrained and _looks_like_path(pretrained) and not Path(pretrained).is_file():
            # open_clip would take a missing file for a hub tag and retry the hub for a minute.
            raise model_load_error(
                "open_clip CLIP",
                f"{model} / {pretrained}",
                "--clip-pretrained /path/to/checkpoint",
                "pip install open-clip-torch",
                FileNotFoundError(f"no such file: {pretrained}"),
            )
        try:
            self.net, _, _ = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=self.device
            )
        except _LOAD_ERRORS as exc:
            raise model_load_error(
                "open_clip CLIP",
                f"{model} / {pretrained}",
                "--clip-pretrained /path/to/open_clip_pytorch_model.bin (or --clip-model /path/to/folder)",
                "pip install open-clip-torch",
                exc,
            ) from exc
        self.net.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        cfg = open_clip.get_model_preprocess_cfg(self.net)
        size = cfg["size"][0] if isinstance(cfg["size"], tuple | list) else cfg["size"]
        if cfg.get("resize_mode", "shortest") not in ("shortest", "squash"):
            raise ModelLoadError(
                f"open_clip model {model!r} asks for resize mode {cfg['resize_mode']!r}, which pimg does not "
                "implement ('shortest' and 'squash' are). Use another CLIP model."
            )
        self.preprocess = Preprocess(
            size,
            size,
            tuple(cfg["mean"]),
            tuple(cfg["std"]),
            cfg.get("interpolation", "bicubic"),
            cfg.get("resize_mode", "shortest"),
        )
        self.description = {
            "backend": "open_clip",
            "model": model,
            "pretrained": pretrained,
            "preprocess": self.preprocess.describe(),
        }

    def _encode_image(self, pixels):
        return self.net.encode_image(pixels)

    def _encode_text(self, texts):
        return self.net.encode_text(self.tokenizer(texts).to(self.device))


def _clip_preprocess(model: str, image_size: int) -> Preprocess:
    """The `CLIPImageProcessor` settings saved with a transformers CLIP, as a `Preprocess`."""
    from transformers import CLIPImageProcessor

    if Path(model).is_dir() and not (Path(model) / "preprocessor_config.json").is_file():
        # Every CLIP released with transformers ships this file; without it, CLIP's own constants.
        return Preprocess(image_size, image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic")
    processor = CLIPImageProcessor.from_pretrained(model)

    def get(size, key):
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    resize = get(processor.size, "shortest_edge") or image_size
    crop = get(processor.crop_size, "height") or resize
    resample = int(getattr(processor.resample, "value", processor.resample))
    return Preprocess(
        int(resize),
        int(crop),
        tuple(processor.image_mean),
        tuple(processor.image_std),
        {3: "bicubic", 2: "bilinear"}.get(resample, "bicubic"),
    )


class TransformersClipEmbedder(_ClipBase):
    """A transformers `CLIPModel` from a hub id or a local folder, with its saved image processor.

    Example:
        >>> clip = TransformersClipEmbedder("/models/clip-vit-base-patch32")
    """

    flag = "--clip-model /path/to/clip-folder"

    def __init__(
        self,
        model: str = DEFAULT_TRANSFORMERS_CLIP,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        tokenizer_folder: str | Path | None = None,
        preprocess: Preprocess | None = None,
    ):
        super().__init__(device, batch_size)
        from transformers import AutoTokenizer, CLIPModel

        if is_missing_local_path(str(model)):
            raise model_load_error(
                "CLIP model",
                str(model),
                self.flag,
                "pip install transformers",
                FileNotFoundError("no such folder"),
            )
        try:
            self.net = CLIPModel.from_pretrained(str(model), dtype=torch.float32).eval().to(self.device)
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder or model))
        except _LOAD_ERRORS as exc:
            raise model_load_error(
                "CLIP model", str(model), self.flag, "pip install transformers", exc
            ) from exc
        image_size = self.net.config.vision_config.image_size
        if preprocess is None:
            try:
                preprocess = _clip_preprocess(str(model), image_size)
            except _LOAD_ERRORS as exc:
                raise model_load_error(
                    "CLIP image processor", str(model), self.flag, "pip install transformers", exc
                ) from exc
        if preprocess.crop != image_size:
            raise ModelLoadError(
                f"CLIP {model!r} takes {image_size} px images but its preprocessing crops {preprocess.crop} px."
            )
        self.preprocess = preprocess
        self.description = {
            "backend": "transformers",
            "model": str(model),
            "preprocess": preprocess.describe(),
        }

    def _encode_image(self, pixels):
        return _pooled(self.net.get_image_features(pixel_values=pixels))

    def _encode_text(self, texts):
        tokens = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.device)
        return _pooled(
            self.net.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        )


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns the projected features as `pooler_output`; 4.x returned the tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def toy_clip_folder(model: str | Path = "tiny") -> Path:
    """The CLIP folder of a toy-world model: `tiny`, a model folder holding `clip/`, or `clip/` itself."""
    if str(model) == "tiny":
        from pimg.models import BUILTIN_MODELS

        model = BUILTIN_MODELS["tiny"].folder
    folder = Path(model)
    for candidate in (folder / "clip", folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelLoadError(
        f"no toy-world CLIP at {folder} (expected {folder / 'clip' / 'config.json'}). Pass a tiny model folder "
        "(the one holding model_index.json and clip/) with --clip-model, or train one with "
        "`pimg toyworld train-base`."
    )


class ToyClipEmbedder(TransformersClipEmbedder):
    """The toy world's CLIP (a tiny `CLIPModel` saved under a tiny model's `clip/` folder).

    Toy images are 64x64 and go in unresized, scaled to [-1, 1] (mean 0.5, std 0.5), as in its
    training; larger photos are shrunk to 64 px first.

    Example:
        >>> clip = ToyClipEmbedder("tiny")
    """

    flag = "--clip-model /path/to/tiny-model-folder"

    def __init__(
        self, model: str | Path = "tiny", *, device: str | torch.device = "cpu", batch_size: int = 64
    ):
        folder = toy_clip_folder(model)
        tokenizer = folder if (folder / "tokenizer_config.json").is_file() else folder.parent / "tokenizer"
        super().__init__(
            str(folder),
            device=device,
            batch_size=batch_size,
            tokenizer_folder=tokenizer,
            preprocess=TOY_CLIP_64,
        )
        self.description = {"backend": "toy", "model": str(model), "preprocess": TOY_CLIP_64.describe()}


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.endswith((".bin", ".pt", ".pth", ".safetensors"))
