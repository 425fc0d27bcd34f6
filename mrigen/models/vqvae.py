"""VQ-VAE: the thesis CNN around an EMA vector quantizer, plus a learned code prior so it can generate.

The codebook is not a parameter: it follows exponential moving averages of the encoder outputs assigned to
each code (computed in fp32, also under autocast), and codes whose EMA usage falls below
`dead_code_threshold` are restarted from random encoder outputs of the current batch. No host sync per step.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
from torch import nn

from mrigen.models.blocks import Decoder, Encoder, check_images, eval_mode
from mrigen.models.condition import ConditionEmbedding
from mrigen.models.config import ModelConfig
from mrigen.models.prior import CodePrior

__all__ = ["Quantized", "VQOutput", "VQVAE", "VectorQuantizer", "codebook_usage"]

EPS = 1e-5  # Laplace smoothing of the EMA cluster sizes


class VQOutput(NamedTuple):
    """Output of `VQVAE.forward`.

    Attributes:
        recon: (B, 1, H, W) in [0, 1].
        vq_loss: scalar, commitment * ||z_e - sg(q)||^2 summed per image, averaged over the batch.
        indices: (B, h, w) int64 code indices.
        perplexity: scalar, exp(entropy) of the batch's code histogram (1 .. codebook_size).
    """

    recon: torch.Tensor
    vq_loss: torch.Tensor
    indices: torch.Tensor
    perplexity: torch.Tensor


class Quantized(NamedTuple):
    """Output of `VectorQuantizer.forward`: quantized (B, D, h, w) with straight-through gradients, loss,
    indices (B, h, w), perplexity."""

    quantized: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor
    perplexity: torch.Tensor


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Fraction of the codebook that appears in `indices` (any shape, int64): a scalar tensor in (0, 1]."""
    counts = torch.zeros(codebook_size, device=indices.device).index_add_(
        0, indices.reshape(-1), torch.ones(indices.numel(), device=indices.device)
    )
    return (counts > 0).float().mean()


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with an EMA codebook and dead-code restart.

    Args:
        num_codes: K.
        dim: D, channels of a code.
        commitment: weight of the commitment loss.
        decay: EMA decay in (0, 1).
        dead_threshold: EMA count below which a code is restarted (0 disables restarts).
    """

    def __init__(self, num_codes: int, dim: int, commitment: float, decay: float, dead_threshold: float) -> None:
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.commitment, self.decay, self.dead_threshold = commitment, decay, dead_threshold
        embed = torch.randn(num_codes, dim)
        self.register_buffer("embed", embed)  # (K, D) fp32: the codebook
        self.register_buffer("cluster_size", torch.ones(num_codes))  # (K,) EMA of vectors per code per batch
        self.register_buffer("embed_sum", embed.clone())  # (K, D) EMA of the sum of vectors per code

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) int64 -> codes (B, D, h, w) fp32 (row `i` of the codebook at each position)."""
        return self.embed[indices].permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (N, D) fp32 -> index of the nearest code by L2 distance, (N,) int64."""
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t() + self.embed.pow(2).sum(1)  # (N, K)
        return dist.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> Quantized:
        """z: encoder output (B, D, h, w), any float dtype. Updates the codebook in training mode."""
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer expects z of shape (B, {self.dim}, h, w), got {tuple(z.shape)}")
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()
            flat = z32.permute(0, 2, 3, 1).reshape(-1, self.dim)  # (B, D, h, w) -> (B*h*w, D)
            idx = self.nearest(flat)  # (N,)
            ones = torch.ones_like(idx, dtype=torch.float)
            counts = torch.zeros(self.num_codes, device=z.device).index_add_(0, idx, ones)  # (K,) uses per code
            if self.training:
                self._ema_update(flat.detach(), idx, counts)
            indices = idx.view(b, h, w)
            q = self.lookup(indices)
            loss = self.commitment * (z32 - q.detach()).pow(2).sum(dim=(1, 2, 3)).mean()
            probs = counts / idx.numel()
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
            quantized = z32 + (q - z32).detach()  # straight-through estimator
        return Quantized(quantized, loss, indices, perplexity)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA codebook step, then restart dead codes from random rows of `flat` (N, D) -- all on device."""
        sums = torch.zeros_like(self.embed).index_add_(0, idx, flat)  # (K, D)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + EPS) / (n + self.num_codes * EPS) * n
        self.embed.copy_(self.embed_sum / smoothed.unsqueeze(1))
        if self.dead_threshold > 0:
            dead = (self.cluster_size < self.dead_threshold).unsqueeze(1)  # (K, 1)
            picks = flat[torch.randint(0, flat.shape[0], (self.num_codes,), device=flat.device)]  # (K, D)
            self.embed.copy_(torch.where(dead, picks, self.embed))
            self.embed_sum.copy_(torch.where(dead, picks * self.dead_threshold, self.embed_sum))
            self.cluster_size.copy_(torch.where(dead[:, 0], torch.full_like(self.cluster_size, self.dead_threshold),
                                                self.cluster_size))


