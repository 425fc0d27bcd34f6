"""Patch-adversarial training pieces: a PatchGAN-style discriminator and its hinge / least-squares losses.

The best medical autoencoders (MONAI generative, brain LDM) add a patch discriminator to the reconstruction loss
so decoded slices keep the texture and edges that a pixel loss averages away. Nothing here needs downloaded
weights: the discriminator trains from scratch with the autoencoder (`TrainConfig.adv_weight` > 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mrigen.models.blocks import make_norm

__all__ = ["ADV_LOSSES", "PatchDiscriminator", "adaptive_weight", "discriminator_loss", "generator_loss"]

ADV_LOSSES = ("hinge", "lsgan")


class PatchDiscriminator(nn.Module):
    """Scores overlapping patches of a slice as real (> 0) or generated (< 0).

    Conv(4, stride 2) stages halve the side down to at least 2 px (at most `stages` of them), then two 3x3 convs
    give one logit per patch. GroupNorm keeps it independent of the batch composition (real and fake batches are
    scored separately).

    Args:
        image_size: side H = W of the slices (>= 8).
        channels: width of the first stage; each later stage doubles it (capped at 8x).
        stages: stride-2 stages (fewer when the image is small).
    """

    def __init__(self, image_size: int, channels: int = 64, stages: int = 3) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size={image_size} must be >= 8 for the patch discriminator")
        if channels < 1 or stages < 1:
            raise ValueError(f"channels={channels} and stages={stages} must be >= 1")
        n = min(stages, image_size.bit_length() - 3)  # keep at least 2 px after the last stage
        layers: list[nn.Module] = []
        c_in, c = 1, channels
        for i in range(n):
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1)]
            layers += [make_norm("group", c)] if i else []
            layers += [nn.LeakyReLU(0.2)]
            c_in, c = c, min(2 * c, 8 * channels)
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1), make_norm("group", c_in), nn.LeakyReLU(0.2),
                   nn.Conv2d(c_in, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, H, W) in [0, 1] -> patch logits (B, 1, H / 2**stages, W / 2**stages)."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"PatchDiscriminator expects (B, 1, H, W), got {tuple(x.shape)}")
        return self.net(x * 2.0 - 1.0)


def _check(kind: str) -> None:
    if kind not in ADV_LOSSES:
        raise ValueError(f"adv_loss={kind!r} is not valid; allowed: {', '.join(map(repr, ADV_LOSSES))}")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Discriminator loss, mean over patches and images: hinge relu(1 - D(real)) + relu(1 + D(fake)), or least
    squares (D(real) - 1)^2 + D(fake)^2. A scalar fp32 tensor."""
    _check(kind)
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    return (real_logits - 1.0).square().mean() + fake_logits.square().mean()


def generator_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The autoencoder's adversarial loss on its reconstructions, mean over patches: -D(fake) (hinge) or
    (D(fake) - 1)^2 (least squares). A scalar fp32 tensor."""
    _check(kind)
    fake_logits = fake_logits.float()
    return -fake_logits.mean() if kind == "hinge" else (fake_logits - 1.0).square().mean()


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = math.inf) -> torch.Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021): ||d rec_loss / d W|| / (||d adv_loss / d W|| + 1e-4), W the
    decoder's last layer, detached and clamped to [0, max_weight].

    VQGAN clamps at 1e4 for mean-reduced losses; mrigen's are summed over pixels and scaled by the decoder
    calibration, so the default leaves it unclamped. The epsilon already bounds the adversarial gradient at W by
    the reconstruction's, even when the discriminator's gradient vanishes.

    Times this weight, the adversarial term pulls on the decoder's output as hard as the reconstruction term does,
    whatever scale the reconstruction loss has (a sigma-VAE's summed, 1 / (2 sigma^2)-scaled error grows a
    thousandfold as sigma shrinks). A fixed weight cannot do that: it let the discriminator overrule the
    reconstruction once the error got small, and the autoencoder collapsed (bench/RESULTS.md).

    Args:
        rec_loss, adv_loss: scalar losses whose graphs reach `last_layer` (both are kept for the backward pass).
        last_layer: the weight of the decoder's final layer.

    Returns:
        A 0-dim tensor without grad.
    """
    g_rec, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_adv, = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()
