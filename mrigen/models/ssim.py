"""SSIM and MS-SSIM as torchmetrics defines them, computed with a separable Gaussian window.

The loss's SSIM term (`TrainConfig.ssim_weight`) used torchmetrics' `structural_similarity_index_measure`, which
convolves with the full 11x11 window; its backward pass made a CPU epoch about four times slower. Two 11-tap passes
give the same value (same window, reflect padding, variance clamp and full-map mean; tested against torchmetrics)
at about a twentieth of the cost, forward and backward (measured: 32 images of 64 px, one thread). The evaluation
metrics (mrigen.metrics.recon) use the same two functions, MS-SSIM included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gaussian_ms_ssim", "gaussian_ssim"]

SIGMA = 1.5
WINDOW = 11          # torchmetrics' window for sigma 1.5: int(3.5 * sigma + 0.5) * 2 + 1
K1, K2 = 0.01, 0.03


def _window(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    d = torch.arange(WINDOW, device=device, dtype=dtype) - (WINDOW - 1) / 2
    g = torch.exp(-(d / SIGMA).square() / 2)
    return g / g.sum()


def _ssim_maps(preds: torch.Tensor, target: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM and contrast-structure maps, each (B, C, H, W), of (B, C, H, W) pairs (reflect padding)."""
    c = preds.shape[1]
    pad = (WINDOW - 1) // 2
    g = _window(preds.device, preds.dtype)
    stack = torch.cat([preds, target, preds * preds, target * target, preds * target], dim=1)   # (B, 5C, H, W)
    stack = F.pad(stack, (pad, pad, pad, pad), mode="reflect")
    n = stack.shape[1]
    stack = F.conv2d(stack, g.view(1, 1, 1, WINDOW).expand(n, 1, 1, WINDOW), groups=n)
    stack = F.conv2d(stack, g.view(1, 1, WINDOW, 1).expand(n, 1, WINDOW, 1), groups=n)
    mu_p, mu_t, pp, tt, pt = stack.split(c, dim=1)
    var_p = (pp - mu_p.square()).clamp_min(0.0)
    var_t = (tt - mu_t.square()).clamp_min(0.0)
    cov = pt - mu_p * mu_t
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    cs_map = (2 * cov + c2) / (var_p + var_t + c2)
    return ((2 * mu_p * mu_t + c1) / (mu_p.square() + mu_t.square() + c1)) * cs_map, cs_map


def _check(preds: torch.Tensor, target: torch.Tensor) -> None:
    if preds.shape != target.shape or preds.dim() != 4:
        raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must both be (B, C, H, W)")


def gaussian_ssim(preds: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM of each image pair, differentiable: (B, C, H, W) x2 -> (B,), H and W > 5 (the reflect padding).

    Equals torchmetrics' `structural_similarity_index_measure(preds, target, data_range=data_range,
    reduction="none")` (Gaussian window sigma 1.5, k1 0.01, k2 0.03) up to float rounding.
    """
    _check(preds, target)
    ssim_map, _ = _ssim_maps(preds, target, data_range)
    return ssim_map.reshape(preds.shape[0], -1).mean(-1)


def gaussian_ms_ssim(preds: torch.Tensor, target: torch.Tensor, betas: tuple[float, ...],
                     data_range: float = 1.0) -> torch.Tensor:
    """MS-SSIM of each image pair: (B, C, H, W) x2 -> (B,), one scale per beta (finest first).

    Equals torchmetrics' `multiscale_structural_similarity_index_measure(preds, target, data_range=data_range,
    betas=betas, normalize="relu", reduction="none")` up to float rounding: at each scale but the last the
    contrast-structure term (its map without the 5-px border, clipped at 0), at the last the SSIM (clipped at 0),
    each to the power of its beta; images are 2x2 average-pooled between scales. The side at the coarsest scale
    must exceed 10 px.
    """
    _check(preds, target)
    if not betas:
        raise ValueError("betas must hold one weight per scale")
    pad = (WINDOW - 1) // 2
    if min(preds.shape[-2:]) // 2 ** (len(betas) - 1) <= 2 * pad:
        raise ValueError(f"{len(betas)} scales need images larger than {2 * pad * 2 ** (len(betas) - 1)} px; "
                         f"got {tuple(preds.shape[-2:])}")
    out = torch.ones(preds.shape[0], device=preds.device, dtype=preds.dtype)
    for scale, beta in enumerate(betas):
        ssim_map, cs_map = _ssim_maps(preds, target, data_range)
        if scale == len(betas) - 1:
            term = ssim_map.reshape(preds.shape[0], -1).mean(-1)
        else:
            term = cs_map[..., pad:-pad, pad:-pad].reshape(preds.shape[0], -1).mean(-1)
            preds, target = F.avg_pool2d(preds, 2), F.avg_pool2d(target, 2)
        out = out * term.clamp_min(0.0) ** beta
    return out
