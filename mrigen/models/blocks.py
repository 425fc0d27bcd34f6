"""Encoder / decoder trunks shared by the VAE and the VQ-VAE (the thesis CNN family).

Encoder: `blocks` x [Conv2d(k, stride 2) -> norm -> LeakyReLU -> `res_blocks` x ResBlock], each halving H and W;
with `ModelConfig.plain_stem` (GroupNorm models by default) the first conv has a bias and no norm. GroupNorm
normalises each slice's own features, so after a bias-free conv it divides out any global scaling of the input: a
GroupNorm encoder that starts conv -> norm is exactly blind to a slice's intensity level, and its decoder paints
every slice at the cohort's average level (held-out per-slice mean intensity, real vs reconstruction: correlation
0.40-0.44 on the demo cohort; bench/RESULTS.md, session 23). BatchNorm normalises over the batch and keeps it.
Decoder: the mirror image (`res_blocks` x ResBlock -> ConvTranspose2d -> norm -> LeakyReLU), ending in a 1-channel
transposed conv and a sigmoid. `res_blocks=0` is the thesis CNN.
Padding is chosen so every kernel size in (3, 4, 5) halves / doubles exactly.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from mrigen.models.config import ModelConfig

__all__ = ["Decoder", "Encoder", "FiLM", "ResBlock", "check_images", "eval_mode", "make_norm", "norm_widths",
           "run_trunk"]

LEAKY_SLOPE = 0.3  # Keras' LeakyReLU default, as in the thesis


def make_norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm2d, or GroupNorm with up to 32 groups of at least 4 channels (1 group for tiny layers)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    groups = math.gcd(channels, 32)
    while groups > 1 and channels // groups < 4:
        groups //= 2
    return nn.GroupNorm(groups, channels)


def _padding(kernel_size: int) -> tuple[int, int]:
    """(padding, output_padding) so that a stride-2 conv halves and its transpose doubles exactly."""
    return (kernel_size - 1) // 2, kernel_size % 2


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv3x3(act(norm(conv3x3(act(norm(x)))))); (B, C, h, w) -> same shape."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            make_norm(norm, channels), nn.LeakyReLU(LEAKY_SLOPE), nn.Conv2d(channels, channels, 3, padding=1),
            make_norm(norm, channels), nn.LeakyReLU(LEAKY_SLOPE), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Encoder(nn.Sequential):
    """x: (B, 1, H, W) -> features (B, C_last, H / 2**blocks, W / 2**blocks)."""

    def __init__(self, cfg: ModelConfig) -> None:
        pad, _ = _padding(cfg.kernel_size)
        layers: list[nn.Module] = []
        c_in = 1
        for i, c_out in enumerate(cfg.scaled_channels):
            if i == 0 and cfg.plain_stem:      # a bias and no norm: the first features keep the slice's intensity
                layers += [nn.Conv2d(c_in, c_out, cfg.kernel_size, stride=2, padding=pad), nn.LeakyReLU(LEAKY_SLOPE)]
            else:
                layers += [
                    nn.Conv2d(c_in, c_out, cfg.kernel_size, stride=2, padding=pad, bias=False),
                    make_norm(cfg.norm, c_out),
                    nn.LeakyReLU(LEAKY_SLOPE),
                ]
            layers += [ResBlock(c_out, cfg.norm) for _ in range(cfg.res_blocks)]
            c_in = c_out
        super().__init__(*layers)
        self.out_channels = c_in


class Decoder(nn.Sequential):
    """features (B, C_last, h, w) -> image (B, 1, h * 2**blocks, w * 2**blocks) in [0, 1] (sigmoid)."""

    def __init__(self, cfg: ModelConfig) -> None:
        pad, out_pad = _padding(cfg.kernel_size)
        chans = cfg.scaled_channels[::-1]  # e.g. 1024, 256, 64, 32, 16
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [ResBlock(c_in, cfg.norm) for _ in range(cfg.res_blocks)]
            layers += [
                nn.ConvTranspose2d(c_in, c_out, cfg.kernel_size, 2, pad, output_padding=out_pad, bias=False),
                make_norm(cfg.norm, c_out),
                nn.LeakyReLU(LEAKY_SLOPE),
            ]
        layers += [ResBlock(chans[-1], cfg.norm) for _ in range(cfg.res_blocks)]
        if cfg.res_blocks:  # upsample at full width, then a 3x3 conv to one channel (fewer checkerboard artefacts)
            c = chans[-1]
            layers += [nn.ConvTranspose2d(c, c, cfg.kernel_size, 2, pad, output_padding=out_pad, bias=False),
                       make_norm(cfg.norm, c), nn.LeakyReLU(LEAKY_SLOPE), nn.Conv2d(c, 1, 3, padding=1)]
        else:  # the thesis: one transposed conv straight to the image
            layers += [nn.ConvTranspose2d(chans[-1], 1, cfg.kernel_size, 2, pad, output_padding=out_pad)]
        layers += [nn.Sigmoid()]
        super().__init__(*layers)
        self.in_channels = chans[0]


def norm_widths(trunk: nn.Sequential) -> list[int]:
    """Channel counts of the trunk's top-level norm layers, in order (where `run_trunk` applies FiLM)."""
    return [m.num_features if isinstance(m, nn.BatchNorm2d) else m.num_channels
            for m in trunk if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]


class FiLM(nn.Module):
    """Feature-wise modulation from a condition vector: h * (1 + gamma(c)) + beta(c), one linear map per norm layer.

    Zero-initialised, so a freshly built conditional model starts as its unconditional twin.

    Args:
        cond_dim: width of the condition vector c `(B, cond_dim)`.
        widths: channels of each modulated layer (`norm_widths(trunk)`).
    """

    def __init__(self, cond_dim: int, widths: list[int]) -> None:
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(cond_dim, 2 * w) for w in widths)
        for m in self.maps:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def modulate(self, i: int, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Apply map i: h `(B, C, H, W)`, c `(B, cond_dim)` -> `(B, C, H, W)`."""
        gamma, beta = self.maps[i](c).to(h.dtype).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return h * (1 + gamma) + beta


def run_trunk(trunk: nn.Sequential, x: torch.Tensor, film: FiLM | None = None, c: torch.Tensor | None = None
              ) -> torch.Tensor:
    """`trunk(x)`, with FiLM applied after each top-level norm layer when a condition vector c is given."""
    if film is None or c is None:
        return trunk(x)
    i = 0
    for layer in trunk:
        x = layer(x)
        if isinstance(layer, (nn.BatchNorm2d, nn.GroupNorm)):
            x = film.modulate(i, x, c)
            i += 1
    return x


def check_images(x: torch.Tensor, image_size: int, who: str) -> None:
    """Raise ValueError unless x is (B, 1, image_size, image_size) floating point (shape check only, no sync)."""
    if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != image_size or x.shape[3] != image_size:
        raise ValueError(f"{who} expects x of shape (B, 1, {image_size}, {image_size}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{who} expects floating-point images in [0, 1], got dtype {x.dtype}")


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run a block in eval mode without gradients, then restore the module's previous train/eval mode."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)
