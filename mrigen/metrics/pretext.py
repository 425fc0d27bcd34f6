"""Pretext tasks the feature network learns from: targets from slice metadata, and input degradations.

The degradations are the ways generators fail (docs/METRICS.md): blur, noise, smooth intensity blotches inside
the head, broken skull/scalp rims, transposed-convolution checkerboards, a washed-out interior, and wrong-token
patches (cells of a VQ code grid showing another place's content: dark holes in the brain, bright specks in the
background, gaps in the rim). The feature network must say which one (if any) an input carries, so its features
move when a sample shows one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["AuxTargets", "BLOTCH_AMP", "BLUR_SIGMA", "CHECKER_AMP", "CONTRAST_GAIN", "DEGRADATIONS", "NOISE_STD",
           "PATCH_EDGE", "PATCH_GRIDS", "PATCH_SHARE",
           "apply_degradation", "aux_targets", "degrade", "gaussian_blur", "head_masks"]

# Class index = position in this tuple.
DEGRADATIONS = ("clean", "blur", "noise", "blotch", "rim", "checker", "contrast", "patches")
BLUR_SIGMA = (0.6, 1.5)       # Gaussian blur sigma range, pixels of the feature net input
NOISE_STD = (0.02, 0.06)      # additive Gaussian noise std range, intensity units (images in [0, 1])
BLOTCH_AMP = (0.15, 0.35)     # peak intensity change of a blob (twice the std of a blotch field) in the head
CHECKER_AMP = (0.03, 0.10)    # amplitude of the periodic 2x2 / 4x4 pattern
CONTRAST_GAIN = (0.35, 0.75)  # interior contrast is multiplied by this (1 = unchanged)
PATCH_SHARE = (0.02, 0.12)    # share of the head's grid cells that show another cell's content
PATCH_GRIDS = (16, 32)        # cells per side (a VQ-VAE code grid); cells of fewer than 2 px are not used
PATCH_EDGE = (0.3, 1.0)       # Gaussian sigma (px) that softens the replaced cells' edges
_FOREGROUND = 0.08            # intensity above which a pixel counts as head (background sits near 0)


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


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion of a `(B, 1, H, W)` float mask by a square of side 2*radius+1 (separable)."""
    k = 2 * radius + 1
    grown = F.max_pool2d(1.0 - mask, (1, k), stride=1, padding=(0, radius))
    return 1.0 - F.max_pool2d(grown, (k, 1), stride=1, padding=(radius, 0))


def head_masks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head, rim and interior masks of slices with a dark background.

    The head is every pixel with foreground on all four sides along its row and column (a hole-free fill of the
    thresholded image, exact for convex outlines); the rim is the outer band of the head, about 1/16 of the side
    wide (the bright scalp and dark skull ring); the interior is the head without a band 1.5 times as wide.

    Args:
        x: `(B, 1, H, W)` in [0, 1].

    Returns:
        (head, rim, interior): `(B, 1, H, W)` float {0, 1} masks.
    """
    fg = (F.avg_pool2d(x.float(), 3, stride=1, padding=1, count_include_pad=False) > _FOREGROUND).float()
    left, right = fg.cummax(-1).values, fg.flip(-1).cummax(-1).values.flip(-1)
    up, down = fg.cummax(-2).values, fg.flip(-2).cummax(-2).values.flip(-2)
    head = left * right * up * down
    band = max(1, round(min(x.shape[-2:]) / 16))
    rim = head * (1.0 - _erode(head, band))
    interior = _erode(head, band + max(1, band // 2))
    return head, rim, interior


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur: `(B, 1, H, W)`, sigma `(B,)` pixels -> `(B, 1, H, W)`."""
    b, _, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g1 = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)       # (B, k)
    g1 = (g1 / g1.sum(1, keepdim=True)).to(x.device)
    padded = F.pad(x.reshape(1, b, h, w), (radius,) * 4, mode="replicate")          # (1, B, H+2r, W+2r)
    rows = F.conv2d(padded, g1[:, None, None, :], groups=b)                          # (1, B, H+2r, W)
    return F.conv2d(rows, g1[:, None, :, None], groups=b).reshape(b, 1, h, w)


