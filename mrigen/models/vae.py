"""Variational autoencoder: the thesis CNN (dense 1024-d latent by default) or a spatial latent map."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from mrigen.models.blocks import LEAKY_SLOPE, Decoder, Encoder, check_images, eval_mode
from mrigen.models.config import ModelConfig

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
    """Convolutional VAE with a N(0, I) prior.

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

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 1, H, W) in [0, 1] -> (mu, logvar), each (B, D) or (B, C, h, w)."""
        check_images(x, self.config.image_size, "VAE.encode")
        mu, logvar = self.to_posterior(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, *latent_shape) -> (B, 1, H, W) in [0, 1]."""
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"VAE.decode expects z of shape (B, {self.latent_shape}), got {tuple(z.shape)}")
        return self.decoder(self.from_latent(z))

    def forward(self, x: torch.Tensor) -> VAEOutput:
        """One stochastic ELBO pass: z = mu + sigma * eps (eps from the global RNG, in train and eval mode).

        Args:
            x: (B, 1, H, W) in [0, 1].
        """
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return VAEOutput(self.decode(z), mu, logvar)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction from the posterior mean, in eval mode, no grad: (B,1,H,W) -> (B,1,H,W)."""
        with eval_mode(self):
            return self.decode(self.encode(x)[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode n draws of z ~ N(0, I), in eval mode, no grad.

        Args:
            n: number of images (>= 1).
            generator: optional RNG on any device (noise is drawn on its device, then moved to the model's).

        Returns:
            (n, 1, H, W) in [0, 1] on the model's device.
        """
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        device = next(self.parameters()).device
        noise_device = generator.device if generator is not None else device
        z = torch.randn((n, *self.latent_shape), generator=generator, device=noise_device).to(device)
        with eval_mode(self):
            return self.decode(z)
