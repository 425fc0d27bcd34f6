"""The model registry: `MODELS` maps `ModelConfig.family` to its class; `build_model` builds from a config."""

from __future__ import annotations

from torch import nn

from mrigen.models.config import ModelConfig
from mrigen.models.vae import VAE
from mrigen.models.vqvae import VQVAE

__all__ = ["MODELS", "build_model"]

MODELS: dict[str, type[nn.Module]] = {"vae": VAE, "vqvae": VQVAE}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the model class for `cfg.family` (fresh weights, train mode, on CPU).

    Raises:
        ValueError: if the family is not in MODELS (names the valid choices).
    """
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"build_model needs a ModelConfig, got {type(cfg).__name__}")
    try:
        cls = MODELS[cfg.family]
    except KeyError:
        raise ValueError(f"family={cfg.family!r} is not a known model; choose one of {sorted(MODELS)}") from None
    return cls(cfg)
