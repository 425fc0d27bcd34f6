"""Training-batch augmentation on the device: left-right flips and whole-pixel translations.

Brains are roughly left-right symmetric, and a head's position in the field of view varies between scans, so both
give new, still realistic slices. Translations move by whole pixels (nearest sampling): no interpolation blur that
a generator would learn to reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["AUGMENTATIONS", "MAX_SHIFT", "augment_batch"]

AUGMENTATIONS = ("none", "flip", "flip_shift")
MAX_SHIFT = 1 / 16  # largest translation, as a fraction of the side (4 px at 64 px, 8 px at 128 px)


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augment a batch: each image is flipped left-right with probability 1/2 ("flip"), and also translated by a
    random whole number of pixels up to MAX_SHIFT of the side in each direction, zeros filling in ("flip_shift").

    Args:
        x: (B, 1, H, W) images on any device.
        mode: one of AUGMENTATIONS; "none" returns x itself.
        generator: RNG on x's device (the loop passes its per-epoch generator, so resume stays exact).

    Returns:
        (B, 1, H, W), same dtype and device.
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augment={mode!r} is not valid; allowed: {', '.join(map(repr, AUGMENTATIONS))}")
    if mode == "none":
        return x
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects (B, C, H, W), got {tuple(x.shape)}")
    b, _, h, w = x.shape
    flip = torch.rand(b, device=x.device, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if mode == "flip_shift":
        max_px = max(1, round(MAX_SHIFT * min(h, w)))
        shifts = torch.randint(-max_px, max_px + 1, (b, 2), device=x.device, generator=generator).float()
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = shifts[:, 0] * 2.0 / w  # normalised coordinates: 2 / W per pixel
        theta[:, 1, 2] = shifts[:, 1] * 2.0 / h
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).to(x.dtype)
    return x
