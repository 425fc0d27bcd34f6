"""Training losses as named terms, every term "summed per image, averaged over the batch".

VAE: negative ELBO = reconstruction (MSE or L1 summed over pixels, + optional SSIM term) + beta * KL, with a KL
annealing factor and optional free bits per latent dimension. Summing per image keeps the reconstruction term on
the same scale as the KL (the thesis's 1000 x mean-MSE + summed KL starved the reconstruction and blurred it).
VQ-VAE: the same reconstruction term plus the quantizer's commitment loss.

Decoder calibration (sigma-VAE, Rybkin et al. 2021): the pixel term is the negative log-likelihood of a Gaussian
(MSE) or Laplace (L1) decoder. `sigma="fixed"` keeps the plain sum of squared errors (sigma^2 = 1/2), which
silently weights the KL against an arbitrary variance and blurs; `"optimal"` sets sigma to its maximum-likelihood
value, the batch's RMS error (mean absolute error for L1); `"learned"` uses the model's `log_sigma` parameter.
Both keep the KL weight at 1 and remove most VAE blur without tuning beta.

Local spectrum term (optional, `spectral_weight`): a pixel loss lets a decoder average away the fine detail it
cannot place exactly, so its slices come out soft (`mrigen.metrics.spectrum` measures it). The term compares the
log amplitude spectra of 16 x 16 Hann-windowed patches (stride 8) of the reconstruction and the input, L1: the
amount of detail in each patch must match, its exact phase need not (the multi-resolution STFT loss of audio
vocoders, on image patches).
All losses are computed in fp32, also when the model ran under bf16 autocast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mrigen.models.ssim import gaussian_ssim
from mrigen.models.vae import VAEOutput
from mrigen.models.vqvae import VQOutput

__all__ = ["RECON_LOSSES", "SIGMAS", "SPECTRUM_PATCH", "LossTerms", "active_units", "kl_per_dim",
           "local_spectrum_distance", "recon_loss", "recon_nll", "vae_loss", "vq_vae_loss"]

RECON_LOSSES = ("mse", "l1")
SIGMAS = ("fixed", "optimal", "learned")
MIN_LOG_SIGMA = -6.0  # soft lower bound on log sigma (Rybkin et al.'s softclip): the NLL stays finite at MSE 0
SPECTRUM_PATCH = 16   # side of the local spectrum term's patches, px (the image side when smaller); stride = half
SPECTRUM_EPS = 1e-2   # added to amplitudes before the log: background patches (amplitude ~0) do not dominate
                      # (brain-interior patches' high-frequency amplitudes are ~0.1 on the demo cohort)


class LossTerms(NamedTuple):
    """Named loss terms (scalars unless noted); `total` is what gets back-propagated.

    Attributes:
        total: recon + beta * kl_weight * KL-with-free-bits (VAE), or recon + vq (VQ-VAE).
        recon: reconstruction term per image (pixel term + SSIM and local spectrum terms), batch mean.
        kl: KL(q(z|x) || N(0, I)) summed over latent dims, batch mean, before free bits and weights (0 for VQ).
        kl_per_dim: (D,) KL of each latent dim (spatial latents flattened to C*h*w), batch mean; empty for VQ.
        vq: commitment loss from the quantizer (0 for the VAE).
        pixel_weight: the weight the pixel term puts on each squared (L1: absolute) error, detached: 1 for
            sigma="fixed", 1 / (2 sigma^2) (L1: 1 / sigma) otherwise. Other per-pixel terms (adversarial) are
            scaled by it so their weight means the same whatever the calibration.
    """

    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor
    vq: torch.Tensor
    pixel_weight: torch.Tensor


def recon_loss(recon: torch.Tensor, x: torch.Tensor, kind: str = "mse", ssim_weight: float = 0.0) -> torch.Tensor:
    """Reconstruction term with a fixed decoder scale: sum over pixels of (recon - x)^2 or |recon - x|, plus
    ssim_weight * H * W * (1 - SSIM) per image, then the batch mean (a scalar fp32 tensor). See `recon_nll`."""
    return recon_nll(recon, x, kind, ssim_weight=ssim_weight)[0]


def local_spectrum_distance(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per image, the mean |log(|F(recon patch)| + eps) - log(|F(x patch)| + eps)| over Hann-windowed patches.

    Patches are `SPECTRUM_PATCH` px square (the image side when smaller), stride half a patch, each minus its
    mean before the window; amplitudes of the real 2D FFT. 0 for identical images; a blurred reconstruction
    scores high (its patches lack high-frequency amplitude) although its pixel error may be small.

    Args:
        recon: (B, 1, H, W).
        x: (B, 1, H, W), the same shape.

    Returns:
        (B,) fp32, >= 0.
    """
    if recon.shape != x.shape or recon.dim() != 4 or recon.shape[1] != 1:
        raise ValueError(f"recon {tuple(recon.shape)} and x {tuple(x.shape)} must both be (B, 1, H, W)")
    b = x.shape[0]
    patch = min(SPECTRUM_PATCH, *x.shape[-2:])
    window = torch.hann_window(patch, periodic=False, device=x.device)
    window = window[:, None] * window[None, :]                                      # (P, P)

    def log_amplitude(img: torch.Tensor) -> torch.Tensor:
        cols = torch.nn.functional.unfold(img.float(), patch, stride=max(1, patch // 2))   # (B, P*P, L)
        tiles = cols.transpose(1, 2).reshape(b, -1, patch, patch)                   # (B, L, P, P)
        tiles = (tiles - tiles.mean((-2, -1), keepdim=True)) * window
        return torch.log(torch.fft.rfft2(tiles).abs() + SPECTRUM_EPS)                # (B, L, P, P//2 + 1)

    return (log_amplitude(recon) - log_amplitude(x)).abs().flatten(1).mean(1)


def recon_nll(recon: torch.Tensor, x: torch.Tensor, kind: str = "mse", *, sigma: str = "fixed",
              log_sigma: torch.Tensor | None = None, ssim_weight: float = 0.0,
              spectral_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image negative log-likelihood of x under the decoder (up to constants), batch mean.

    fixed: sum of (recon - x)^2 (or |recon - x|). optimal / learned: sum of err / (2 sigma^2) + log sigma (L1:
    err / sigma + log sigma), with sigma the batch's RMS (mean absolute) error, or exp(log_sigma), softly bounded
    below by exp(-6). The optional SSIM term ssim_weight * H * W * (1 - SSIM) and local spectrum term
    spectral_weight * H * W * `local_spectrum_distance` are scaled like one pixel error.

    Args:
        recon: (B, 1, H, W) in [0, 1].
        x: (B, 1, H, W) in [0, 1], the same shape.
        kind: "mse" (Gaussian) or "l1" (Laplace).
        sigma: "fixed", "optimal" or "learned".
        log_sigma: scalar tensor, required for sigma="learned" (the model's `log_sigma`).
        ssim_weight: >= 0; 0 skips SSIM (Gaussian 11x11 window, data range 1; see mrigen.models.ssim).
        spectral_weight: >= 0; 0 skips the local spectrum term.

    Returns:
        (nll, pixel_weight): scalar fp32 tensors; pixel_weight is detached (see `LossTerms.pixel_weight`).
    """
    if kind not in RECON_LOSSES:
        raise ValueError(f"recon={kind!r} is not valid; allowed: {', '.join(map(repr, RECON_LOSSES))}")
    if sigma not in SIGMAS:
        raise ValueError(f"sigma={sigma!r} is not valid; allowed: {', '.join(map(repr, SIGMAS))}")
    if sigma == "learned" and log_sigma is None:
        raise ValueError("sigma='learned' needs the model's log_sigma parameter")
    if ssim_weight < 0:
        raise ValueError(f"ssim_weight={ssim_weight!r} must be >= 0")
    if spectral_weight < 0:
        raise ValueError(f"spectral_weight={spectral_weight!r} must be >= 0")
    if recon.shape != x.shape or recon.dim() != 4:
        raise ValueError(f"recon {tuple(recon.shape)} and x {tuple(x.shape)} must both be (B, 1, H, W)")
    recon, x = recon.float(), x.float()
    diff = recon - x
    err = diff.square() if kind == "mse" else diff.abs()  # (B, 1, H, W)
    if sigma == "fixed":
        weight, log_s = torch.ones((), device=x.device), torch.zeros((), device=x.device)
    else:
        if sigma == "optimal":  # maximum-likelihood scale of the batch, no gradient (its derivative is 0 there)
            m = err.mean().detach().clamp_min(1e-12)
            log_s = (0.5 * torch.log(m) if kind == "mse" else torch.log(m)).clamp_min(MIN_LOG_SIGMA)
        else:  # soft bound keeps a gradient below it
            log_s = MIN_LOG_SIGMA + torch.nn.functional.softplus(log_sigma.float() - MIN_LOG_SIGMA)
        weight = 0.5 * torch.exp(-2.0 * log_s) if kind == "mse" else torch.exp(-log_s)
    per_image = (err * weight).sum(dim=(1, 2, 3)) + x[0].numel() * log_s  # (B,)
    if ssim_weight > 0:
        ssim = gaussian_ssim(recon, x, data_range=1.0)  # (B,)
        per_image = per_image + ssim_weight * weight * x[0].numel() * (1.0 - ssim)
    if spectral_weight > 0:
        per_image = per_image + spectral_weight * weight * x[0].numel() * local_spectrum_distance(recon, x)
    return per_image.mean(), weight.detach()


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per latent dim, batch mean: (B, D) or (B, C, h, w) -> (D,) / (C*h*w,)."""
    mu, logvar = mu.float().flatten(1), logvar.float().flatten(1)
    return (0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)).mean(dim=0)


def vae_loss(
    out: VAEOutput,
    x: torch.Tensor,
    *,
    recon: str = "mse",
    beta: float = 1.0,
    kl_weight: float = 1.0,
    free_bits: float = 0.0,
    ssim_weight: float = 0.0,
    spectral_weight: float = 0.0,
    sigma: str = "fixed",
    log_sigma: torch.Tensor | None = None,
) -> LossTerms:
    """Negative ELBO of a VAE batch.

    total = recon + beta * kl_weight * sum_d max(KL_d, free_bits), where KL_d is the batch-mean KL of dim d
    (free bits: dims below `free_bits` nats get no gradient pushing them further to the prior).

    Args:
        out: the model's VAEOutput for `x`.
        x: (B, 1, H, W) in [0, 1].
        recon: "mse" or "l1".
        beta: KL weight (1 = the ELBO), >= 0.
        kl_weight: annealing factor in [0, 1] (KL warm-up), multiplies beta.
        free_bits: nats per latent dim, >= 0.
        ssim_weight: weight of the SSIM term, >= 0.
        spectral_weight: weight of the local spectrum term, >= 0.
        sigma: decoder calibration, "fixed" | "optimal" | "learned" (see `recon_nll`).
        log_sigma: the model's learned log sigma (sigma="learned").
    """
    if beta < 0:
        raise ValueError(f"beta={beta!r} must be >= 0")
    if not 0.0 <= kl_weight <= 1.0:
        raise ValueError(f"kl_weight={kl_weight!r} must be in [0, 1]")
    if free_bits < 0:
        raise ValueError(f"free_bits={free_bits!r} must be >= 0")
    rec, weight = recon_nll(out.recon, x, recon, sigma=sigma, log_sigma=log_sigma, ssim_weight=ssim_weight,
                            spectral_weight=spectral_weight)
    per_dim = kl_per_dim(out.mu, out.logvar)
    kl = per_dim.sum()
    kl_term = per_dim.clamp_min(free_bits).sum() if free_bits > 0 else kl
    total = rec + beta * kl_weight * kl_term
    return LossTerms(total, rec, kl, per_dim.detach(), torch.zeros((), device=rec.device), weight)


def vq_vae_loss(out: VQOutput, x: torch.Tensor, *, recon: str = "mse", ssim_weight: float = 0.0,
                spectral_weight: float = 0.0) -> LossTerms:
    """VQ-VAE loss: reconstruction term + the quantizer's commitment loss (the codebook itself learns by EMA).

    Args:
        out: the model's VQOutput for `x`.
        x: (B, 1, H, W) in [0, 1].
        recon: "mse" or "l1".
        ssim_weight: weight of the SSIM term, >= 0.
        spectral_weight: weight of the local spectrum term, >= 0.
    """
    rec, weight = recon_nll(out.recon, x, recon, ssim_weight=ssim_weight, spectral_weight=spectral_weight)
    vq = out.vq_loss.float()
    zero = torch.zeros((), device=rec.device)
    return LossTerms(rec + vq, rec, zero, torch.zeros(0, device=rec.device), vq, weight)


def active_units(mu_all: torch.Tensor, threshold: float = 0.01) -> int:
    """Number of latent dims whose posterior mean varies over the data: Var_x[mu_d(x)] > threshold.

    Args:
        mu_all: posterior means for many images, (N, D) or (N, C, h, w) (flattened to C*h*w dims), N >= 2.
        threshold: variance threshold (Burda et al. 2016 use 0.01).
    """
    if mu_all.dim() < 2 or mu_all.shape[0] < 2:
        raise ValueError(f"active_units needs mu for N >= 2 images, shape (N, D...), got {tuple(mu_all.shape)}")
    return int((mu_all.float().flatten(1).var(dim=0) > threshold).sum())
