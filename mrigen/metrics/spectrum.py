"""High-frequency power inside the brain: how sharp (or noisy) a set of slices is, compared with real ones.

Decoders trained on pixel losses draw soft slices: the fine detail they cannot place exactly they average away,
and the power of the image's finest spatial frequencies drops. The feature network's distances barely see this
(docs/METRICS.md: a VQ-VAE whose samples a person calls soft at once scored `fd_ratio` 1.40 against 1.24 for
real slices), so the loss is measured directly: the mean power spectrum of the brain interior, summed over the
upper half of the frequency range, of one set of slices divided by the same for held-out real slices.

`hf_ratio` ~1 for real slices of other subjects, < 1 for softer slices (blur, washed-out contrast), > 1 for
noisier ones (noise, checkerboards, wrong-token specks). Smooth low-frequency failures (intensity blotches, a
missing piece of rim) leave it unchanged: it is a sharpness gauge, not a realism score.
"""

from __future__ import annotations

import math

import torch

from .pretext import gaussian_blur, head_masks

__all__ = ["HF_BAND", "WINDOW_TAPER", "hf_power", "hf_ratio"]

HF_BAND = (0.25, 0.5)   # radial spatial frequencies counted, cycles per pixel (0.5 = Nyquist): periods of 2-4 px
WINDOW_TAPER = 1 / 32   # the interior mask is softened by a Gaussian of sigma = this x side (2 px at 64 px)


def _check(name: str, images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[0] == 0 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"{name} must be non-empty square (N, 1, H, W) images; got shape {tuple(images.shape)}")
    if images.shape[-1] < 8:
        raise ValueError(f"{name}: images of side {images.shape[-1]} px are too small for a power spectrum (>= 8)")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} contain NaN or inf")


@torch.no_grad()
def hf_power(images: torch.Tensor, *, batch_size: int = 256) -> float:
    """Mean power per pixel at spatial frequencies in `HF_BAND`, inside each slice's brain interior.

    Per image: the interior mask of `head_masks` (the head without its rim, so the skull outline's edge is not
    counted; the window still reaches ~2 sigma beyond it, short of the rim), kept 3 sigma from the frame edge and
    softened into a window (`WINDOW_TAPER`) so its border adds no frequencies of its own; the windowed
    image minus its windowed mean is Fourier-transformed, and |F|^2 / sum(window^2) is averaged over the band.
    Images whose interior is empty contribute 0 (they show no detail).

    Args:
        images: `(N, 1, H, W)` in [0, 1], square, H >= 8.
        batch_size: images per FFT.

    Returns:
        The mean over the N images (intensity units squared); 0 only for images without interior detail.
    """
    _check("images", images)
    side = images.shape[-1]
    freq = torch.fft.fftfreq(side, device=images.device)
    radius = torch.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)                 # (H, W) cycles per pixel
    band = (radius >= HF_BAND[0]) & (radius <= HF_BAND[1])
    sigma = side * WINDOW_TAPER
    margin = math.ceil(3 * sigma)
    total = 0.0
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].float()
        b = x.shape[0]
        _, _, interior = head_masks(x)
        interior[..., :margin, :] = 0                # a head that reaches the frame edge: keep the window off
        interior[..., -margin:, :] = 0               # it, or the FFT's wrap-around adds an edge of its own
        interior[..., :, :margin] = 0
        interior[..., :, -margin:] = 0
        window = gaussian_blur(interior, torch.full((b,), sigma))                  # (b, 1, H, W) in [0, 1]
        weight = window.sum((-2, -1), keepdim=True)
        mean = (x * window).sum((-2, -1), keepdim=True) / weight.clamp_min(1e-6)
        power = torch.fft.fft2(((x - mean) * window)[:, 0]).abs() ** 2             # (b, H, W)
        energy = (window ** 2).sum((-2, -1))[:, 0]                                   # (b,)
        per_image = power[:, band].mean(1) / energy.clamp_min(1e-6)
        total += float(torch.where(energy > 1e-6, per_image, torch.zeros_like(per_image)).double().sum())
    return total / images.shape[0]


def hf_ratio(images: torch.Tensor, reference: torch.Tensor, *, batch_size: int = 256) -> float:
    """`hf_power(images) / hf_power(reference)`: 1 as sharp as the reference, < 1 softer, > 1 noisier.

    Args:
        images: `(N, 1, H, W)` in [0, 1] (samples, reconstructions, or a real baseline).
        reference: `(M, 1, H, W)` real slices of the same side.
        batch_size: images per FFT.

    Returns:
        A float >= 0.
    """
    _check("reference", reference)
    if images.shape[-2:] != reference.shape[-2:]:
        raise ValueError(f"image sides differ: images {tuple(images.shape)}, reference {tuple(reference.shape)}")
    ref = hf_power(reference, batch_size=batch_size)
    if ref <= 0.0:
        raise ValueError("reference slices have no high-frequency power inside a brain (blank or constant images?)")
    return hf_power(images, batch_size=batch_size) / ref
