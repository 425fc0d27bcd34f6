"""The one training loop, shared by `python -m mrigen.train`, the tuner and the tests.

GPU path: the whole training split lives on the device as one tensor, batches are index_select'ed there,
bf16 autocast + channels_last, losses accumulate on the device and are read once per epoch (no per-batch
host sync). Every epoch is seeded from (seed, epoch), so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from mrigen.device import pick_device
from mrigen.models import ModelConfig, build_model, save_model
from mrigen.models.adversarial import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from mrigen.models.losses import active_units, vae_loss, vq_vae_loss
from mrigen.train.config import TrainConfig
from mrigen.train.hooks import Hook, StopTraining, TrainContext
from mrigen.train.augment import augment_batch
from mrigen.train.images import make_grid
from mrigen.models.condition import encode_rows
from mrigen.train.prior import PriorResult, drop_conditions, train_latent_flow, train_prior
from mrigen.train.state import CheckpointError, CheckpointWriter, load_checkpoint

__all__ = ["train", "TrainResult", "epoch_seed"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What `train` returns."""

    model: torch.nn.Module                          # trained model, eval mode, on the training device
    history: list[dict[str, float]]                 # one dict of metrics per epoch (train_*, val_*, ...)
    val_metrics: dict[str, float]                   # final validation metrics (full evaluation if enabled)
    epochs_run: int                                 # epochs completed, resumed ones included
    stopped_early: bool = False                     # a hook raised StopTraining (e.g. pruned)
    stop_reason: str | None = None
    model_dir: Path | None = None                   # where save_model wrote it, when out_dir was given
    extra: dict[str, Any] = field(default_factory=dict)
    # the second stage (VQ-VAE code prior, VAE flow prior), one row per report: {"step", "train_loss"[, "val_loss"]}
    # (code prior: NLL in nats per code; flow: flow-matching loss; val_loss on the held-out split); [] without one
    prior_curve: list[dict[str, float]] = field(default_factory=list)


def _log_kept(name: str, prior: PriorResult) -> None:
    if prior.kept_step is not None:
        log.info("%s: kept the weights of step %d of %d (held-out loss %.4f; %.4f at the last step: the prior was "
                 "fitting its training data, not their distribution)", name, prior.kept_step, prior.steps[-1],
                 prior.val_nll, prior.val_curve[-1])


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's batch order and noise: a function of (seed, epoch) only, so resume is exact."""
    return (seed * 1_000_003 + epoch * 7_919) % (2**63 - 1)


def _float_output(out: Any) -> Any:
    """Cast the floating tensors of a named model output to fp32 (losses are computed in fp32)."""
    def cast(v: Any) -> Any:
        return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    if dataclasses.is_dataclass(out):
        return dataclasses.replace(out, **{f.name: cast(getattr(out, f.name)) for f in dataclasses.fields(out)})
    return type(out)(*(cast(v) for v in out))


