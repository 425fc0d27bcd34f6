"""Second stage of a two-stage model: a VQ-VAE's autoregressive code prior on the training split's code grids
(`train_prior`), or a VAE's flow-matching latent prior on the training split's posteriors (`train_latent_flow`).

The budget is a number of optimiser steps (`TrainConfig.prior_steps`), not epochs: epochs of a small store are a
handful of steps, which left the prior undertrained. The learning rate decays on a cosine to 10% of `prior_lr`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from mrigen.train.config import TrainConfig

__all__ = ["FLOW_EMA_DECAY", "PriorResult", "best_report", "drop_conditions", "encode_posteriors", "encode_split",
           "train_latent_flow", "train_prior"]

REPORTS = 20  # points in the returned loss curves (training, and held-out when held-out data is given)
KEEP_BEST_MARGIN = 0.01  # cfg.prior_keep_best: the last held-out loss must exceed the lowest by this share
FLOW_EMA_DECAY = 0.999  # the flow prior samples with an exponential moving average of its weights


class PriorResult(NamedTuple):
    """What `train_prior` / `train_latent_flow` return. `train_nll`: the mean training loss over each twentieth of
    the steps (code prior: NLL in nats per code; flow: flow-matching loss); `steps`: the step each point ends at;
    `val_curve`: the held-out loss at those steps, with the weights the prior would sample with then (the flow's
    EMA) (empty when no held-out data was given): a curve that turns up while the training loss falls is a prior
    fitting its training grids rather than their distribution; `val_nll`: the held-out loss of the weights kept
    (None without held-out data); `kept_step`: the step whose weights were kept instead of the last one's
    (`TrainConfig.prior_keep_best`), None when the last weights were kept."""

    train_nll: list[float]
    val_nll: float | None
    steps: list[int] = []
    val_curve: list[float] = []
    kept_step: int | None = None

    def rows(self) -> list[dict[str, float]]:
        """One dict per report: {"step", "train_loss"} and "val_loss" when held-out data was given."""
        return [{"step": step, "train_loss": train, **({"val_loss": self.val_curve[i]} if self.val_curve else {})}
                for i, (step, train) in enumerate(zip(self.steps, self.train_nll, strict=True))]


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
def encode_split(model: torch.nn.Module, images: torch.Tensor, batch_size: int, mirror: bool = False
                 ) -> torch.Tensor:
    """Nearest-code indices of every image (of its left-right mirror image with `mirror`, flipped a batch at a time).

    Args:
        images: (N, 1, H, W) in [0, 1] on the model's device.

    Returns:
        (N, h, w) int64 code grid.
    """
    was_training = model.training
    model.eval()
    out = torch.cat([model.encode_indices(_batch(images, i, batch_size, mirror))
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


def _autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """The autocast of a prior's training step: bf16 with `cfg.prior_amp == "bf16"`, else none (fp32). The weights,
    the optimiser, the held-out loss and sampling stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.prior_amp == "bf16")


