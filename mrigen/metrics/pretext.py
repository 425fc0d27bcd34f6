"""Pretext tasks the feature network learns from: targets from slice metadata, and input degradations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["AuxTargets", "BLUR_SIGMA", "DEGRADATIONS", "NOISE_STD", "aux_targets", "degrade"]

DEGRADATIONS = ("clean", "blur", "noise")   # class index = position in this tuple
BLUR_SIGMA = (0.6, 2.0)     # Gaussian blur sigma range, in pixels of the feature net input
NOISE_STD = (0.02, 0.10)    # additive Gaussian noise std range, intensity units (images in [0, 1])


@dataclass(frozen=True)
class AuxTargets:
    """Per-slice targets of the training split.

    Attributes:
        pos: `(N,)` float32 slice position within the band, scaled to [0, 1] (0 when the band has one slice).
        has_pos: whether positions vary (else the position task is dropped).
        site: `(N,)` int64 index into the sorted site names.
        n_sites: number of distinct sites (the site task is dropped when < 2).
    """

    pos: torch.Tensor
    has_pos: bool
    site: torch.Tensor
    n_sites: int


def aux_targets(slices: list[dict[str, Any]], n: int, device: torch.device) -> AuxTargets:
    """Targets from `store.slices("train")`: each row needs `slice_pos` (number) and `site` (str).

    Raises:
        ValueError: if the row count differs from the image count, or a row lacks a key.
    """
    if len(slices) != n:
        raise ValueError(f"store.slices('train') has {len(slices)} rows but the train tensor has {n} images")
    for key in ("slice_pos", "site"):
        missing = [i for i, row in enumerate(slices) if key not in row]
        if missing:
            raise ValueError(f"store.slices('train') row {missing[0]} has no {key!r} key (feature net needs it)")
    pos = torch.tensor([float(row["slice_pos"]) for row in slices], dtype=torch.float32)
    span = float(pos.max() - pos.min()) if n else 0.0
    pos = (pos - pos.min()) / span if span > 0 else torch.zeros_like(pos)
    names = sorted({str(row["site"]) for row in slices})
    lookup = {name: i for i, name in enumerate(names)}
    site = torch.tensor([lookup[str(row["site"])] for row in slices], dtype=torch.int64)
    return AuxTargets(pos=pos.to(device), has_pos=span > 0, site=site.to(device), n_sites=len(names))


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def degrade(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one random degradation per image: none, Gaussian blur or additive Gaussian noise.

    Args:
        x: `(B, 1, H, W)` in [0, 1].
        gen: CPU generator driving every random choice (deterministic for a seed).

    Returns:
        (degraded `(B, 1, H, W)` in [0, 1], kind `(B,)` int64 index into `DEGRADATIONS`) on x's device.
    """
    b, _, h, w = x.shape
    kind = torch.randint(0, len(DEGRADATIONS), (b,), generator=gen)
    sigma = _uniform(b, *BLUR_SIGMA, gen)                                 # (B,) pixels
    radius = math.ceil(3 * BLUR_SIGMA[1])
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g1 = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)       # (B, k)
    g1 = g1 / g1.sum(1, keepdim=True)
    kernel = (g1[:, :, None] * g1[:, None, :])[:, None].to(x.device)       # (B, 1, k, k)
    padded = F.pad(x.float().reshape(1, b, h, w), (radius,) * 4, mode="replicate")   # (1, B, H+2r, W+2r)
    blurred = F.conv2d(padded, kernel, groups=b).reshape(b, 1, h, w)
    std = _uniform(b, *NOISE_STD, gen)[:, None, None, None]
    noise = (std * torch.randn(x.shape, generator=gen)).to(x.device)      # drawn on CPU: same on every device
    noisy = (x.float() + noise).clamp(0.0, 1.0)
    k = kind.to(x.device)[:, None, None, None]
    out = torch.where(k == 1, blurred, torch.where(k == 2, noisy, x.float()))
    return out, kind.to(x.device)