class _Step:
    """Forward + loss for one batch, for either model family, with the optional patch-adversarial term."""

    def __init__(self, model: torch.nn.Module, mcfg: ModelConfig, tcfg: TrainConfig, device: torch.device,
                 disc: torch.nn.Module | None = None):
        self.model, self.mcfg, self.tcfg, self.disc = model, mcfg, tcfg, disc
        amp = tcfg.amp == "bf16" or (tcfg.amp == "auto" and device.type == "cuda")
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
        self.channels_last = tcfg.channels_last              # NHWC on CPU too: +10-30% img/s (bench/RESULTS.md)
        self.last_layer = None
        if disc is not None:                     # the adaptive adversarial weight compares gradients here
            convs = [p for n, p in model.named_parameters() if n.startswith("decoder.") and p.dim() == 4]
            if not convs:
                raise ValueError("train.adv_weight > 0 needs a model whose decoder ends in a convolution")
            self.last_layer = convs[-1]

    def __call__(self, x: torch.Tensor, kl_weight: float, adversarial: bool = False,
                 attrs: torch.Tensor | None = None):
        """x: (B, 1, H, W) in [0, 1] (attrs: (B, A) for a conditional VAE) -> (LossTerms, model output in fp32,
        generator adversarial loss or None).

        With `adversarial` (and a discriminator), terms.total includes adv_weight * lambda * the generator's
        adversarial loss, lambda VQGAN's adaptive weight (mrigen.models.adversarial.adaptive_weight): at the
        decoder's last layer the adversarial gradient is adv_weight times the reconstruction loss's, whatever the
        decoder calibration."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = self.model(x) if attrs is None else self.model(x, attrs)
        out = _float_output(out)
        t = self.tcfg
        if self.mcfg.family == "vae":
            terms = vae_loss(out, x, recon=t.recon, beta=t.beta, kl_weight=kl_weight, free_bits=t.free_bits,
                             ssim_weight=t.ssim_weight, spectral_weight=t.spectral_weight, sigma=t.sigma,
                             log_sigma=self.model.log_sigma)
        else:
            terms = vq_vae_loss(out, x, recon=t.recon, ssim_weight=t.ssim_weight,
                                spectral_weight=t.spectral_weight)
        g_adv = None
        if adversarial and self.disc is not None:
            self.disc.requires_grad_(False)
            with self.autocast():
                g_adv = generator_loss(self.disc(out.recon), t.adv_loss)
            self.disc.requires_grad_(True)
            weight = t.adv_weight * adaptive_weight(terms.total, g_adv, self.last_layer)
            terms = terms._replace(total=terms.total + weight * g_adv)
        return terms, out, g_adv

    def disc_loss(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Discriminator loss on real slices x and detached reconstructions, both (B, 1, H, W)."""
        with self.autocast():
            return discriminator_loss(self.disc(x), self.disc(recon.detach()), self.tcfg.adv_loss)


def _term_vector(terms, family: str) -> torch.Tensor:
    """(total, recon, kl-or-vq) as one detached device tensor, so epoch sums need no host sync."""
    extra = terms.kl if family == "vae" else terms.vq
    return torch.stack([terms.total.detach(), terms.recon.detach(), extra.detach()])


class _BestWeights:
    """Early stopping on held-out quality: keeps a device copy of the weights of the best val_ssim epoch.

    Inactive (no copies) when patience is 0. `update` returns True once `patience` epochs have passed without a
    better value; `restore` puts the best weights back (True if it did)."""

    def __init__(self, patience: int) -> None:
        self.patience, self.value, self.epoch, self.state = patience, float("-inf"), -1, None

    def update(self, model: torch.nn.Module, epoch: int, value: float) -> bool:
        if not self.patience:
            return False
        if value > self.value:                                            # NaN never counts as better
            self.value, self.epoch = value, epoch
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return epoch - self.epoch >= self.patience

    def restore(self, model: torch.nn.Module) -> bool:
        if self.state is None:
            return False
        model.load_state_dict(self.state)
        return True


def _kl_weight(tcfg: TrainConfig, epoch: int) -> float:
    return 1.0 if tcfg.kl_warmup_epochs == 0 else min(1.0, (epoch + 1) / tcfg.kl_warmup_epochs)


@torch.no_grad()
def _validate(step: _Step, val_x: torch.Tensor, epoch: int, val_attrs: torch.Tensor | None = None
              ) -> dict[str, float]:
    """Validation loss terms, SSIM/PSNR of reconstructions, active units (VAE) or perplexity (VQ-VAE).
    `val_attrs`: the slices' encoded attributes, for a conditional VAE."""
    from mrigen.metrics import image_metrics

    model, tcfg = step.model, step.tcfg
    model.eval()
    sums, n = None, 0
    mus, recons, perplexities = [], [], []
    for start in range(0, len(val_x), tcfg.eval_batch_size):
        x = val_x[start:start + tcfg.eval_batch_size].float()
        a = None if val_attrs is None else val_attrs[start:start + tcfg.eval_batch_size]
        terms, out, _ = step(x, _kl_weight(tcfg, epoch), attrs=a)
        v = _term_vector(terms, step.mcfg.family) * len(x)
        sums = v if sums is None else sums + v
        n += len(x)
        recons.append(out.recon)
        if step.mcfg.family == "vae":
            mus.append(out.mu.flatten(1))
        else:
            perplexities.append(out.perplexity.float() * len(x))
    sums = (sums / n).tolist()
    key = "kl" if step.mcfg.family == "vae" else "vq"
    metrics = {"val_loss": sums[0], "val_recon": sums[1], f"val_{key}": sums[2]}
    scores = image_metrics(torch.cat(recons), val_x.float())
    metrics.update({f"val_{k}": float(v.mean()) for k, v in scores.items()})
    if mus:
        metrics["active_units"] = float(active_units(torch.cat(mus)))
    if perplexities:
        metrics["val_perplexity"] = float(torch.stack(perplexities).sum() / n)
    model.train()
    return metrics


