"""A Gaussian mixture fitted to a trained VAE's posterior means: what `VAE.sample` draws z from when
`ModelConfig.latent_prior == "fitted"`.

Why: a VAE trained with a small decoder scale (sigma-VAE, or a low beta) leaves its aggregate posterior far from
N(0, I); z ~ N(0, I) then lands where the decoder never looked and decodes to shapes that are not brains (measured
on the demo cohort: square outlines, scrambled interiors). Fitting the training slices' posterior means ex post
(Ghosh et al., "From variational to deterministic autoencoders", ICLR 2020) keeps the correlations that hold a
slice's layout together across the latent grid, for the price of one encoder pass, a k-means and a Cholesky
factorisation.

The mixture: k-means centres of the posterior means (`components` of them at most), weighted by their share of the
slices, with one shared covariance, the pooled within-cluster one. One component is a single full-covariance
Gaussian. Measured on the demo cohort (3-epoch VAE, 2,880 training slices, 1,024 latent dimensions;
bench/RESULTS.md): fd_ratio 5.6 with one component, 3.9 with 8, 2.6 with 32, and 1.2 with 128, where 29% of the
samples were copies of training slices: many small clusters memorise.

Every component pools at least `MIN_PER_COMPONENT` slices and, when the slices' subjects are given, slices of at
least `MIN_SUBJECTS_PER_COMPONENT` subjects (`pooled_kmeans` dissolves clusters that fall short). Plain k-means on
the demo cohort made components of one subject's 30 slices, whose draws were that subject's head outline with a
soft interior: most of the samples the copy detector flagged. Measured per 10,000 samples, mean of 3 k-means seeds
(bench/copy_detector.py, bench/RESULTS.md, 2026-11-28): flagged 45 -> 15 for the `make tune` champion and 25 -> 16
for an 8-epoch VAE, for fd_ratio +0.12 and +0.22.

The covariance is shrunk a little towards its diagonal (`SHRINKAGE`), which keeps it positive definite when there
are fewer training slices than latent dimensions; more shrinkage cost sample quality (0.1: fd_ratio 6.3 vs 5.5).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KMEANS_ITERATIONS", "MIN_PER_COMPONENT", "MIN_SUBJECTS_PER_COMPONENT", "SHRINKAGE",
           "GaussianLatentPrior", "kmeans", "pooled_kmeans"]

SHRINKAGE = 0.01          # cov <- (1 - s) * cov + s * diag(cov)
MIN_PER_COMPONENT = 50    # training slices per mixture component, at least
MIN_SUBJECTS_PER_COMPONENT = 3  # subjects per mixture component, at least (when the fit is given subjects)
KMEANS_ITERATIONS = 30
_JITTER = (0.0, 1e-6, 1e-4, 1e-2)  # relative diagonal jitter tried in turn if the Cholesky factorisation fails


def _lloyd(x: torch.Tensor, centres: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's iterations from `centres` (k, D), updated in place: -> (centres, assignment (N,) int64). A cluster
    that empties keeps its last centre.

    Stops at a fixed point: once an assignment repeats the previous one, the centres it gives are the centres
    already held, so the remaining iterations would change nothing (the result is the one all `iterations` give).
    """
    k = centres.shape[0]
    previous = None
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(dim=1)
        if previous is not None and torch.equal(assign, previous):
            return centres, assign
        previous = assign
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres, torch.cdist(x, centres).argmin(dim=1)


def kmeans(x: torch.Tensor, k: int, iterations: int = KMEANS_ITERATIONS, seed: int = 0) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """Lloyd's k-means from k distinct rows drawn with a seeded generator: (N, D), k <= N -> (centres (k, D),
    assignment (N,) int64 to the nearest centre). A cluster that empties keeps its last centre."""
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=gen)[:k].to(x.device)].clone()
    return _lloyd(x, centres, iterations)