def _cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate on a cosine from the optimiser's to 10% of it over `steps`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def train_prior(model: torch.nn.Module, train_x: torch.Tensor, cfg: TrainConfig, *,
                val_codes_from: torch.Tensor | None = None, progress: bool = True,
                train_attrs: torch.Tensor | None = None, val_attrs: torch.Tensor | None = None) -> PriorResult:
    """Train `model.prior` by maximum likelihood on the code grids of `train_x` for `cfg.prior_steps` steps of
    `cfg.prior_batch_size` grids (seeded batches), then mark it trained.

    Args:
        model: a VQVAE (its autoencoder is frozen here).
        train_x: (N, 1, H, W) training images on the model's device.
        cfg: prior_steps, prior_batch_size, prior_lr, seed, eval_batch_size.
        val_codes_from: optional held-out images (M, 1, H, W) (never mirrored); their NLL is measured at every
            report (an NLL climbing while the training one falls means the prior is memorising the training grids); with
            `cfg.prior_keep_best` the weights of the lowest one are kept when the last ends more than 1% above it.
        train_attrs, val_attrs: encoded attributes (N, A) / (M, A) of a conditional prior (see
            mrigen.models.condition); each training row's attributes are hidden with chance
            `cfg.condition_dropout` each, and all at once with chance `cfg.condition_dropout_all`.

    With `cfg.prior_mirror` the prior trains on 2N grids: those of `train_x` and of its left-right mirror images
    (their attributes repeated: none is lateral).
    """
    if cfg.prior_steps < 1:
        raise ValueError(f"prior_steps={cfg.prior_steps} must be >= 1 to train a prior")
    device = train_x.device
    codes = encode_split(model, train_x, cfg.eval_batch_size)                  # (N, h, w)
    if cfg.prior_mirror:
        codes = torch.cat([codes, encode_split(model, train_x, cfg.eval_batch_size, mirror=True)])
        train_attrs = _repeat(train_attrs)
    val_codes = (encode_split(model, val_codes_from, cfg.eval_batch_size)
                 if val_codes_from is not None and len(val_codes_from) else None)
    prior = model.prior
    prior.train()
    optimizer = torch.optim.Adam(prior.parameters(), lr=cfg.prior_lr)
    schedule = _cosine(optimizer, cfg.prior_steps)
    batch = min(cfg.prior_batch_size, len(codes))
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 10_000)
    every = max(1, cfg.prior_steps // REPORTS)
    history: list[float] = []
    steps: list[int] = []
    val_curve: list[float] = []
    best: list[torch.Tensor] = []        # the parameters at the lowest held-out loss (cfg.prior_keep_best)
    total = torch.zeros((), device=device)
    bar = tqdm(range(cfg.prior_steps), desc="train code prior", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(codes), (batch,), device=device, generator=gen)
        attrs = None if train_attrs is None else drop_conditions(train_attrs[idx], cfg.condition_dropout, gen,
                                                                 cfg.condition_dropout_all)
        with _autocast(cfg, device):
            loss = prior.loss(codes[idx], attrs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += loss.detach()
        if (step + 1) % every == 0 or step + 1 == cfg.prior_steps:        # one host sync per report
            n = (step % every) + 1
            history.append(float(total / n))
            steps.append(step + 1)
            total.zero_()
            if val_codes is not None:
                prior.eval()
                val_curve.append(_mean_nll(prior, val_codes, cfg.eval_batch_size, val_attrs))
                prior.train()
                if cfg.prior_keep_best and val_curve[-1] < min(val_curve[:-1], default=math.inf):
                    best = [t.detach().clone() for t in prior.parameters()]
            bar.set_postfix(nll=f"{history[-1]:.3f}", **({"val": f"{val_curve[-1]:.3f}"} if val_curve else {}))
    prior.eval()
    kept = best_report(val_curve) if cfg.prior_keep_best else None
    if kept is not None:
        _copy_weights(prior, prior, best)
    model.mark_prior_trained()
    return PriorResult(history, val_curve[-1 if kept is None else kept] if val_curve else None, steps, val_curve,
                       None if kept is None else steps[kept])


def best_report(val_curve: list[float], first: int = 0) -> int | None:
    """Index of the lowest held-out loss among reports `first`.., when the last report ends more than
    `KEEP_BEST_MARGIN` above it (the prior then fits its training data, not their distribution); else None (keep the
    last weights: a curve still falling, or flat within the margin)."""
    if len(val_curve) <= first:
        return None
    best = min(range(first, len(val_curve)), key=val_curve.__getitem__)
    return best if val_curve[-1] > val_curve[best] * (1 + KEEP_BEST_MARGIN) else None


@torch.no_grad()
def encode_posteriors(model: torch.nn.Module, images: torch.Tensor, batch_size: int, mirror: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and log-variances of every image (of its left-right mirror with `mirror`) under a VAE, in
    eval mode.

    Args:
        images: (N, 1, H, W) in [0, 1] on the model's device.

    Returns:
        (mu, logvar), each (N, *model.latent_shape).
    """
    was_training = model.training
    model.eval()
    parts = [model.encode(_batch(images, i, batch_size, mirror)) for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train_latent_flow(model: torch.nn.Module, train_x: torch.Tensor, cfg: TrainConfig, *,
                      val_from: torch.Tensor | None = None, progress: bool = True,
                      train_attrs: torch.Tensor | None = None, val_attrs: torch.Tensor | None = None) -> PriorResult:
    """Train a VAE's flow prior (`model.latent_prior`, a FlowLatentPrior) on the posteriors of `train_x` for
    `cfg.prior_steps` steps of `cfg.prior_batch_size` latents (seeded batches, cosine learning rate from
    `cfg.prior_lr`), keep the exponential moving average of its weights (decay `FLOW_EMA_DECAY`, lower over the
    first steps so that a short run does not average in its initial weights) and mark it trained. A flow with a
    guide network (`model.flow_guide`) gets the EMA weights as they are after `cfg.flow_guide_at` of the steps
    copied into it: the weaker version of itself that autoguidance steps away from.

    Args:
        model: a VAE with `latent_prior == "flow"` (its autoencoder is frozen here).
        train_x: (N, 1, H, W) training images on the model's device.
        cfg: prior_steps, prior_batch_size, prior_lr, flow_time, flow_guide_at, seed, eval_batch_size.
        val_from: optional held-out images (M, 1, H, W); their flow-matching loss under the EMA weights is
            measured at every report (one far above the training loss means the flow fitted the training latents,
            not the distribution; measured on the demo cohort: 0.95-0.97 held-out vs 0.90-0.93 training); with
            `cfg.prior_keep_best` the EMA weights of the lowest one (from the guide's step on) are kept when the
            last ends more than 1% above it.
        train_attrs, val_attrs: encoded attributes (N, A) / (M, A) of a conditional flow; each training row's
            attributes are hidden with chance `cfg.condition_dropout` each, and all at once with chance
            `cfg.condition_dropout_all` (what classifier-free guidance needs).

    With `cfg.prior_mirror` the flow (and its standardisation) trains on 2N posteriors: those of `train_x` and of
    its left-right mirror images (their attributes repeated); the held-out images are never mirrored.

    Returns:
        PriorResult whose "nll" fields hold the flow-matching loss (mean squared velocity error per entry).
    """
    if cfg.prior_steps < 1:
        raise ValueError(f"prior_steps={cfg.prior_steps} must be >= 1 to train a prior")
    device = train_x.device
    flow = model.latent_prior
    mu, logvar = encode_posteriors(model, train_x, cfg.eval_batch_size)
    if cfg.prior_mirror:
        mirrored = encode_posteriors(model, train_x, cfg.eval_batch_size, mirror=True)
        mu, logvar = torch.cat([mu, mirrored[0]]), torch.cat([logvar, mirrored[1]])
        train_attrs = _repeat(train_attrs)
    val_post = (encode_posteriors(model, val_from, cfg.eval_batch_size)
                if val_from is not None and len(val_from) else None)
    flow.set_standardisation(mu, logvar)
    # The autoencoder trains channels_last, and its flow's weights came along; the flow's small convolutions are as
    # fast contiguous in fp32 and only contiguous gain from bf16 (70 vs 105 ms a step at 64 px on 2 cores).
    flow.to(memory_format=torch.contiguous_format)
    optimizer = torch.optim.Adam(flow.net.parameters(), lr=cfg.prior_lr)
    schedule = _cosine(optimizer, cfg.prior_steps)
    ema = [p.detach().clone() for p in flow.net.parameters()]
    batch = min(cfg.prior_batch_size, len(mu))
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 20_000)
    every = max(1, cfg.prior_steps // REPORTS)
    guide_step = max(1, round(cfg.flow_guide_at * cfg.prior_steps))
    history: list[float] = []
    steps: list[int] = []
    val_curve: list[float] = []
    first_kept = 0                       # reports before the guide step cannot be kept (cfg.prior_keep_best)
    best: list[torch.Tensor] = []
    total = torch.zeros((), device=device)
    flow.train()
    bar = tqdm(range(cfg.prior_steps), desc="train flow prior", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(mu), (batch,), device=device, generator=gen)
        attrs = None if train_attrs is None else drop_conditions(train_attrs[idx], cfg.condition_dropout, gen,
                                                                 cfg.condition_dropout_all)
        with _autocast(cfg, device):
            loss = flow.loss(mu[idx], logvar[idx], gen, attrs, time=cfg.flow_time)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(FLOW_EMA_DECAY, (1 + step) / (10 + step))        # warm-up: early weights fade fast
            torch._foreach_lerp_(ema, [p.detach() for p in flow.net.parameters()], 1.0 - decay)
            if flow.guide is not None and step + 1 == guide_step:
                _copy_weights(flow.guide, flow.net, ema)
        total += loss.detach()
        if (step + 1) % every == 0 or step + 1 == cfg.prior_steps:        # one host sync per report
            history.append(float(total / ((step % every) + 1)))
            steps.append(step + 1)
            total.zero_()
            if val_post is not None:                                   # held out, with the EMA weights
                with _weights(flow.net, ema):
                    val_curve.append(_flow_loss(flow, *val_post, cfg.eval_batch_size, cfg.seed, val_attrs,
                                                cfg.flow_time))
                if flow.guide is not None and step + 1 < guide_step:  # never keep a flow weaker than its guide
                    first_kept = len(val_curve)
                elif cfg.prior_keep_best and val_curve[-1] < min(val_curve[first_kept:-1], default=math.inf):
                    best = [t.detach().clone() for t in ema]
            bar.set_postfix(loss=f"{history[-1]:.3f}", **({"val": f"{val_curve[-1]:.3f}"} if val_curve else {}))
    kept = best_report(val_curve, first_kept) if cfg.prior_keep_best else None
    _copy_weights(flow.net, flow.net, ema if kept is None else best)
    flow.eval()
    flow.trained.fill_(True)
    return PriorResult(history, val_curve[-1 if kept is None else kept] if val_curve else None, steps, val_curve,
                       None if kept is None else steps[kept])


def _batch(images: torch.Tensor, start: int, size: int, mirror: bool) -> torch.Tensor:
    """images[start:start + size] as float, flipped left-right with `mirror`."""
    x = images[start:start + size].float()
    return x.flip(-1) if mirror else x


def _repeat(attrs: torch.Tensor | None) -> torch.Tensor | None:
    """Attributes `(N, A)` -> `(2N, A)` for the training rows followed by their mirror images (None stays None)."""
    return None if attrs is None else torch.cat([attrs, attrs])


@contextlib.contextmanager
def _weights(net: torch.nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """Run the body with `params` in place of `net`'s parameters and in eval mode; then put back its own weights
    and mode."""
    own = [p.detach().clone() for p in net.parameters()]
    was_training = net.training
    _copy_weights(net, net, params)
    net.eval()
    try:
        yield
    finally:
        _copy_weights(net, net, own)
        net.train(was_training)


@torch.no_grad()
def _copy_weights(target: torch.nn.Module, source: torch.nn.Module, params: list[torch.Tensor]) -> None:
    """`target` := `source`'s state (buffers: the condition bank) with `params` in place of its parameters."""
    if target is not source:
        target.load_state_dict(source.state_dict())
    for p, value in zip(target.parameters(), params, strict=True):
        p.copy_(value)


@torch.no_grad()
def _flow_loss(flow: torch.nn.Module, mu: torch.Tensor, logvar: torch.Tensor, batch: int, seed: int,
               attrs: torch.Tensor | None = None, time: str = "uniform") -> float:
    gen = torch.Generator(device=mu.device).manual_seed(seed + 30_000)
    total = 0.0
    for i in range(0, len(mu), batch):
        a = None if attrs is None else attrs[i:i + batch]
        total += float(flow.loss(mu[i:i + batch], logvar[i:i + batch], gen, a, time)) * len(mu[i:i + batch])
    return total / len(mu)
