"""Training configuration: one frozen dataclass, `asdict(cfg)` is what checkpoints and MLflow record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from mrigen.config import config_from_dict

__all__ = ["TrainConfig"]

_RECON = ("mse", "l1")
_AMP = ("auto", "bf16", "off")
_PRIOR_AMP = ("off", "bf16")
_SIGMA = ("fixed", "optimal", "learned")
_ADV = ("hinge", "lsgan")
_AUGMENT = ("none", "flip", "flip_shift")
FLOW_TIMES = ("uniform", "logit_normal")   # TrainConfig.flow_time: see FlowLatentPrior.loss


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained. Every default is the thesis setting unless noted."""

    epochs: int = 30                 # passes over the training split (thesis: 30-500)
    batch_size: int = 64             # images per optimiser step (thesis: 64)
    lr: float = 5e-4                 # Adam learning rate (thesis: 5e-4)
    weight_decay: float = 0.0        # AdamW-style decoupled weight decay; 0 = plain Adam
    seed: int = 0                    # seeds weights, batch order and sampling noise (recorded)
    device: str = "auto"             # "auto" = CUDA if present else CPU; or "cpu", "cuda", "cuda:N"
    amp: str = "auto"                # "auto" = bf16 autocast on CUDA, fp32 on CPU; "bf16" forces; "off" disables
    channels_last: bool = True       # NHWC memory format (faster convolutions on CUDA and on the CPU)
    recon: str = "mse"               # reconstruction term, summed per image: "mse" (Gaussian) or "l1" (Laplace)
    ssim_weight: float = 0.0         # extra (1 - SSIM) term per image, weighted; 0 = off
    spectral_weight: float = 0.0     # extra local log-amplitude spectrum term per image (detail each 16 px patch
                                     # should show, phase-free), weighted like the SSIM term; 0 = off
    beta: float = 1.0                # weight of the KL term (beta-VAE); 1 = the ELBO
    kl_warmup_epochs: int = 0        # KL weight rises linearly 0 -> 1 over this many epochs; 0 = full from start
    free_bits: float = 0.0           # nats per latent dimension not penalised (prevents posterior collapse)
    sigma: str = "fixed"             # VAE decoder scale: "fixed" (plain sum of errors, the thesis), "optimal" (batch
                                     # RMS error: sigma-VAE) or "learned" (the model's log_sigma)
    adv_weight: float = 0.0          # patch-adversarial term: its pull on the decoder's last layer relative to the
                                     # reconstruction's (VQGAN adaptive weight); 0 = off
    adv_loss: str = "hinge"          # adversarial loss: "hinge" or "lsgan" (least squares)
    adv_start_epoch: int = 0         # epochs of plain autoencoder training before the discriminator joins (warm-up)
    disc_lr: float = 2e-4            # discriminator learning rate (Adam, betas 0.5 / 0.9)
    augment: str = "none"            # training-batch augmentation: "none", "flip" (left-right) or "flip_shift"
                                     # (flip + up to 1/16 of the side of random translation)
    early_stop_patience: int = 0     # stop after this many epochs without a better val_ssim and keep the best
                                     # weights; 0 = train all epochs
    condition_dropout: float = 0.1   # conditional models: chance that each attribute of a training row is hidden
                                     # (trains the "unknown" embedding, used for missing values)
    condition_dropout_all: float = 0.0   # conditional models: chance that a training row hides all its attributes at
                                         # once (trains the fully unconditional branch that guidance on several
                                         # attributes compares against)
    prior_steps: int = 2000          # VQ-VAE's code prior / VAE's flow prior (model.latent_prior="flow"): optimiser
                                     # steps of the prior after the autoencoder
    prior_lr: float = 1e-3           # those priors' learning rate (cosine decay to 10% over prior_steps)
    prior_batch_size: int = 64       # those priors: code grids / latents per step
    prior_amp: str = "off"           # those priors' training steps: "off" (fp32) or "bf16" autocast. On this 2-core
                                     # CPU (avx512_bf16) the flow's steps run 1.45x as fast, the code prior's slower
                                     # (bench/RESULTS.md, session 22)
    prior_keep_best: bool = True     # those priors: keep the weights of the report (every twentieth of the steps)
                                     # with the lowest held-out loss when the last one ends more than 1% above it (a
                                     # prior fitting its training grids, not their distribution); the flow keeps
                                     # none from before its guide was taken
    prior_mirror: bool = False       # those priors: also train on the code grids / latents of every training slice's
                                     # left-right mirror image (twice the data for the stage that overfits first;
                                     # the copy detector counts a mirrored training slice as a copy)
    flow_time: str = "uniform"       # VAE flow prior: how a training step draws its path time t: "uniform" in
                                     # [0, 1] or "logit_normal" (sigmoid of N(0, 1): more steps mid-path, where the
                                     # velocity is hardest to learn; fd_ratio 1.18-1.27 vs 1.43-1.49 at 2,500 steps)
    flow_guide_at: float = 0.2       # VAE flow prior with model.flow_guide: the share of prior_steps after which its
                                     # EMA weights are copied into the guide network (autoguidance: a weaker
                                     # version of the same flow; see FlowLatentPrior.draw)
    grid_every: int = 5              # epochs between image grids (real | reconstruction | samples); 0 = end only
    grid_n: int = 8                  # images per grid row
    eval_batch_size: int = 512       # images per forward pass in validation
    final_eval: bool = True          # run the full quality evaluation (FD, precision/recall...) at the end
    eval_samples: int = 0            # samples for the final evaluation; 0 = the metrics' default (500)
    eval_feature_nets: int = 0       # feature networks the final evaluation averages (each count is its own
                                     # metric and cache file); 0 = the default, 3 (MRIGEN_FEATURE_NET_MEMBERS)
    checkpoint_every_s: float = 300.0  # seconds between resumable checkpoints (with an output dir); one is always
                                     # written after the last epoch; 0 = after every epoch

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "prior_batch_size", "eval_batch_size", "grid_n")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be >= 1")
        non_negative = ("weight_decay", "ssim_weight", "spectral_weight", "beta", "kl_warmup_epochs", "free_bits",
                        "prior_steps", "grid_every", "eval_samples", "eval_feature_nets", "checkpoint_every_s",
                        "adv_weight", "adv_start_epoch", "early_stop_patience")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be >= 0")
        for name in ("lr", "prior_lr", "disc_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be > 0")
        for name in ("condition_dropout", "condition_dropout_all"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be in [0, 1)")
        for name in ("prior_keep_best", "prior_mirror", "final_eval"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be true or false")
        if not 0 < self.flow_guide_at < 1:
            raise ValueError(f"TrainConfig.flow_guide_at={self.flow_guide_at!r} must be in (0, 1)")
        if self.recon not in _RECON:
            raise ValueError(f"TrainConfig.recon={self.recon!r} is not one of {_RECON}")
        if self.amp not in _AMP:
            raise ValueError(f"TrainConfig.amp={self.amp!r} is not one of {_AMP}")
        for name, allowed in (("sigma", _SIGMA), ("adv_loss", _ADV), ("augment", _AUGMENT),
                              ("flow_time", FLOW_TIMES), ("prior_amp", _PRIOR_AMP)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is not one of {allowed}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a plain dict, refusing unknown keys by name."""
        return config_from_dict(cls, data)