def pooled_kmeans(x: torch.Tensor, k: int, *, groups: torch.Tensor | None = None,
                  min_rows: int = MIN_PER_COMPONENT, min_groups: int = MIN_SUBJECTS_PER_COMPONENT,
                  iterations: int = KMEANS_ITERATIONS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means whose every cluster holds at least `min_rows` rows and, with `groups`, rows of at least `min_groups`
    distinct groups (subjects), so that no component is one subject's average.

    A cluster that falls short is dissolved (the one with the fewest groups, then the fewest rows, first): its
    centre is dropped and Lloyd's iterations rerun from the remaining centres; repeated until every cluster
    qualifies or one is left.

    Args:
        x: `(N, D)` rows, N >= k.
        k: clusters to start from.
        groups: `(N,)` int64 group of each row, or None (rows only).
        min_rows, min_groups: what each cluster must pool.

    Returns:
        (centres `(k', D)`, assignment `(N,)` int64 into them), k' <= k.
    """
    if groups is not None and tuple(groups.shape) != (x.shape[0],):
        raise ValueError(f"groups must be ({x.shape[0]},) labels, one per row; got shape {tuple(groups.shape)}")
    if groups is not None:
        groups = torch.unique(groups, return_inverse=True)[1].to(x.device)      # labels -> 0..G-1
    centres, assign = kmeans(x, k, iterations, seed)
    while centres.shape[0] > 1:
        k = centres.shape[0]
        rows = torch.bincount(assign, minlength=k)
        if groups is None:
            distinct = torch.full((k,), min_groups, dtype=torch.long, device=x.device)
        else:                                  # distinct (cluster, group) pairs, counted per cluster
            n_groups = int(groups.max()) + 1
            distinct = torch.bincount(torch.unique(assign * n_groups + groups) // n_groups, minlength=k)
        short = ((rows < min_rows) | (distinct < min_groups)).nonzero().flatten()
        if len(short) == 0:
            break
        worst = short[torch.argmin(distinct[short] * (len(x) + 1) + rows[short])]
        centres, assign = _lloyd(x, centres[torch.arange(k, device=x.device) != worst].clone(), iterations)
    return centres, assign


class GaussianLatentPrior(nn.Module):
    """A mixture of `components` Gaussians with one shared covariance L L^T over flattened latents of `dim`
    entries; its buffers are saved with the model's weights.

    Args:
        dim: number of latent entries D (latent_dim for a dense latent, C*h*w for a spatial one).
        components: mixture components K >= 1 (1 = a single Gaussian).
    """

    def __init__(self, dim: int, components: int = 1) -> None:
        super().__init__()
        if components < 1:
            raise ValueError(f"components={components!r} must be >= 1")
        self.dim = dim
        self.register_buffer("means", torch.zeros(components, dim))
        self.register_buffer("weights", torch.full((components,), 1.0 / components))
        self.register_buffer("scale_tril", torch.eye(dim))
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def components(self) -> int:
        return self.means.shape[0]

    @torch.no_grad()
    def fit(self, latents: torch.Tensor, shrinkage: float = SHRINKAGE, seed: int = 0,
            groups: torch.Tensor | None = None, min_rows: int = MIN_PER_COMPONENT,
            min_subjects: int = MIN_SUBJECTS_PER_COMPONENT) -> int:
        """Fit the mixture to `latents` (N, D), N >= 2, in float64; returns the number of components used
        (at most min(K, N // MIN_PER_COMPONENT), at least 1; unused ones get weight 0).

        Args:
            latents: `(N, D)` posterior means of the training slices.
            shrinkage: of the pooled covariance towards its diagonal.
            seed: seeds k-means.
            groups: `(N,)` int64 subject of each row, or None; with it every component pools slices of at least
                `min_subjects` subjects (see `pooled_kmeans`).
            min_rows, min_subjects: what each component must pool (1 and 1: plain k-means, for comparisons).

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
        n = x.shape[0]
        if groups is not None and tuple(groups.shape) != (n,):
            raise ValueError(f"groups must be ({n},) subject labels, one per latent row; "
                             f"got shape {tuple(groups.shape)}")
        k = max(1, min(self.components, n // MIN_PER_COMPONENT))
        if k == 1:
            centres, assign = x.mean(0, keepdim=True), torch.zeros(n, dtype=torch.long, device=x.device)
        else:
            centres, assign = pooled_kmeans(x, k, groups=groups, min_rows=min_rows, min_groups=min_subjects,
                                            seed=seed)
            k = centres.shape[0]
        resid = x - centres[assign]
        cov = resid.T @ resid / max(n - k, 1)                                    # pooled within-cluster covariance
        diag = torch.diag(cov).clamp_min(1e-12)
        cov = (1.0 - shrinkage) * cov + shrinkage * torch.diag(diag)
        scale = float(diag.mean())
        eye = torch.eye(self.dim, dtype=cov.dtype, device=cov.device)
        for jitter in _JITTER:
            tril, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
            if int(info) == 0:
                break
        else:
            raise ValueError(f"the latent covariance of {n} posterior means is not positive definite even with "
                             f"{_JITTER[-1]:g} x its mean variance added to the diagonal")
        weights = torch.zeros(self.components, dtype=torch.float64, device=x.device)
        weights[:k] = torch.bincount(assign, minlength=k).double() / n
        self.means.zero_()
        self.means[:k] = centres.to(self.means)
        self.weights.copy_(weights.to(self.weights))
        self.scale_tril.copy_(tril.to(self.scale_tril))
        self.fitted.fill_(True)
        return k

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws `(n, D)` on the buffers' device (components and noise drawn on the generator's device).

        Raises:
            RuntimeError: if `fit` was never called.
        """
        if not bool(self.fitted):
            raise RuntimeError("this VAE's latent prior (model.latent_prior='fitted') has not been fitted: train the "
                               "model to the end, or call model.fit_latent_prior(training images)")
        noise_device = generator.device if generator is not None else self.means.device
        which = torch.multinomial(self.weights.to(noise_device), n, replacement=True, generator=generator)
        eps = torch.randn((n, self.dim), generator=generator, device=noise_device)
        device = self.means.device
        return self.means[which.to(device)] + eps.to(device) @ self.scale_tril.T
