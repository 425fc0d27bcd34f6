"""Reconstruction metrics: SSIM, PSNR and MS-SSIM per image, then averaged.

SSIM and MS-SSIM are torchmetrics' definitions (Gaussian window, reflect padding, "relu" MS-SSIM), computed with a
separable window by mrigen.models.ssim (tested equal to torchmetrics, about 2.5x faster); PSNR is torchmetrics'.

All images are `(B, 1, H, W)` in `[0, 1]` (data range 1). Every metric is computed per image and the per-image
values are averaged, so a batch of easy images cannot hide one bad reconstruction behind a pooled MSE.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from mrigen.models.ssim import SIGMA, WINDOW, gaussian_ms_ssim, gaussian_ssim

from .spectrum import hf_power

__all__ = [
    "MS_SSIM_BETAS",
    "PSNR_CAP_DB",
    "SSIM_KERNEL_SIZE",
    "SSIM_SIGMA",
    "image_metrics",
    "ms_ssim_betas",
    "ms_ssim_per_image",
    "psnr_per_image",
    "recon_metrics",
    "ssim_per_image",
]

SSIM_KERNEL_SIZE = WINDOW    # Gaussian window of Wang et al. (2004), 11 px, used at every scale
SSIM_SIGMA = SIGMA           # its standard deviation in pixels, 1.5
PSNR_CAP_DB = 100.0          # per-image PSNR ceiling: identical images (MSE 0, PSNR inf) count as 100 dB
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)   # Wang et al. (2003) scale weights, finest first


def _check_pair(preds: torch.Tensor, target: torch.Tensor) -> None:
    """Raise ValueError unless both are finite `(B, 1, H, W)` tensors of one shape."""
    if preds.ndim != 4 or preds.shape[1] != 1:
        raise ValueError(f"images must be (B, 1, H, W); got preds of shape {tuple(preds.shape)}")
    if preds.shape != target.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
    if preds.shape[0] == 0:
        raise ValueError("cannot compute metrics of an empty batch (B = 0)")
    if not bool(torch.isfinite(preds).all()):
        raise ValueError("preds contain NaN or inf (did the model diverge?)")
    if not bool(torch.isfinite(target).all()):
        raise ValueError("target contains NaN or inf")


def ms_ssim_betas(size: int) -> tuple[float, ...] | None:
    """Scale weights of MS-SSIM for a square image of side `size`, or None when no multi-scale fits.

    The standard five scales need a side of at least 176 px with the 11-px window (torchmetrics' bound), so
    smaller images use the first `s` scales, `s` as large as fits, with their betas renormalised to sum to 1:
    256 px -> 5 scales, 128 -> 4, 64 -> 3, 32 -> 2. A scale fits when torchmetrics accepts it and the
    coarsest scale still holds a whole window (side / 2**(s-1) >= 11). Below two scales (side < 22) there is
    no MS-SSIM: None, and callers omit the `ms_ssim` key.

    Args:
        size: image side in pixels.

    Returns:
        A tuple of `s >= 2` positive floats summing to 1, finest scale first; or None.
    """
    for scales in range(len(MS_SSIM_BETAS), 1, -1):
        torchmetrics_ok = size >= 2**scales and size // (scales - 1) ** 2 > SSIM_KERNEL_SIZE - 1
        window_fits = size // 2 ** (scales - 1) >= SSIM_KERNEL_SIZE
        if torchmetrics_ok and window_fits:
            kept = MS_SSIM_BETAS[:scales]
            return tuple(float(b / sum(kept)) for b in kept)
    return None


def ssim_per_image(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of each image pair (Gaussian window 11 px, sigma 1.5, data range 1).

    Args:
        preds: `(B, 1, H, W)` in [0, 1].
        target: `(B, 1, H, W)` in [0, 1].

    Returns:
        `(B,)` float32 in [-1, 1]; 1 for identical images.
    """
    _check_pair(preds, target)
    return gaussian_ssim(preds.float(), target.float(), data_range=1.0)


def psnr_per_image(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR of each image pair in dB (data range 1), capped at `PSNR_CAP_DB` so identical images stay finite.

    Args:
        preds: `(B, 1, H, W)` in [0, 1].
        target: `(B, 1, H, W)` in [0, 1].

    Returns:
        `(B,)` float32, at most `PSNR_CAP_DB`.
    """
    _check_pair(preds, target)
    psnr = peak_signal_noise_ratio(preds.float(), target.float(), data_range=1.0, reduction="none", dim=(1, 2, 3))
    return torch.clamp(psnr, max=PSNR_CAP_DB)   # MSE 0 gives +inf: explicitly capped, never averaged as inf


def ms_ssim_per_image(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of each image pair, with the scales `ms_ssim_betas(H)` picks.

    Contrast/structure terms are clipped at 0 before the fractional powers ("relu" normalisation), so the
    result is NaN-free and lies in [0, 1].

    Args:
        preds: `(B, 1, H, W)` in [0, 1], H = W.
        target: `(B, 1, H, W)` in [0, 1].

    Returns:
        `(B,)` float32 in [0, 1]; 1 for identical images.

    Raises:
        ValueError: if the images are too small for two scales (see `ms_ssim_betas`).
    """
    _check_pair(preds, target)
    betas = ms_ssim_betas(min(preds.shape[-2:]))
    if betas is None:
        raise ValueError(f"images of {tuple(preds.shape[-2:])} px are too small for MS-SSIM (need >= 22 px)")
    return gaussian_ms_ssim(preds.float(), target.float(), betas, data_range=1.0)


def image_metrics(preds: torch.Tensor, target: torch.Tensor, *, ms_ssim: bool = False) -> dict[str, torch.Tensor]:
    """Per-image reconstruction metrics of one batch.

    Args:
        preds: `(B, 1, H, W)` in [0, 1].
        target: `(B, 1, H, W)` in [0, 1].
        ms_ssim: also compute MS-SSIM when the size allows it (the key is omitted otherwise).

    Returns:
        {"ssim": (B,), "psnr": (B,)[, "ms_ssim": (B,)]} float32 tensors on the input device.
    """
    out = {"ssim": ssim_per_image(preds, target), "psnr": psnr_per_image(preds, target)}
    if ms_ssim and ms_ssim_betas(min(preds.shape[-2:])) is not None:
        out["ms_ssim"] = ms_ssim_per_image(preds, target)
    return out


@torch.no_grad()
def recon_metrics(
    model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 256, ms_ssim: bool = False,
    attrs: torch.Tensor | None = None, spectrum: bool = False,
) -> dict[str, float]:
    """Mean per-image reconstruction quality of `model.reconstruct` on `images` (the per-epoch cheap path).

    Runs in eval mode without gradients and restores the model's previous train/eval mode afterwards.

    Args:
        model: anything with `reconstruct(x: (B, 1, H, W)) -> (B, 1, H, W)` (the Model contract).
        images: `(N, 1, H, W)` in [0, 1], on the model's device.
        batch_size: images per `reconstruct` call.
        ms_ssim: also report `ms_ssim` when the size allows it.
        attrs: `(N, A)` encoded attributes for a conditional VAE (`reconstruct(x, attrs)`); None otherwise.
        spectrum: also report `recon_hf_ratio`, the reconstructions' high-frequency power over the originals'
            (`mrigen.metrics.spectrum`: < 1 means the decoder draws softer slices than it is given).

    Returns:
        {"ssim": float, "psnr": float[, "ms_ssim": float][, "recon_hf_ratio": float]}: means over the N images.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, 1, H, W) tensor; got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    try:
        sums: dict[str, float] = {}
        power = {"recon": 0.0, "real": 0.0}
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size]
            recon = model.reconstruct(x) if attrs is None else model.reconstruct(x, attrs[start:start + batch_size])
            for name, values in image_metrics(recon, x, ms_ssim=ms_ssim).items():
                sums[name] = sums.get(name, 0.0) + float(values.double().sum())
            if spectrum:
                power["recon"] += hf_power(recon.float()) * x.shape[0]    # finite: image_metrics checked it
                power["real"] += hf_power(x.float()) * x.shape[0]
    finally:
        model.train(was_training)
    out = {name: total / images.shape[0] for name, total in sums.items()}
    if spectrum:
        if power["real"] <= 0.0:
            raise ValueError("images have no high-frequency power inside a brain: recon_hf_ratio is undefined")
        out["recon_hf_ratio"] = power["recon"] / power["real"]
    return out
