"""Variational autoencoder: the thesis CNN (dense 1024-d latent by default) or a spatial latent map.

BatchNorm and the mean path: in training the decoder's BatchNorm layers see features of sampled z, whose
variance is var(mu) + E[sigma^2]; `reconstruct` decodes the mean, whose features vary less, so the running
statistics would wash the reconstruction out. `calibrate_reconstruction(images)` measures the decoder's BatchNorm
statistics on the mean path into a second set of buffers that `reconstruct` uses (sampling keeps the training
statistics: z ~ N(0, I) has the variance of a sampled z). GroupNorm decoders need none of this.

Sampling draws z from N(0, I), or with `cfg.latent_prior == "fitted"` from a Gaussian mixture fitted to the
training slices' posterior means once training ends (`fit_latent_prior`; see mrigen.models.latent_prior), or with
`"flow"` from a flow-matching network over the latent grid trained after the autoencoder (mrigen.models.latent_flow,
mrigen.train.prior.train_latent_flow). Those z vary like posterior means, so both decode with the mean-path
statistics too.

Conditioning (`cfg.conditions`): the attributes `(B, A)` (see mrigen.models.condition) become one vector that
modulates every encoder and decoder norm layer (FiLM), so z is free to hold what the attributes do not say and
sampling decodes z ~ N(0, I) under the requested attributes. Without attributes a conditional model uses its
learned "unknown" vectors. Measured, that decoder ignores the request: z already holds the whole slice (bench/
RESULTS.md, session 8). With the flow prior the autoencoder stays unconditional and the flow reads the attributes
instead, drawing z for the requested slice (`FlowLatentPrior`; `cfg.sample_guidance` applies).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple

import torch
from torch import nn

from mrigen.models.blocks import LEAKY_SLOPE, Decoder, Encoder, FiLM, check_images, eval_mode, norm_widths, run_trunk
from mrigen.models.condition import ConditionEmbedding
from mrigen.models.config import ModelConfig
from mrigen.models.latent_flow import FlowLatentPrior
from mrigen.models.latent_prior import GaussianLatentPrior

__all__ = ["VAE", "VAEOutput"]

LOGVAR_RANGE = (-30.0, 20.0)  # clamp keeps exp(logvar) finite in bf16 / fp32


class VAEOutput(NamedTuple):
    """Output of `VAE.forward`.

    Attributes:
        recon: (B, 1, H, W) in [0, 1], decoded from a reparameterised sample z ~ q(z | x).
        mu: posterior mean, (B, D) for a dense latent or (B, C, h, w) for a spatial one.
        logvar: posterior log-variance, same shape as `mu`.
    """

    recon: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor


class VAE(nn.Module):
    """Convolutional VAE with a N(0, I) prior (or, for sampling, a Gaussian mixture fitted to its posterior means).

    Args:
        cfg: architecture; `cfg.latent` picks a dense vector of `latent_dim` or a spatial map of `latent_dim`
            channels on the (image_size / 2**blocks)^2 grid.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c, g, d = self.encoder.out_channels, cfg.grid_size, cfg.latent_dim
        self._feature_shape = (c, g, g)
        if cfg.latent == "dense":
            self.to_posterior: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(c * g * g, 2 * d))
            self.from_latent: nn.Module = nn.Sequential(
                nn.Linear(d, c * g * g), nn.Unflatten(1, self._feature_shape), nn.LeakyReLU(LEAKY_SLOPE)
            )
            self.latent_shape: tuple[int, ...] = (d,)
        else:
            self.to_posterior = nn.Conv2d(c, 2 * d, kernel_size=1)
            self.from_latent = nn.Sequential(nn.Conv2d(d, c, kernel_size=1), nn.LeakyReLU(LEAKY_SLOPE))
            self.latent_shape = (d, g, g)
        self.latent_prior: GaussianLatentPrior | FlowLatentPrior | None = None
        if cfg.latent_prior == "fitted":
            self.latent_prior = GaussianLatentPrior(math.prod(self.latent_shape), cfg.latent_prior_components)
        elif cfg.latent_prior == "flow":
            self.latent_prior = FlowLatentPrior(self.latent_shape, cfg.flow_width, cfg.flow_steps, cfg.conditions,
                                                guide=cfg.flow_guide)
        # learned decoder scale of the sigma-VAE (train.sigma="learned"): log of the per-pixel std / Laplace scale
        self.log_sigma = nn.Parameter(torch.zeros(()))
        bns = self._decoder_batchnorms()
        # mean-path statistics of each decoder BatchNorm (see the module docstring); empty for GroupNorm decoders
        self.mean_path_norms = nn.ModuleList(nn.BatchNorm2d(bn.num_features, affine=False) for bn in bns)
        self.register_buffer("mean_path_calibrated", torch.tensor(False))
        self.condition: ConditionEmbedding | None = None
        self.enc_film: FiLM | None = None
        self.dec_film: FiLM | None = None
        if cfg.autoencoder_conditioned:           # (with a flow prior only the flow reads the attributes)
            self.condition = ConditionEmbedding(cfg.conditions, cfg.condition_dim)
            self.enc_film = FiLM(cfg.condition_dim, norm_widths(self.encoder))
            self.dec_film = FiLM(cfg.condition_dim, norm_widths(self.decoder))

    def _embed(self, attrs: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """Condition vector `(B, condition_dim)` for encoded attributes `(B, A)` (None: all unknown); None when the
        model is unconditional."""
        if self.condition is None:
            return None
        if attrs is None:
            attrs = torch.full((batch, len(self.condition.names)), float("nan"), device=device)
        return self.condition(attrs.to(device))

    def _decoder_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [m for m in (*self.from_latent.modules(), *self.decoder.modules()) if isinstance(m, nn.BatchNorm2d)]

    @contextlib.contextmanager
    def _mean_path_statistics(self) -> Iterator[None]:
        """Swap the decoder BatchNorms' running statistics for the mean-path ones while the block runs."""
        if not bool(self.mean_path_calibrated):
            yield
            return
        bns = self._decoder_batchnorms()
        saved = [(bn.running_mean, bn.running_var) for bn in bns]
        try:
            for bn, stats in zip(bns, self.mean_path_norms):
                bn.running_mean, bn.running_var = stats.running_mean, stats.running_var
            yield
        finally:
            for bn, (mean, var) in zip(bns, saved):
                bn.running_mean, bn.running_var = mean, var

    @torch.no_grad()
    def calibrate_reconstruction(self, images: torch.Tensor, batch_size: int = 256,
                                 attrs: torch.Tensor | None = None) -> None:
        """Measure the decoder's BatchNorm statistics on the mean path (z = mu) over `images` (N, 1, H, W) in
        [0, 1] (training slices, with their encoded attributes `(N, A)` for a conditional model), for `reconstruct`
        to use. A no-op for decoders without BatchNorm."""
        if not len(self.mean_path_norms):
            return
        was_training = self.training
        for stats in self.mean_path_norms:
            stats.reset_running_stats()
            stats.momentum = None  # cumulative average over the batches
        bns = self._decoder_batchnorms()
        saved = [(bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum) for bn in bns]
        try:
            self.eval()
            for bn, stats in zip(bns, self.mean_path_norms):
                bn.running_mean, bn.running_var = stats.running_mean, stats.running_var
                bn.num_batches_tracked, bn.momentum = stats.num_batches_tracked, None
                bn.train()  # normalise with batch statistics and accumulate them into the mean-path buffers
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size].float()
                a = None if attrs is None else attrs[start:start + batch_size]
                self.decode(self.encode(x, a)[0], a)
        finally:
            for bn, (mean, var, count, momentum) in zip(bns, saved):
                bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum = mean, var, count, momentum
            self.train(was_training)
        self.mean_path_calibrated.fill_(True)

    def encode(self, x: torch.Tensor, attrs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 1, H, W) in [0, 1], attrs: optional (B, A) -> (mu, logvar), each (B, D) or (B, C, h, w)."""
        check_images(x, self.config.image_size, "VAE.encode")
        c = self._embed(attrs, x.shape[0], x.device)
        mu, logvar = self.to_posterior(run_trunk(self.encoder, x, self.enc_film, c)).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor, attrs: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, *latent_shape), attrs: optional (B, A) -> (B, 1, H, W) in [0, 1]."""
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"VAE.decode expects z of shape (B, {self.latent_shape}), got {tuple(z.shape)}")
        c = self._embed(attrs, z.shape[0], z.device)
        return run_trunk(self.decoder, self.from_latent(z), self.dec_film, c)

    def forward(self, x: torch.Tensor, attrs: torch.Tensor | None = None) -> VAEOutput:
        """One stochastic ELBO pass: z = mu + sigma * eps (eps from the global RNG, in train and eval mode).

        Args:
            x: (B, 1, H, W) in [0, 1].
            attrs: (B, A) encoded attributes of a conditional model (None: unknown).
        """
        mu, logvar = self.encode(x, attrs)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return VAEOutput(self.decode(z, attrs), mu, logvar)

    @property
    def prior_trained(self) -> bool:
        """Whether `sample` can run: always for N(0, I), once fitted / trained for the fitted and flow priors."""
        if self.latent_prior is None:
            return True
        flag = self.latent_prior.trained if isinstance(self.latent_prior, FlowLatentPrior) else self.latent_prior.fitted
        return bool(flag)

    @property
    def condition_embedding(self) -> ConditionEmbedding | None:
        """The model's attribute embedding (with its bank of training rows): the encoder / decoder's, or the flow
        prior's; None if unconditional."""
        if isinstance(self.latent_prior, FlowLatentPrior):
            return self.latent_prior.condition
        return self.condition

    def reconstruct(self, x: torch.Tensor, attrs: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic reconstruction from the posterior mean, in eval mode, no grad: (B,1,H,W) -> (B,1,H,W)."""
        with eval_mode(self), self._mean_path_statistics():
            return self.decode(self.encode(x, attrs)[0], attrs)

    @torch.no_grad()
    def fit_latent_prior(self, images: torch.Tensor, batch_size: int = 256, attrs: torch.Tensor | None = None,
                         groups: torch.Tensor | None = None) -> None:
        """Fit the sampling prior (`cfg.latent_prior == "fitted"`) to the posterior means of `images` (N, 1, H, W)
        in [0, 1], the training slices (with their encoded attributes `(N, A)` for a conditional model, and their
        subjects `(N,)` int64 so that no mixture component is one subject's: `GaussianLatentPrior.fit`). A no-op
        for a model that samples from N(0, I), and for the flow prior, which is trained, not fitted
        (mrigen.train.prior.train_latent_flow)."""
        if not isinstance(self.latent_prior, GaussianLatentPrior):
            return
        with eval_mode(self):
            mus = [self.encode(images[i:i + batch_size].float(), None if attrs is None else attrs[i:i + batch_size])[0]
                   for i in range(0, len(images), batch_size)]
        self.latent_prior.fit(torch.cat(mus).flatten(1), groups=groups)

    def sample(self, n: int, generator: torch.Generator | None = None, conditions=None) -> torch.Tensor:
        """Decode n draws of z from the prior (N(0, I), the fitted mixture or the flow), in eval mode, no grad.

        Args:
            n: number of images (>= 1).
            generator: optional RNG on any device (noise is drawn on its device, then moved to the model's).
            conditions: conditional models only: None (attributes drawn from the training rows), a
                `ConditionRequest`, n store-style row dicts, or an (n, A) encoded tensor (see
                `ConditionEmbedding.resolve`).

        Returns:
            (n, 1, H, W) in [0, 1] on the model's device.

        Raises:
            RuntimeError: if the model samples from a fitted prior that was never fitted, or a flow never trained.
        """
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        emb = self.condition_embedding
        if conditions is not None and emb is None:
            raise ValueError("conditions were given but this model is unconditional (model.conditions is empty)")
        device = next(self.parameters()).device
        noise_device = generator.device if generator is not None else device
        attrs = None if emb is None else emb.resolve(n, conditions, generator).to(device)
        with eval_mode(self):
            if self.latent_prior is None:
                z = torch.randn((n, *self.latent_shape), generator=generator, device=noise_device).to(device)
                return self.decode(z, attrs)
            if isinstance(self.latent_prior, FlowLatentPrior):      # the flow reads the attributes, the decoder not
                z = self.latent_prior.draw(n, generator, attrs=attrs, guidance=self.config.sample_guidance,
                                           guidance_on=self.config.sample_guidance_on,
                                           autoguidance=self.config.sample_autoguidance)
                attrs = None
            else:
                z = self.latent_prior.draw(n, generator).reshape(n, *self.latent_shape)   # the fitted mixture
            with self._mean_path_statistics():
                return self.decode(z, attrs)
