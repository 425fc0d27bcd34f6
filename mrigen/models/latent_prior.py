"""A full-covariance Gaussian fitted to a trained VAE's posterior means: what `VAE.sample` draws z from when
`ModelConfig.latent_prior == "fitted"`.

Why: a VAE trained with a small decoder scale (sigma-VAE, or a low beta) leaves its aggregate posterior far from
N(0, I); z ~ N(0, I) then lands where the decoder never looked and decodes to shapes that are not brains (measured
on the demo cohort: square outlines, scrambled interiors). Fitting the training slices' posterior means ex post
(Ghosh et al., "From variational to deterministic autoencoders", ICLR 2020) keeps the correlations that hold a
slice's layout together across the latent grid, for the price of one encoder pass and a Cholesky factorisation.

The covariance is shrunk a little towards its diagonal (`SHRINKAGE`), which keeps it positive definite when there
are fewer training slices than latent dimensions; more shrinkage cost sample quality on the demo cohort (2,880
training slices, 1,024 latent dimensions).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SHRINKAGE", "GaussianLatentPrior"]

SHRINKAGE = 0.01  # cov <- (1 - s) * cov + s * diag(cov); measured: 0.1 gave fd_ratio 6.3, 0.01 5.5, 0.0 5.4
_JITTER = (0.0, 1e-6, 1e-4, 1e-2)  # relative diagonal jitter tried in turn if the Cholesky factorisation fails


class GaussianLatentPrior(nn.Module):
    """N(mean, L L^T) over flattened latents of `dim` entries; its buffers are saved with the model's weights.

    Args:
        dim: number of latent entries D (latent_dim for a dense latent, C*h*w for a spatial one).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale_tril", torch.eye(dim))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, latents: torch.Tensor, shrinkage: float = SHRINKAGE) -> None:
        """Fit mean and (shrunk) covariance to `latents` (N, D), N >= 2, in float64.

        Raises:
            ValueError: wrong shape, too few rows, non-finite values or a shrinkage outside [0, 1].
        """
        if latents.ndim != 2 or latents.shape[1] != self.dim or latents.shape[0] < 2:
            raise ValueError(f"fitting the latent prior needs (N >= 2, {self.dim}) latents, got {tuple(latents.shape)}")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage={shrinkage!r} must be in [0, 1]")
        x = latents.detach().double()
        if not torch.isfinite(x).all():
            raise ValueError("cannot fit the latent prior: the encoder produced non-finite posterior means")
        mean = x.mean(0)
        cov = torch.cov(x.T).reshape(self.dim, self.dim)
        diag = torch.diag(cov).clamp_min(1e-12)
        cov = (1.0 - shrinkage) * cov + shrinkage * torch.diag(diag)
        scale = float(diag.mean())
        for jitter in _JITTER:
            tril, info = torch.linalg.cholesky_ex(cov + jitter * scale * torch.eye(self.dim, dtype=cov.dtype,
                                                                                   device=cov.device))
            if int(info) == 0:
                break
        else:
            raise ValueError(f"the latent covariance of {x.shape[0]} posterior means is not positive definite "
                             f"even with {_JITTER[-1]:g} x its mean variance added to the diagonal")
        self.mean.copy_(mean.to(self.mean))
        self.scale_tril.copy_(tril.to(self.scale_tril))
        self.fitted.fill_(True)

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws `(n, D)` on the buffers' device (noise drawn on the generator's device, then moved).

        Raises:
            RuntimeError: if `fit` was never called.
        """
        if not bool(self.fitted):
            raise RuntimeError("this VAE's latent prior (model.latent_prior='fitted') has not been fitted: train the "
                               "model to the end, or call model.fit_latent_prior(training images)")
        noise_device = generator.device if generator is not None else self.mean.device
        eps = torch.randn((n, self.dim), generator=generator, device=noise_device).to(self.mean.device)
        return self.mean + eps @ self.scale_tril.T