class VQVAE(nn.Module):
    """VQ-VAE over a (image_size / 2**blocks)^2 grid of codes, with a `CodePrior` for generation.

    The trainer fits the prior after the autoencoder (`model.prior.loss(model.encode_indices(x))`) and then calls
    `mark_prior_trained()`; the flag is a buffer, so it is saved and loaded with the weights.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.pre_quant = nn.Conv2d(self.encoder.out_channels, cfg.code_dim, kernel_size=1)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.commitment, cfg.ema_decay,
                                         cfg.dead_code_threshold)
        self.post_quant = nn.Conv2d(cfg.code_dim, self.decoder.in_channels, kernel_size=1)
        self.prior = CodePrior(cfg.codebook_size, cfg.grid_size**2, cfg.prior_channels, cfg.prior_layers,
                               cfg.conditions)
        self.register_buffer("prior_trained", torch.tensor(False))

    @property
    def condition_embedding(self) -> ConditionEmbedding | None:
        """The model's attribute embedding (with its bank of training rows); None if unconditional."""
        return self.prior.condition

    def autoencoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters trained by the VQ-VAE loss: everything except the code prior (the codebook is EMA)."""
        return (p for name, p in self.named_parameters() if not name.startswith("prior."))

    def mark_prior_trained(self) -> None:
        """Record that `prior` has been fitted to this model's codes (enables `sample`)."""
        self.prior_trained.fill_(True)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.config.image_size, "VQVAE")
        return self.pre_quant(self.encoder(x))  # (B, D, h, w)

    def _decode(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant(quantized))

    def forward(self, x: torch.Tensor) -> VQOutput:
        """x: (B, 1, H, W) in [0, 1] -> VQOutput; in training mode also updates the codebook (EMA, restarts)."""
        q = self.quantizer(self._encode(x))
        return VQOutput(self._decode(q.quantized), q.loss, q.indices, q.perplexity)

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, H, W) in [0, 1] -> nearest-code indices (B, h, w) int64 (eval mode, no grad)."""
        with eval_mode(self):
            z = self._encode(x)
            with torch.autocast(device_type=z.device.type, enabled=False):
                flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B, D, h, w) -> (B*h*w, D)
                return self.quantizer.nearest(flat).view(z.shape[0], z.shape[2], z.shape[3])

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices: (B, h, w) int64 -> images (B, 1, H, W) in [0, 1] (eval mode, no grad)."""
        g = self.config.grid_size
        if indices.dim() != 3 or tuple(indices.shape[1:]) != (g, g) or indices.dtype != torch.long:
            raise ValueError(f"decode_indices expects (B, {g}, {g}) int64, got {tuple(indices.shape)} {indices.dtype}")
        with eval_mode(self):
            return self._decode(self.quantizer.lookup(indices))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction through the nearest codes: (B, 1, H, W) -> (B, 1, H, W)."""
        return self.decode_indices(self.encode_indices(x))

    def sample(self, n: int, generator: torch.Generator | None = None, conditions=None) -> torch.Tensor:
        """Draw n code grids from the trained prior and decode them: (n, 1, H, W) in [0, 1] on the model's device.

        `conditions` (conditional models only): None (attributes drawn from the training rows), a
        `ConditionRequest`, n store-style row dicts, or an (n, A) encoded tensor (see `ConditionEmbedding.resolve`).

        Raises:
            RuntimeError: if the prior was never trained (`mark_prior_trained` not called).
        """
        if not bool(self.prior_trained):
            raise RuntimeError(
                "VQVAE.sample needs a trained code prior: fit model.prior with prior.loss(model.encode_indices(x)) "
                "on training images, then call model.mark_prior_trained()"
            )
        if conditions is not None and self.prior.condition is None:
            raise ValueError("conditions were given but this model is unconditional (model.conditions is empty)")
        attrs = None if self.prior.condition is None else self.prior.condition.resolve(n, conditions, generator)
        g = self.config.grid_size
        with eval_mode(self):
            codes = self.prior.sample(n, g, g, generator=generator, temperature=self.config.sample_temperature,
                                      top_k=self.config.sample_top_k, attrs=attrs,
                                      guidance=self.config.sample_guidance,
                                      guidance_on=self.config.sample_guidance_on)
            return self.decode_indices(codes)
