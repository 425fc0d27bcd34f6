"""Models: VAE and VQ-VAE (+ code prior), their losses, and safetensors save / load.

    model = build_model(ModelConfig(family="vae"))
    out = model(x)                      # x: (B, 1, H, W) in [0, 1]
    terms = vae_loss(out, x, beta=1.0)  # LossTerms(total, recon, kl, kl_per_dim, vq)
    save_model(model, "out/model"); model = load_model("out/model")
"""

from mrigen.models.config import ModelConfig
from mrigen.models.io import load_model, read_config, save_model
from mrigen.models.losses import LossTerms, active_units, kl_per_dim, recon_loss, vae_loss, vq_vae_loss
from mrigen.models.prior import CodePrior
from mrigen.models.registry import MODELS, build_model
from mrigen.models.vae import VAE, VAEOutput
from mrigen.models.vqvae import VQVAE, VectorQuantizer, VQOutput, codebook_usage

__all__ = [
    "MODELS",
    "VAE",
    "VQVAE",
    "CodePrior",
    "LossTerms",
    "ModelConfig",
    "VAEOutput",
    "VQOutput",
    "VectorQuantizer",
    "active_units",
    "build_model",
    "codebook_usage",
    "kl_per_dim",
    "load_model",
    "read_config",
    "recon_loss",
    "save_model",
    "vae_loss",
    "vq_vae_loss",
]
