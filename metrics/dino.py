"""DINO subject fidelity: cosine of self-supervised ViT-S/16 CLS embeddings (Caron et al., ICCV 2021).

DreamBooth (Ruiz et al., CVPR 2023, Sec. 4.1) prefers DINO to CLIP-I for subject fidelity because a
self-supervised model separates instances of the same class, where CLIP maps them together. The
protocol here is the paper's: ViT-S/16, CLS token of the last layer (after the final layer norm),
resize 256 bicubic, centre crop 224, ImageNet mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pimg.metrics.base import cosine_matrix, embed_in_batches, is_missing_local_path, model_load_error
from pimg.metrics.images import DINO_224, ImageLike

DEFAULT_DINO = "facebook/dino-vits16"


class DinoEmbedder:
    """A DINO ViT loaded with transformers' `ViTModel` from a hub id or a local folder.

    Args:
        model: hub id (default `facebook/dino-vits16`) or a folder saved with `save_pretrained`.
        device: where the model runs; features come back on the CPU as float32.
        batch_size: images per forward pass.

    Example:
        >>> dino = DinoEmbedder("/models/dino-vits16")
        >>> dino.similarity(dino.features(["a.png"]), dino.features(["b.jpg", "c.jpg"]))
    """

    preprocess = DINO_224

    def __init__(
        self, model: str | Path = DEFAULT_DINO, *, device: str | torch.device = "cpu", batch_size: int = 32
    ):
        from transformers import ViTModel

        self.device = torch.device(device)
        self.batch_size = batch_size
        if is_missing_local_path(str(model)):
            raise model_load_error(
                "DINO model",
                str(model),
                "--dino-model /path/to/dino-vits16",
                "pip install transformers",
                FileNotFoundError("no such folder"),
            )
        try:
            # No pooler: DINO's embedding is the CLS token itself, and its checkpoints carry no pooler.
            self.net = ViTModel.from_pretrained(str(model), add_pooling_layer=False, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as exc:
            raise model_load_error(
                "DINO model", str(model), "--dino-model /path/to/dino-vits16", "pip install transformers", exc
            ) from exc
        self.net.eval().to(self.device)
        self.description = {
            "backend": "transformers",
            "model": str(model),
            "preprocess": self.preprocess.describe(),
        }

    def _cls(self, pixels: torch.Tensor) -> torch.Tensor:
        # A model trained at another resolution still embeds 224 px crops: positions are interpolated.
        interpolate = pixels.shape[-1] != self.net.config.image_size
        return self.net(pixel_values=pixels, interpolate_pos_encoding=interpolate).last_hidden_state[:, 0]

    def features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        return embed_in_batches(
            images,
            self.preprocess,
            self._cls,
            batch_size=self.batch_size,
            device=self.device,
            dtype=torch.float32,
        )

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return cosine_matrix(a, b)
