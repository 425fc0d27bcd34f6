"""Second stage of a VQ-VAE: fit its autoregressive code prior on the training split's code grids.

The budget is a number of optimiser steps (`TrainConfig.prior_steps`), not epochs: epochs of a small store are a
handful of steps, which left the prior undertrained. The learning rate decays on a cosine to 10% of `prior_lr`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from mrigen.train.config import TrainConfig

__all__ = ["PriorResult", "drop_conditions", "encode_split", "train_prior"]

REPORTS = 20  # points in the returned training-loss curve


class PriorResult(NamedTuple):
    """What `train_prior` returns: the mean training NLL (nats per code) over each twentieth of the steps, and the
    NLL of held-out code grids at the end (None when none were given)."""

    train_nll: list[float]
    val_nll: float | None


def drop_conditions(attrs: torch.Tensor, p: float, gen: torch.Generator, p_all: float = 0.0) -> torch.Tensor:
    """Hide each attribute of each row (set it to NaN = unknown) with chance p, and every attribute of a row with
    chance p_all: `(B, A)` -> `(B, A)`. With p_all = 0 the draws are those of per-attribute dropout alone."""
    if p <= 0 and p_all <= 0:
        return attrs
    hide = torch.rand(attrs.shape, device=attrs.device, generator=gen) < p
    if p_all > 0:
        hide |= (torch.rand(attrs.shape[0], device=attrs.device, generator=gen) < p_all)[:, None]
    return attrs.masked_fill(hide, float("nan"))


@torch.no_grad()
def encode_split(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Nearest-code indices of every image.

    Args:
        images: (N, 1, H, W) in [0, 1] on the model's device.

    Returns:
        (N, h, w) int64 code grid.
    """
    was_training = model.training
    model.eval()
    out = torch.cat([model.encode_indices(images[i:i + batch_size].float())
                     for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


@torch.no_grad()
def _mean_nll(prior: torch.nn.Module, codes: torch.Tensor, batch: int, attrs: torch.Tensor | None = None) -> float:
    total = 0.0
    for i in range(0, len(codes), batch):
        a = None if attrs is None else attrs[i:i + batch]
        total += float(prior.loss(codes[i:i + batch], a)) * len(codes[i:i + batch])
    return total / len(codes)


def train_prior(model: torch.nn.Module, train_x: torch.Tensor, cfg: TrainConfig, *,
                val_codes_from: torch.Tensor | None = None, progress: bool = True,
                train_attrs: torch.Tensor | None = None, val_attrs: torch.Tensor | None = None) -> PriorResult:
    """Train `model.prior` by maximum likelihood on the code grids of `train_x` for `cfg.prior_steps` steps of
    `cfg.prior_batch_size` grids (seeded batches), then mark it trained.

    Args:
        model: a VQVAE (its autoencoder is frozen here).
        train_x: (N, 1, H, W) training images on the model's device.
        cfg: prior_steps, prior_batch_size, prior_lr, seed, eval_batch_size.
        val_codes_from: optional held-out images (M, 1, H, W); their NLL under the trained prior is reported
            (an NLL far above the training one means the prior memorised the training grids).
        train_attrs, val_attrs: encoded attributes (N, A) / (M, A) of a conditional prior (see
            mrigen.models.condition); each training row's attributes are hidden with chance
            `cfg.condition_dropout` each, and all at once with chance `cfg.condition_dropout_all`.
    """
    if cfg.prior_steps < 1:
        raise ValueError(f"prior_steps={cfg.prior_steps} must be >= 1 to train a prior")
    device = train_x.device
    codes = encode_split(model, train_x, cfg.eval_batch_size)                  # (N, h, w)
    prior = model.prior
    prior.train()
    optimizer = torch.optim.Adam(prior.parameters(), lr=cfg.prior_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(s, cfg.prior_steps) / cfg.prior_steps)))
    batch = min(cfg.prior_batch_size, len(codes))
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 10_000)
    every = max(1, cfg.prior_steps // REPORTS)
    history: list[float] = []
    total = torch.zeros((), device=device)
    bar = tqdm(range(cfg.prior_steps), desc="train code prior", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(codes), (batch,), device=device, generator=gen)
        attrs = None if train_attrs is None else drop_conditions(train_attrs[idx], cfg.condition_dropout, gen,
                                                                 cfg.condition_dropout_all)
        loss = prior.loss(codes[idx], attrs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += loss.detach()
        if (step + 1) % every == 0 or step + 1 == cfg.prior_steps:        # one host sync per report
            n = (step % every) + 1
            history.append(float(total / n))
            total.zero_()
            bar.set_postfix(nll=f"{history[-1]:.3f}")
    prior.eval()
    model.mark_prior_trained()
    val_nll = None
    if val_codes_from is not None and len(val_codes_from):
        val_nll = _mean_nll(prior, encode_split(model, val_codes_from, cfg.eval_batch_size), cfg.eval_batch_size,
                            val_attrs)
    return PriorResult(history, val_nll)
