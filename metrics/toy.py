"""Toy-world subject fidelity, read by the toy world's pixel checker (SPEC.md, "subject fidelity").

The feature of an image is the palette histogram of its object pixels; two images are compared by
histogram intersection (1 = the same colours in the same shares). This is exact where CLIP and DINO
are learned, so on the toy world it is the ground truth the learned metrics are checked against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pimg.metrics.images import ImageLike, load_image


class ToyFidelityEmbedder:
    """Palette histograms of object pixels, compared by histogram intersection.

    References may also be toy-world `Subject`s, which stand for their canonical reference histogram.

    Example:
        >>> fidelity = ImageSimilarity("toy-fidelity", ToyFidelityEmbedder())
        >>> fidelity.score(generated, [EVAL_SUBJECTS["ringed_star_rgb"]])
    """

    description = {"backend": "checker", "model": "toy-world pixel checker"}

    def features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        from pimg.toyworld.checker import colour_histogram, object_mask, read_background
        from pimg.toyworld.subjects import Subject, reference_histogram

        rows = []
        for image in images:
            if isinstance(image, Subject):
                rows.append(reference_histogram(image))
                continue
            pixels = np.asarray(load_image(image))
            rows.append(colour_histogram(pixels, object_mask(pixels, read_background(pixels))))
        return torch.from_numpy(np.stack(rows)).float()

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Histogram intersection sum_k min(a_ik, b_jk) -> [A, B]."""
        return torch.minimum(a[:, None, :], b[None, :, :]).sum(-1)
