"""`ModelConfig`: the one frozen description of a VAE / VQ-VAE architecture.

`dataclasses.asdict(cfg)` is what goes into `config.json` beside the weights and into MLflow params; `from_dict`
reads it back (JSON lists become tuples) and rejects unknown keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping
from mrigen.config import config_from_dict
from mrigen.models.condition import check_names

__all__ = ["ENCODER_STEMS", "FAMILIES", "KERNEL_SIZES", "LATENTS", "LATENT_PRIORS", "MAX_FITTED_LATENT", "NORMS",
           "ModelConfig"]

FAMILIES = ("vae", "vqvae")
KERNEL_SIZES = (3, 4, 5)
NORMS = ("batch", "group")
ENCODER_STEMS = ("auto", "norm", "plain")
LATENTS = ("dense", "spatial")
LATENT_PRIORS = ("normal", "fitted", "flow")
# Largest VAE latent (entries) for latent_prior="fitted": its D x D covariance is built and Cholesky-factorised in
# float64 (8192: 0.5 GiB, ~10 s on 2 cores; 16384 took 37 s and 2 GiB per copy at 32 px in a test).
MAX_FITTED_LATENT = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model. The defaults are the thesis VAE (five k4/s2 blocks, 16-32-64-256-1024 maps,
    dense 1024-d latent, 128x128 slices)."""

    family: str = "vae"  # "vae" | "vqvae": which class `build_model` builds
    image_size: int = 128  # H = W of the input slices; a power of two >= 16 (64 / 128 / 256 in studies)
    blocks: int = 5  # encoder conv blocks, each halving H and W (decoder mirrors); grid = image_size / 2**blocks
    grid: int = 0  # latent grid side h = w; > 0 sets blocks = log2(image_size / grid) (portable across sizes)
    channels: tuple[int, ...] = (16, 32, 64, 256, 1024, 1024)  # feature-map ladder; block i uses channels[i]
    width: float = 1.0  # multiplier on every entry of `channels` (rounded, at least 1)
    kernel_size: int = 4  # conv / transposed-conv kernel: 3, 4 or 5 (stride 2, padding keeps exact halving)
    norm: str = "batch"  # "batch" (BatchNorm2d, the thesis) | "group" (GroupNorm, batch-size independent)
    encoder_stem: str = "auto"  # the encoder's first conv: "norm" = conv -> norm -> act (the thesis) | "plain" = conv
    #                             with a bias -> act, no norm | "auto" = "plain" with norm="group", else "norm".
    #                             GroupNorm straight after a bias-free conv divides out any global scaling of the
    #                             slice: the encoder could not see a slice's intensity level (models/blocks.py)
    res_blocks: int = 0  # residual blocks (norm-act-conv3x3 twice, plus skip) after each resolution change; 0 = thesis
    latent: str = "dense"  # "dense" vector (B, latent_dim) | "spatial" map (B, latent_dim, h, w); VQ-VAE: "spatial"
    latent_dim: int = 1024  # VAE only: dense latent size, or channels of the spatial latent map
    latent_prior: str = "normal"  # VAE sampling: "normal" z ~ N(0, I) | "fitted" Gaussian mixture fitted to the
    #                               training posterior means after training (mrigen.models.latent_prior) | "flow" a
    #                               flow-matching U-Net over a spatial latent, trained for train.prior_steps after
    #                               the autoencoder (mrigen.models.latent_flow)
    latent_prior_components: int = 32  # fitted prior: k-means components (fewer on small sets); 1 = one Gaussian
    flow_width: int = 64  # flow prior: feature maps of its U-Net at the latent grid's resolution (a multiple of 8)
    flow_steps: int = 25  # flow prior: Heun steps from noise to a latent when sampling (two network calls each)
    flow_guide: bool = False  # flow prior: also keep a guide, the flow's own EMA weights from early in its training
    #                           (train.flow_guide_at), for autoguidance (sample_autoguidance)
    codebook_size: int = 512  # VQ-VAE: number of codes K
    code_dim: int = 64  # VQ-VAE: channels of each code vector
    commitment: float = 0.25  # VQ-VAE: weight of the commitment term ||z_e - sg(q)||^2
    ema_decay: float = 0.99  # VQ-VAE: decay of the EMA codebook updates, in (0, 1)
    dead_code_threshold: float = 1.0  # VQ-VAE: EMA usage (vectors per batch) below which a code is restarted; 0 = never
    prior_channels: int = 128  # VQ-VAE code prior: transformer width (a multiple of 16; heads = width / 16)
    prior_layers: int = 4  # VQ-VAE code prior: transformer blocks
    sample_temperature: float = 1.0  # VQ-VAE sampling: prior logits divided by this (< 1 sharper, > 1 more varied)
    sample_top_k: int = 0  # VQ-VAE sampling: keep only the k most likely codes per position; 0 = all
    sample_guidance: float = 1.0  # conditional VQ-VAE / flow-VAE sampling: classifier-free guidance (>= 1; 1 = off)
    sample_guidance_on: tuple[str, ...] = ()  # attributes guidance strengthens (a subset of conditions); () = all
    sample_autoguidance: float = 1.0  # flow-VAE sampling: autoguidance weight w (>= 1; 1 = off; needs flow_guide):
    #                                   velocity v_guide + w * (v - v_guide) (Karras et al., 2024)
    conditions: tuple[str, ...] = ()  # attributes to condition on (slice_pos, site, age, sex); () = unconditional.
    #                                   VAE: FiLM in encoder and decoder, or with latent_prior="flow" the flow alone;
    #                                   VQ-VAE: the code prior alone
    condition_dim: int = 64  # VAE: width of the condition embedding fed to FiLM (VQ-VAE prior: prior_channels)

    @property
    def plain_stem(self) -> bool:
        """Whether the encoder's first conv has a bias and no norm after it (`encoder_stem`, "auto" resolved)."""
        return self.encoder_stem == "plain" or (self.encoder_stem == "auto" and self.norm == "group")

    @property
    def autoencoder_conditioned(self) -> bool:
        """Whether the encoder / decoder take the attributes (a conditional VAE without the flow prior); otherwise
        only the prior reads them (VQ-VAE, flow-prior VAE) and reconstruction needs none."""
        return bool(self.conditions) and self.family == "vae" and self.latent_prior != "flow"

    def __post_init__(self) -> None:
        # JSON / YAML give lists; keep the dataclass hashable
        for name in ("channels", "conditions", "sample_guidance_on"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.conditions, str):  # a single attribute from --set model.conditions=site
            object.__setattr__(self, "conditions", (self.conditions,) if self.conditions else ())
        if not isinstance(self.conditions, tuple) or not all(isinstance(c, str) for c in self.conditions):
            raise ValueError(f"conditions={self.conditions!r} must be a list of attribute names")
        check_names(self.conditions)
        if isinstance(self.sample_guidance_on, str):
            guided = (self.sample_guidance_on,) if self.sample_guidance_on else ()
            object.__setattr__(self, "sample_guidance_on", guided)
        guided = self.sample_guidance_on
        if not isinstance(guided, tuple) or not all(isinstance(a, str) for a in guided):
            raise ValueError(f"sample_guidance_on={self.sample_guidance_on!r} must be a list of attribute names")
        stray = [a for a in self.sample_guidance_on if a not in self.conditions]
        if stray:
            raise ValueError(f"sample_guidance_on={list(self.sample_guidance_on)!r}: {stray} not in conditions="
                             f"{list(self.conditions)!r}")
        _check_int("grid", self.grid, minimum=0)
        _check_int("image_size", self.image_size, minimum=1)
        if self.grid:
            if self.grid & (self.grid - 1) or self.grid >= self.image_size:
                raise ValueError(f"grid={self.grid!r} must be a power of two below image_size={self.image_size} "
                                 "(e.g. 8 or 16), or 0 to derive it from blocks")
            object.__setattr__(self, "blocks", (self.image_size // self.grid).bit_length() - 1)
        _check_choice("family", self.family, FAMILIES)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("encoder_stem", self.encoder_stem, ENCODER_STEMS)
        _check_choice("latent", self.latent, LATENTS)
        _check_choice("latent_prior", self.latent_prior, LATENT_PRIORS)
        _check_choice("kernel_size", self.kernel_size, KERNEL_SIZES)
        for name in ("image_size", "blocks", "latent_dim", "codebook_size", "code_dim", "prior_channels",
                     "prior_layers", "condition_dim", "latent_prior_components", "flow_width", "flow_steps"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.image_size < 16 or self.image_size & (self.image_size - 1):
            raise ValueError(f"image_size={self.image_size!r} must be a power of two >= 16 (e.g. 64, 128, 256)")
        if not isinstance(self.channels, tuple) or not self.channels or not all(
            _is_int(c) and c >= 1 for c in self.channels
        ):
            raise ValueError(f"channels={self.channels!r} must be a non-empty tuple of positive ints")
        if self.blocks > len(self.channels):
            raise ValueError(
                f"blocks={self.blocks} needs at least that many channels entries, but channels has "
                f"{len(self.channels)}: {self.channels}"
            )
        if 2**self.blocks > self.image_size:
            raise ValueError(
                f"blocks={self.blocks} halves image_size={self.image_size} below 1 pixel "
                f"(need image_size / 2**blocks >= 1, i.e. blocks <= {self.image_size.bit_length() - 1})"
            )
        _check_number("width", self.width, low=0.0, low_open=True)
        _check_number("commitment", self.commitment, low=0.0)
        _check_number("ema_decay", self.ema_decay, low=0.0, high=1.0, low_open=True)
        _check_number("dead_code_threshold", self.dead_code_threshold, low=0.0)
        _check_int("res_blocks", self.res_blocks, minimum=0)
        _check_int("sample_top_k", self.sample_top_k, minimum=0)
        _check_number("sample_temperature", self.sample_temperature, low=0.0, low_open=True)
        _check_number("sample_guidance", self.sample_guidance, low=1.0)
        _check_number("sample_autoguidance", self.sample_autoguidance, low=1.0)
        if not isinstance(self.flow_guide, bool):
            raise ValueError(f"flow_guide={self.flow_guide!r} must be true or false")
        if self.flow_guide and self.latent_prior != "flow":
            raise ValueError(f"flow_guide=True keeps a guide for the flow prior: it needs latent_prior='flow', got "
                             f"{self.latent_prior!r}")
        if self.sample_autoguidance != 1.0 and not self.flow_guide:
            raise ValueError(f"sample_autoguidance={self.sample_autoguidance!r} needs a guide network: set "
                             "flow_guide=true (and latent_prior='flow') before training, or sample_autoguidance=1")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size={self.codebook_size} must be >= 2")
        if self.prior_channels % 16:
            raise ValueError(f"prior_channels={self.prior_channels} must be a multiple of 16 (16 channels per head)")
        if self.family == "vqvae" and self.latent != "spatial":
            raise ValueError(
                f"family='vqvae' quantizes a spatial grid of codes: latent={self.latent!r} is not allowed, "
                "use latent='spatial'"
            )
        if self.family == "vqvae" and self.latent_prior != "normal":
            raise ValueError(f"latent_prior={self.latent_prior!r} is a VAE option; a VQ-VAE samples from its code "
                             "prior (prior_channels, prior_layers, sample_temperature, sample_top_k)")
        if self.flow_width % 8:
            raise ValueError(f"flow_width={self.flow_width} must be a multiple of 8 (GroupNorm groups)")
        if self.latent_prior == "flow":
            if self.latent != "spatial" or self.grid_size < 2 or self.grid_size % 2:
                raise ValueError(f"latent_prior='flow' is a convolutional prior over a latent grid: it needs "
                                 f"latent='spatial' and an even grid of at least 2x2 (got latent={self.latent!r}, "
                                 f"grid {self.grid_size}x{self.grid_size})")
        if self.latent_prior == "fitted" and self.latent_entries > MAX_FITTED_LATENT:
            gib = self.latent_entries**2 * 8 / 2**30
            raise ValueError(
                f"latent_prior='fitted' fits a full covariance over the latent's {self.latent_entries} entries "
                f"({self.latent_dim} x {self.grid_size}x{self.grid_size}: a {gib:.1f} GiB float64 matrix to factorise"
                f"): at most {MAX_FITTED_LATENT}; lower latent_dim or grid, or use latent_prior='normal'"
                if self.latent == "spatial" else
                f"latent_prior='fitted' fits a full covariance over latent_dim={self.latent_dim} entries: at most "
                f"{MAX_FITTED_LATENT}; lower latent_dim or use latent_prior='normal'")

    @property
    def grid_size(self) -> int:
        """Side h = w of the encoder's output grid: image_size / 2**blocks."""
        return self.image_size >> self.blocks

    @property
    def latent_entries(self) -> int:
        """Entries of one VAE latent: latent_dim (dense) or latent_dim * grid_size**2 (spatial)."""
        return self.latent_dim * (self.grid_size**2 if self.latent == "spatial" else 1)

    @property
    def scaled_channels(self) -> tuple[int, ...]:
        """The `blocks` feature-map counts actually built: channels[:blocks] times `width` (at least 1)."""
        return tuple(max(1, round(c * self.width)) for c in self.channels[: self.blocks])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from a plain mapping (e.g. parsed JSON / YAML), rejecting keys that are not fields.

        Raises:
            ValueError: naming the unknown keys and the valid ones, or any invalid field value.
        """
        return config_from_dict(cls, d)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; allowed: {', '.join(map(repr, allowed))}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")


def _check_number(name: str, value: Any, low: float, high: float | None = None, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"{name}={value!r} must be a number {bound}")