@torch.no_grad()
def _grids(model: torch.nn.Module, val_x: torch.Tensor, tcfg: TrainConfig, can_sample: bool,
           val_attrs: torch.Tensor | None = None) -> dict:
    """Real val slices over their own reconstructions, and samples from a fixed generator (a conditional model's
    samples are drawn under the attributes of the real slices in the grid, column by column)."""
    was_training = model.training
    model.eval()
    device = val_x.device
    idx = torch.linspace(0, len(val_x) - 1, min(tcfg.grid_n, len(val_x)), device=device).long()
    real = val_x[idx].float()
    attrs = None if val_attrs is None else val_attrs[idx]
    recon = model.reconstruct(real, attrs) if attrs is not None and model.config.autoencoder_conditioned \
        else model.reconstruct(real)
    grids = {"reconstruction": make_grid([real, recon])}
    if can_sample:
        gen = torch.Generator(device=device).manual_seed(tcfg.seed)
        kwargs = {} if attrs is None else {"conditions": attrs.cpu()}
        grids["samples"] = make_grid([model.sample(len(idx), generator=gen, **kwargs)])
    model.train(was_training)
    return grids


def _check_resume(meta: dict, mcfg: ModelConfig, tcfg: TrainConfig, digest: str, ckpt: Path) -> None:
    same_train = {k: v for k, v in asdict(tcfg).items() if k != "epochs"}
    saved_train = {k: v for k, v in meta["train_cfg"].items() if k != "epochs"}
    if meta["model_cfg"] != json_round(asdict(mcfg)) or saved_train != json_round(same_train):
        raise CheckpointError(f"{ckpt}: checkpoint was written with another config; resume with the same one")
    if meta["data_digest"] != digest:
        raise CheckpointError(f"{ckpt}: checkpoint was trained on other data (store digest differs)")


def _subject_ids(store, n: int) -> torch.Tensor | None:
    """`(n,)` int64 subject index of each training slice, for a fitted latent prior that pools >= 3 subjects per
    component; None when the store's rows do not name every slice's subject (the prior then pools slices only)."""
    subjects = [str(row.get("subject", "")) for row in store.slices("train")]
    if len(subjects) != n or "" in subjects:
        log.warning("the train split's rows do not name a subject for each of its %d slices: the fitted latent "
                    "prior's components pool slices, not subjects", n)
        return None
    lookup: dict[str, int] = {}
    return torch.tensor([lookup.setdefault(name, len(lookup)) for name in subjects])


