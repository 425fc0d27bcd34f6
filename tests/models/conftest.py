"""Tiny model configs for the model tests (few channels, 16-64 px) so everything runs on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from mrigen.models import ModelConfig

TINY = dict(
    image_size=16,
    blocks=4,
    channels=(4, 4, 8, 8, 8, 8),
    latent_dim=8,
    codebook_size=16,
    code_dim=4,
    prior_channels=32,
    prior_layers=2,
)


def tiny_config(**overrides) -> ModelConfig:
    """A tiny ModelConfig; VQ-VAE configs get latent='spatial' unless told otherwise."""
    fields = dict(TINY)
    if overrides.get("family") == "vqvae":
        fields["latent"] = "spatial"
    fields.update(overrides)
    return ModelConfig(**fields)


def blobs(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n smooth brain-like test images (B, 1, size, size) in [0, 1]: a bright ellipse with a darker core."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    a = 0.6 + 0.3 * torch.rand(n, 1, 1, generator=g)
    b = 0.5 + 0.3 * torch.rand(n, 1, 1, generator=g)
    outer = ((xx / a) ** 2 + (yy / b) ** 2 < 1).float()
    inner = ((xx / (a / 2)) ** 2 + (yy / (b / 2)) ** 2 < 1).float()
    return (0.8 * outer - 0.4 * inner).clamp(0, 1).unsqueeze(1)


@pytest.fixture
def make_cfg():
    return tiny_config


@pytest.fixture
def make_images():
    return blobs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