def _blotches(x: torch.Tensor, interior: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Smooth intensity offsets inside the head, `(B, 1, H, W)`: per image either 1-4 Gaussian blobs of random
    sign, peak amplitude in BLOTCH_AMP (local blotches), or a smooth random field (white noise blurred at
    1/12-1/6 of the side, std half of BLOTCH_AMP: patchy shading all over the brain)."""
    b, _, h, w = x.shape
    n_blobs = 4
    yy = torch.linspace(0, 1, h)[None, None, :, None]
    xx = torch.linspace(0, 1, w)[None, None, None, :]
    cy, cx = _uniform(b * n_blobs, 0.25, 0.75, gen), _uniform(b * n_blobs, 0.25, 0.75, gen)
    radius = _uniform(b * n_blobs, 0.04, 0.14, gen)
    sign = 2 * torch.randint(0, 2, (b * n_blobs,), generator=gen) - 1
    amp = _uniform(b * n_blobs, *BLOTCH_AMP, gen) * sign
    keep = (torch.arange(n_blobs)[None, :] < torch.randint(1, n_blobs + 1, (b, 1), generator=gen)).reshape(-1)
    shape = (b, n_blobs, 1, 1)
    blobs = torch.exp(-((yy - cy.reshape(shape)) ** 2 + (xx - cx.reshape(shape)) ** 2)
                      / (2 * radius.reshape(shape) ** 2))                    # (B, n_blobs, H, W)
    local = (blobs * (amp * keep).reshape(shape)).sum(1, keepdim=True)       # (B, 1, H, W)
    lo_h, lo_w = max(2, h // 4), max(2, w // 4)                             # smooth field: blur at 1/4 size
    field = gaussian_blur(torch.randn(b, 1, lo_h, lo_w, generator=gen),
                          _uniform(b, min(h, w) / 48, min(h, w) / 24, gen))
    field = F.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)
    field = field / field.flatten(1).std(1).clamp_min(1e-8).reshape(b, 1, 1, 1)         # unit std
    field = field * 0.5 * _uniform(b, *BLOTCH_AMP, gen).reshape(b, 1, 1, 1)
    pick = (torch.rand(b, generator=gen) < 0.5).reshape(b, 1, 1, 1)
    offset = torch.where(pick, local, field).to(x.device)
    return offset * gaussian_blur(interior, torch.full((b,), 1.0))


def _broken_rim(x: torch.Tensor, rim: torch.Tensor, head: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Erase (70%) or displace (30%) the rim in 1-3 angular sectors around the head centre."""
    b, _, h, w = x.shape
    yy = torch.arange(h, dtype=torch.float32, device=x.device)[None, None, :, None]
    xx = torch.arange(w, dtype=torch.float32, device=x.device)[None, None, None, :]
    area = head.sum((-2, -1), keepdim=True).clamp_min(1.0)
    cy, cx = (head * yy).sum((-2, -1), keepdim=True) / area, (head * xx).sum((-2, -1), keepdim=True) / area
    angle = torch.atan2(yy - cy, xx - cx)                                    # (B, 1, H, W) in [-pi, pi]
    n_sectors = 3
    start = _uniform(b * n_sectors, -math.pi, math.pi, gen).reshape(b, n_sectors, 1, 1).to(x.device)
    width = _uniform(b * n_sectors, 0.35, 1.2, gen).reshape(b, n_sectors, 1, 1).to(x.device)   # radians
    keep = (torch.arange(n_sectors)[None, :] < torch.randint(1, n_sectors + 1, (b, 1), generator=gen))
    inside = (torch.remainder(angle - start, 2 * math.pi) < width) & keep.reshape(b, n_sectors, 1, 1).to(x.device)
    sector = inside.any(1, keepdim=True).float() * rim                       # (B, 1, H, W)
    fill = _uniform(b, 0.0, 0.25, gen).reshape(b, 1, 1, 1).to(x.device)
    erased = x * (1 - sector) + fill * sector
    shift = int(max(1, round(min(h, w) / 24)))
    dy, dx = (shift * (2 * int(v) - 1) for v in torch.randint(0, 2, (2,), generator=gen))
    moved = torch.roll(x, (dy, dx), dims=(-2, -1))                          # the whole slice, shifted diagonally
    grown = F.max_pool2d(sector, 2 * shift + 1, stride=1, padding=shift)
    displaced = x * (1 - grown) + moved * grown
    pick = (torch.rand(b, generator=gen) < 0.7).reshape(b, 1, 1, 1).to(x.device)
    return torch.where(pick, erased, displaced)


def _checker(x: torch.Tensor, head: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A periodic +-1 pattern of period 2 (pixel) or 4 (2x2 blocks), random phase, times the head mask."""
    b, _, h, w = x.shape
    ii = torch.arange(h, device=x.device)[None, None, :, None]
    jj = torch.arange(w, device=x.device)[None, None, None, :]
    cell = (2 ** torch.randint(0, 2, (b,), generator=gen)).reshape(b, 1, 1, 1).to(x.device)   # 1 or 2 px
    phase = torch.randint(0, 2, (b, 1, 1, 1), generator=gen).to(x.device)
    pattern = (torch.remainder(ii // cell + jj // cell + phase, 2) * 2 - 1).float()
    amp = _uniform(b, *CHECKER_AMP, gen).reshape(b, 1, 1, 1).to(x.device)
    return amp * pattern * head


def _washed_out(x: torch.Tensor, head: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Head contrast pulled toward its mean (gain in CONTRAST_GAIN), optionally lifted a little."""
    b = x.shape[0]
    soft = gaussian_blur(head, torch.full((b,), 1.0))
    mean = (x * head).sum((-2, -1), keepdim=True) / head.sum((-2, -1), keepdim=True).clamp_min(1.0)
    gain = _uniform(b, *CONTRAST_GAIN, gen).reshape(b, 1, 1, 1).to(x.device)
    lift = _uniform(b, 0.0, 0.08, gen).reshape(b, 1, 1, 1).to(x.device)
    return x + soft * ((mean + gain * (x - mean) + lift) - x)


def _patches(x: torch.Tensor, head: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Wrong-token patches: a share (PATCH_SHARE) of the grid cells touching the head take the content of other
    cells drawn anywhere in the head's neighbourhood (head, rim or background), as when a code prior picks a
    wrong code: dark holes inside the brain, bright specks outside it, gaps in the rim.

    Args:
        x: `(B, 1, H, W)` in [0, 1].
        head: `(B, 1, H, W)` head mask of `x`.
        gen: CPU generator.

    Returns:
        `(B, 1, H, W)`: x with the chosen cells replaced.
    """
    b, _, h, w = x.shape
    grids = [g for g in PATCH_GRIDS if min(h, w) // g >= 2] or [max(1, min(h, w) // 2)]
    grid = grids[int(torch.randint(0, len(grids), (1,), generator=gen))]
    cell = min(h, w) // grid
    hh, ww = (h // cell) * cell, (w // cell) * cell                       # crop to whole cells; the rest stays
    cells = F.unfold(x[..., :hh, :ww], cell, stride=cell)                 # (B, cell*cell, n_cells)
    n_cells = cells.shape[-1]
    near = F.max_pool2d(head[..., :hh, :ww], cell, stride=cell).flatten(1)          # (B, n_cells): touches head
    around = F.max_pool2d(near.reshape(b, 1, hh // cell, ww // cell), 5, stride=1, padding=2).flatten(1)
    share = _uniform(b, *PATCH_SHARE, gen)[:, None]
    pick = (torch.rand(b, n_cells, generator=gen) < share).to(x.device) & (near > 0)      # cells to replace
    # source: a random cell of the head's neighbourhood (`around`), drawn by sorting random keys
    keys = torch.rand(b, n_cells, generator=gen).to(x.device) + (around <= 0).float()   # outside sorts last
    order = keys.argsort(1)                                                              # (B, n_cells)
    n_around = (around > 0).sum(1, keepdim=True).clamp_min(1)
    slot = (torch.rand(b, n_cells, generator=gen).to(x.device) * n_around).long().clamp_max(n_cells - 1)
    src = order.gather(1, slot)                                                          # (B, n_cells)
    moved = cells.gather(2, src[:, None, :].expand_as(cells))
    swapped = F.fold(moved, (hh, ww), cell, stride=cell)                                 # (B, 1, hh, ww)
    mask = F.fold(pick[:, None, :].float().expand(b, cell * cell, n_cells), (hh, ww), cell, stride=cell)
    mask = gaussian_blur(mask, _uniform(b, *PATCH_EDGE, gen))             # decoders draw the patch edges soft or sharp
    out = x.clone()
    out[..., :hh, :ww] = x[..., :hh, :ww] + mask * (swapped - x[..., :hh, :ww])
    return out


def degrade(x: torch.Tensor, gen: torch.Generator,
            masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one random degradation per image, uniformly over `DEGRADATIONS` ("clean" leaves it as is).

    Every random draw is made on the CPU with `gen`, so results do not depend on the device; each kind is
    computed only for the images that drew it.

    Args:
        x: `(B, 1, H, W)` in [0, 1].
        gen: CPU generator driving every random choice (deterministic for a seed).
        masks: `head_masks(x)` when the caller has them (a training loop drawing batches of fixed slices computes
            them once); the result is the same.

    Returns:
        (degraded `(B, 1, H, W)` in [0, 1], kind `(B,)` int64 index into `DEGRADATIONS`) on x's device.
    """
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"degrade expects (B, 1, H, W) images; got shape {tuple(x.shape)}")
    x = x.float()
    kind = torch.randint(0, len(DEGRADATIONS), (x.shape[0],), generator=gen)
    out = x.clone()
    for k, name in enumerate(DEGRADATIONS[1:], start=1):
        idx = (kind == k).nonzero().flatten()
        if len(idx):
            i = idx.to(x.device)
            out[i] = apply_degradation(name, x[i], gen, None if masks is None else tuple(m[i] for m in masks))
    return out.clamp(0.0, 1.0), kind.to(x.device)


def apply_degradation(name: str, x: torch.Tensor, gen: torch.Generator,
                      masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One named degradation (an entry of `DEGRADATIONS`) with random strength per image, unclamped.

    Args:
        name: which degradation.
        x: `(B, 1, H, W)` float in [0, 1].
        gen: CPU generator for the random strengths and positions.
        masks: `head_masks(x)`, computed here when None.

    Returns:
        `(B, 1, H, W)` on x's device (may leave [0, 1]: `degrade` clamps).
    """
    if name not in DEGRADATIONS:
        raise ValueError(f"degradation {name!r} is unknown (allowed: {', '.join(DEGRADATIONS)})")
    b = x.shape[0]
    if name == "clean":
        return x
    if name == "blur":
        return gaussian_blur(x, _uniform(b, *BLUR_SIGMA, gen))
    if name == "noise":
        return x + (_uniform(b, *NOISE_STD, gen).reshape(b, 1, 1, 1) * torch.randn(x.shape, generator=gen)).to(x.device)
    head, rim, interior = head_masks(x) if masks is None else masks
    if name == "blotch":
        return x + _blotches(x, interior, gen)
    if name == "rim":
        return _broken_rim(x, rim, head, gen)
    if name == "checker":
        return x + _checker(x, head, gen)
    if name == "patches":
        return _patches(x, head, gen)
    return _washed_out(x, head, gen)