def _attributes(model: torch.nn.Module, mcfg: ModelConfig, store, seed: int, device: torch.device
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Encoded attributes `(N, A)` of the train and val slices for a conditional model (None, None otherwise); the
    training rows are banked in the model for default sampling.

    Raises:
        ValueError: if an attribute has no known value in the training split (e.g. age in a cohort without ages).
    """
    if not mcfg.conditions:
        return None, None
    train_attrs = encode_rows(mcfg.conditions, store.slices("train"))
    empty = [n for j, n in enumerate(mcfg.conditions) if torch.isnan(train_attrs[:, j]).all()]
    if empty:
        raise ValueError(f"model.conditions includes {', '.join(empty)} but no training slice of {store.path} has "
                         f"a value for it")
    model.condition_embedding.set_bank(train_attrs, torch.Generator().manual_seed(seed))
    val_attrs = encode_rows(mcfg.conditions, store.slices("val"))
    return train_attrs.to(device), val_attrs.to(device)


def json_round(d: dict) -> dict:
    """What a dict looks like after a JSON round trip (tuples become lists)."""
    import json

    return json.loads(json.dumps(d))


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, store, *, out_dir: Path | None = None,
          hooks: Iterable[Hook] = (), resume: bool = False, progress: bool = True,
          checkpoints: bool = True) -> TrainResult:
    """Train one model on a slice store, validate every epoch, evaluate at the end.

    Args:
        model_cfg: architecture (its image_size must equal the store's).
        train_cfg: optimisation, loss weights, device, seed.
        store: a `mrigen.data.SliceStore` (or anything with its contract) with "train" and "val" splits.
        out_dir: if given, checkpoints go to `out_dir/checkpoint` and the final model to `out_dir/model`.
        hooks: `Hook` objects (local logger, MLflow logger, Optuna pruning...).
        resume: continue from `out_dir/checkpoint` (same configs and data required).
        progress: show a tqdm bar over epochs.
        checkpoints: write resumable checkpoints to `out_dir/checkpoint` (tuning trials turn this off: a
            retried trial restarts from scratch, and a checkpoint of the thesis VAE is ~0.7 GB).

    Returns:
        TrainResult with the trained model, per-epoch history and final validation metrics.
    """
    if model_cfg.image_size != store.image_size:
        raise ValueError(f"model.image_size={model_cfg.image_size} but the store {store.path} holds "
                         f"{store.image_size}x{store.image_size} slices")
    if resume and out_dir is None:
        raise ValueError("resume=True needs an out_dir holding a checkpoint")
    hooks = list(hooks)
    device = pick_device(train_cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True          # fixed shapes: let cuDNN pick the fastest kernels
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg).to(device)
    disc = PatchDiscriminator(model_cfg.image_size).to(device) if train_cfg.adv_weight > 0 else None
    step = _Step(model, model_cfg, train_cfg, device, disc)
    if step.channels_last:
        model.to(memory_format=torch.channels_last)
        if disc is not None:
            disc.to(memory_format=torch.channels_last)
    # what checkpoints hold: the model, or the model and its discriminator
    trainable = model if disc is None else torch.nn.ModuleDict({"model": model, "disc": disc})
    resident = torch.float16 if device.type == "cuda" else torch.float32
    train_x = store.tensor("train", device, dtype=resident)         # (N, 1, H, W)
    val_x = store.tensor("val", device, dtype=resident)
    if len(train_x) < train_cfg.batch_size:
        raise ValueError(f"train.batch_size={train_cfg.batch_size} exceeds the {len(train_x)} training slices "
                         f"in {store.path}")
    if len(val_x) == 0:
        raise ValueError(f"the store {store.path} has no validation slices")
    train_attrs, val_attrs = _attributes(model, model_cfg, store, train_cfg.seed, device)
    ae_attrs = train_attrs if model_cfg.autoencoder_conditioned else None     # else only the prior reads them
    ae_val_attrs = val_attrs if model_cfg.autoencoder_conditioned else None
    train_groups = _subject_ids(store, len(train_x)) if getattr(model, "latent_prior", None) is not None else None
    opt_cls = torch.optim.AdamW if train_cfg.weight_decay > 0 else torch.optim.Adam
    kwargs = {"fused": True} if device.type == "cuda" else {}
    groups = [{"params": list(model.parameters())}]
    if disc is not None:  # one optimiser, two groups: each step updates only the parameters that have gradients
        groups.append({"params": list(disc.parameters()), "lr": train_cfg.disc_lr, "betas": (0.5, 0.9),
                       "weight_decay": 0.0})
    optimizer = opt_cls(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, **kwargs)

    ckpt = Path(out_dir) / "checkpoint" if out_dir is not None and (checkpoints or resume) else None
    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume:
        meta = load_checkpoint(ckpt, model=trainable, optimizer=optimizer)
        _check_resume(meta, model_cfg, train_cfg, store.digest, ckpt)
        history, start_epoch = meta["history"], meta["epoch"] + 1
        log.info("resumed from %s at epoch %d", ckpt, start_epoch)

    ctx = TrainContext(model=model, model_cfg=model_cfg, train_cfg=train_cfg, device=device,
                       data_digest=store.digest, data_path=str(store.path), out_dir=out_dir,
                       n_train=len(train_x), n_val=len(val_x))
    for h in hooks:
        h.on_start(ctx)

    result = TrainResult(model=model, history=history, val_metrics={}, epochs_run=start_epoch)
    n_batches = len(train_x) // train_cfg.batch_size                  # drop_last: BatchNorm needs full batches
    bar = tqdm(range(start_epoch, train_cfg.epochs), desc=f"train {model_cfg.family}", unit="epoch",
               disable=not progress, initial=start_epoch, total=train_cfg.epochs)
    writer = CheckpointWriter()  # writes in the background; training goes on; no write outlives train()
    best = _BestWeights(train_cfg.early_stop_patience)
    try:
        model.train()
        last_ckpt = time.monotonic()
        for epoch in bar:
            torch.manual_seed(epoch_seed(train_cfg.seed, epoch))
            gen = torch.Generator(device=device).manual_seed(epoch_seed(train_cfg.seed, epoch))
            perm = torch.randperm(len(train_x), device=device, generator=gen)
            kl_weight = _kl_weight(train_cfg, epoch)
            adversarial = disc is not None and epoch >= train_cfg.adv_start_epoch
            sums = torch.zeros(5, device=device)                         # total, recon, kl|vq, g_adv, d_loss
            t0 = time.perf_counter()
            for b in range(n_batches):
                x = train_x[perm[b * train_cfg.batch_size:(b + 1) * train_cfg.batch_size]].float()
                x = augment_batch(x, train_cfg.augment, gen)
                a = None
                if ae_attrs is not None:
                    a = drop_conditions(ae_attrs[perm[b * train_cfg.batch_size:(b + 1) * train_cfg.batch_size]],
                                        train_cfg.condition_dropout, gen, train_cfg.condition_dropout_all)
                terms, out, g_adv = step(x, kl_weight, adversarial, attrs=a)
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                optimizer.step()
                sums[:3] += _term_vector(terms, model_cfg.family)
                if adversarial:                                           # then the discriminator's step
                    d_loss = step.disc_loss(x, out.recon)
                    optimizer.zero_grad(set_to_none=True)
                    d_loss.backward()
                    optimizer.step()
                    sums[3:] += torch.stack([g_adv.detach(), d_loss.detach()])
            train_terms = (sums / n_batches).tolist()                     # the epoch's one host sync
            seconds = time.perf_counter() - t0
            key = "kl" if model_cfg.family == "vae" else "vq"
            metrics = {"train_loss": train_terms[0], "train_recon": train_terms[1], f"train_{key}": train_terms[2],
                       "kl_weight": kl_weight, "epoch_seconds": seconds,
                       "img_per_s": n_batches * train_cfg.batch_size / seconds}
            if disc is not None:
                metrics.update({"train_adv": train_terms[3], "train_disc": train_terms[4]})
            if model_cfg.family == "vae" and train_cfg.sigma != "fixed":
                metrics["train_sigma"] = float(terms.pixel_weight.mul(2).rsqrt()) if train_cfg.recon == "mse" \
                    else float(terms.pixel_weight.reciprocal())
            metrics.update(_validate(step, val_x, epoch, ae_val_attrs))
            history.append({"epoch": epoch, **metrics})
            result.epochs_run = epoch + 1
            bar.set_postfix(loss=f"{metrics['train_loss']:.1f}", val_ssim=f"{metrics.get('val_ssim', 0):.3f}")
            try:
                for h in hooks:
                    h.on_epoch_end(ctx, epoch, metrics)
            except StopTraining as stop:
                result.stopped_early, result.stop_reason = True, str(stop)
            patience_over = best.update(model, epoch, metrics.get("val_ssim", float("nan")))
            last = result.stopped_early or patience_over or epoch + 1 == train_cfg.epochs
            if ckpt is not None and (last or time.monotonic() - last_ckpt >= train_cfg.checkpoint_every_s):
                last_ckpt = time.monotonic()
                writer.submit(ckpt, model=trainable, optimizer=optimizer, meta={
                    "epoch": epoch, "history": history, "model_cfg": json_round(asdict(model_cfg)),
                    "train_cfg": json_round(asdict(train_cfg)), "data_digest": store.digest})
            if result.stopped_early:
                break
            if patience_over:
                log.info("early stop at epoch %d: val_ssim has not improved for %d epochs (best %.4f at epoch %d)",
                         epoch, train_cfg.early_stop_patience, best.value, best.epoch)
                result.extra["early_stopped_epoch"] = epoch
                break
            if train_cfg.grid_every and (epoch + 1) % train_cfg.grid_every == 0 and epoch + 1 < train_cfg.epochs:
                if hasattr(model, "fit_latent_prior"):                   # samples of this epoch's weights
                    model.fit_latent_prior(train_x, train_cfg.eval_batch_size, attrs=ae_attrs, groups=train_groups)
                grids = _grids(model, val_x, train_cfg, val_attrs=val_attrs,     # a flow is trained at the end
                               can_sample=model_cfg.family == "vae" and model_cfg.latent_prior != "flow")
                for h in hooks:
                    h.on_images(ctx, epoch, grids)
        bar.close()
        if best.restore(model):
            result.extra["best_epoch"] = best.epoch
            log.info("restored the weights of epoch %d (best val_ssim %.4f)", best.epoch, best.value)
        if hasattr(model, "calibrate_reconstruction") and not result.stopped_early:
            model.calibrate_reconstruction(train_x, train_cfg.eval_batch_size, attrs=ae_attrs)
        if hasattr(model, "fit_latent_prior") and not result.stopped_early:   # VAE: N(0, I) or the fitted prior
            model.fit_latent_prior(train_x, train_cfg.eval_batch_size, attrs=ae_attrs, groups=train_groups)

        if model_cfg.family == "vqvae" and not result.stopped_early and train_cfg.prior_steps > 0:
            prior = train_prior(model, train_x, train_cfg, val_codes_from=val_x, progress=progress,
                                train_attrs=train_attrs, val_attrs=val_attrs)
            result.extra["prior_loss"] = prior.train_nll
            result.extra["prior_val_nll"] = prior.val_nll
            result.prior_curve = prior.rows()
            result.extra["prior_kept_step"] = prior.kept_step
            _log_kept("code prior", prior)
        if model_cfg.latent_prior == "flow" and not result.stopped_early and train_cfg.prior_steps > 0:
            flow = train_latent_flow(model, train_x, train_cfg, val_from=val_x, progress=progress,
                                     train_attrs=train_attrs, val_attrs=val_attrs)
            result.extra["flow_loss"] = flow.train_nll
            result.extra["flow_val_loss"] = flow.val_nll
            result.prior_curve = flow.rows()
            result.extra["prior_kept_step"] = flow.kept_step
            _log_kept("flow prior", flow)
        model.eval()
        can_sample = bool(getattr(model, "prior_trained", False))    # VAE: N(0, I), or its fitted / trained prior
        if train_cfg.final_eval and not result.stopped_early:
            from mrigen.metrics import evaluate

            n = train_cfg.eval_samples or None
            result.val_metrics = evaluate(model, store, "val", n_samples=n, seed=train_cfg.seed, device=device,
                                          feature_nets=train_cfg.eval_feature_nets or None)
        elif history:
            result.val_metrics = {k: v for k, v in history[-1].items() if k.startswith("val_")}
        if out_dir is not None:
            result.model_dir = Path(out_dir) / "model"
            save_model(model, result.model_dir)
        grids = _grids(model, val_x, train_cfg, can_sample=can_sample, val_attrs=val_attrs)
        for h in hooks:
            h.on_images(ctx, result.epochs_run - 1, grids)
        writer.wait()                                                     # the last checkpoint is on disk
        for h in hooks:
            h.on_end(ctx, result)
    except BaseException as exc:  # training failed (or Ctrl-C): let a pending write finish, keep *this* error
        try:
            writer.wait()
        except CheckpointError as ckpt_exc:
            exc.add_note(f"(also: {ckpt_exc})")
        raise
    return result
