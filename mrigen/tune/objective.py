"""One Optuna trial = one `mrigen.train.train` call, tracked as an MLflow child run of the study's parent run."""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from mrigen.registry.rule import FINAL_ONLY_METRICS, MissingMetricError
from mrigen.train import Hook, StopTraining, TrainContext, train
from mrigen.train.hooks import ThreadHandBack
from mrigen.train.configs import build_configs
from mrigen.tune import promotion
from mrigen.tune.study import Budget, StudySpec, dotted_layer

__all__ = ["TrialRunner", "PruningHook", "ProgressHook", "RunIdRecorder", "ThreadHandBack", "objective_value",
           "trial_metrics"]

log = logging.getLogger(__name__)


class PruningHook(Hook):
    """Reports the pruning metric to Optuna each epoch and stops training when the pruner says so.

    Optuna's pruners compare intermediate values in the study's direction, so a metric that is better the other
    way (val_ssim in a study minimising val_fd_ratio) is reported negated (`sign=-1`).
    """

    def __init__(self, trial: optuna.Trial, metric: str, sign: float = 1.0) -> None:
        self.trial, self.metric, self.sign = trial, metric, sign

    def on_epoch_end(self, ctx: TrainContext, epoch: int, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        _storage_retry(lambda: self.trial.report(self.sign * value, step=epoch), "report to the Optuna storage")
        if _storage_retry(self.trial.should_prune, "ask the Optuna pruner"):
            raise StopTraining(f"pruned by Optuna at epoch {epoch} ({self.metric}={value:.4f})")


def _storage_retry(fn, what: str, retry_for_s: float = 120.0):
    """Call `fn`, riding out a storage database that is restarting (connection errors) for up to `retry_for_s`."""
    import time

    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import DBAPIError, OperationalError

    def connection_error(exc: BaseException | None) -> bool:
        return isinstance(exc, OperationalError) or bool(getattr(exc, "connection_invalidated", False))

    deadline, wait = time.monotonic() + retry_for_s, 0.5
    while True:
        try:
            return fn()
        except (DBAPIError, StorageInternalError) as exc:      # Optuna wraps the driver error in the latter
            cause = exc.__cause__ if isinstance(exc, StorageInternalError) else exc
            if not connection_error(cause) or time.monotonic() + wait > deadline:
                raise
            log.warning("could not %s (%s); retrying in %.1f s", what, str(cause).splitlines()[0][:200], wait)
            time.sleep(wait)
            wait = min(wait * 2, 15.0)


class RunIdRecorder(Hook):
    """Stores the trial's MLflow run id in the trial as soon as the run exists, so that if this worker dies the
    worker that later fails the stale trial can end the run too (see `runner.StaleTrialCallback`)."""

    def __init__(self, trial: optuna.Trial, tracker) -> None:
        self.trial, self.tracker = trial, tracker

    def on_start(self, ctx: TrainContext) -> None:
        if self.tracker.run_id:
            self.trial.set_user_attr("mlflow_run_id", self.tracker.run_id)


class ProgressHook(Hook):
    """One live line per epoch: worker, trial n/N, epoch, a per-epoch metric, the study's best so far."""

    def __init__(self, worker: str, trial: optuna.Trial, total: int, metric: str, best: str) -> None:
        self.worker, self.trial, self.total, self.metric, self.best = worker, trial, total, metric, best

    def on_epoch_end(self, ctx: TrainContext, epoch: int, metrics: dict[str, float]) -> None:
        print(f"[{self.worker}] trial {self.trial.number + 1}/{self.total} epoch {epoch + 1}/"
              f"{ctx.train_cfg.epochs} {self.metric}={metrics.get(self.metric, float('nan')):.4f} "
              f"best {self.best} ({metrics.get('img_per_s', 0):.0f} img/s on {ctx.device})", flush=True)


def objective_value(metric: str, val_metrics: dict[str, float], history: list[dict[str, float]]) -> float:
    """The trial's value of `metric`: from the final evaluation if present, else its last epoch's value.

    Raises:
        MissingMetricError: neither has it (the message names the metric and lists what the trial produced).
    """
    short = metric.removeprefix("val_")
    last = history[-1] if history else {}
    sources = [val_metrics.get(metric), val_metrics.get(short)]
    if short not in FINAL_ONLY_METRICS:                 # sample metrics have no per-epoch value to fall back on
        sources.append(last.get(metric))
    for source in sources:
        if source is not None:
            return float(source)
    have = sorted(set(val_metrics) | set(last))
    hint = (" (only the final evaluation computes it: is train.final_eval on, and can the model sample?)"
            if short in FINAL_ONLY_METRICS else "")
    raise MissingMetricError(f"metric {metric!r} was not produced by training{hint}; have: {', '.join(have)}")


def trial_metrics(val_metrics: dict[str, float], history: list[dict[str, float]]) -> dict[str, float]:
    """Every finite metric of a trial under its study name (`val_<name>`): the last epoch's, overridden by the
    final evaluation's."""
    out = {k: float(v) for k, v in (history[-1] if history else {}).items() if k.startswith("val_")}
    out.update({k if k.startswith("val_") else f"val_{k}": float(v) for k, v in val_metrics.items()})
    return {k: v for k, v in out.items() if math.isfinite(v)}


@dataclass
class TrialRunner:
    """Callable objective for `study.optimize`: samples params, trains, tracks, registers the best.

    Returns the objective value (a list of them in a multi-objective study). The trial's final metrics and its
    promotion outcome are stored in its user attributes (`metrics`, `promotion`) for the summary and for later
    workers; a model is registered and offered for `champion` only when it meets the study's promotion rule.
    """

    spec: StudySpec
    store: Any                              # mrigen.data.SliceStore
    budget: Budget
    tracking_uri: str | None
    experiment: str
    parent_run_id: str | None
    registered_name: str | None             # register + promote the best trials' models under this name
    work_dir: Path
    worker: str = "w0"
    device: str = "auto"

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        params = {p.name: p.suggest(trial) for p in self.spec.space}
        layer = self.budget.layer()             # image_size, epochs and the budget's `set` fields
        layer["train"]["device"] = self.device
        model_cfg, train_cfg = build_configs(self.spec.family, self.spec.base, layer, dotted_layer(params.items()))
        pruner = self.spec.pruner
        hooks: list[Hook] = [ProgressHook(self.worker, trial, self.budget.trials, pruner.metric,
                                          promotion.best_text(trial.study, self.spec)), ThreadHandBack()]
        if not self.spec.multi_objective:       # Optuna has no intermediate values for multi-objective studies
            hooks.insert(0, PruningHook(trial, pruner.metric, 1.0 if pruner.direction == self.spec.direction else -1.0))
        tracker = self._tracker(trial)
        if tracker is not None:
            hooks += [tracker, RunIdRecorder(trial, tracker)]
        # Tracked trials keep their model in MLflow only; untracked ones (and failed uploads) under work_dir.
        trials_dir = self.work_dir / "trials"
        trials_dir.mkdir(parents=True, exist_ok=True)
        out_dir = trials_dir / f"{self.spec.name}-{trial.number:04d}"
        with tracker if tracker is not None else contextlib.nullcontext():
            result = train(model_cfg, train_cfg, self.store, out_dir=out_dir, hooks=hooks, progress=False,
                           checkpoints=False)
        if tracker is not None:                 # logged to MLflow: drop the local copy (kept if logging failed)
            try:
                shutil.rmtree(out_dir)
            except OSError as exc:
                log.warning("could not remove the trial's local copy %s: %s", out_dir, exc)
        if result.stopped_early:
            raise optuna.TrialPruned(result.stop_reason)
        if self.spec.utility is not None:
            result.val_metrics.update(self._utility(result.model, trial, tracker))
        metrics = trial_metrics(result.val_metrics, result.history)
        trial.set_user_attr("metrics", metrics)
        try:
            values = [objective_value(o.metric, result.val_metrics, result.history) for o in self.spec.objectives]
            outcome = promotion.Outcome.of(self.spec.promotion, metrics)
        except MissingMetricError as exc:
            trial.set_user_attr("fail_reason", str(exc))
            raise MissingMetricError(f"trial {trial.number}: {exc}") from None
        bad = [f"{o.metric}={v}" for o, v in zip(self.spec.objectives, values) if not math.isfinite(v)]
        if bad:
            raise optuna.TrialPruned(f"not finite: {', '.join(bad)}")
        trial.set_user_attr("promotion", outcome.as_attr())
        if outcome.failures:
            log.info("trial %d is not promotable: %s", trial.number, "; ".join(outcome.failures))
        elif self.registered_name and tracker is not None and promotion.is_best(trial.study, self.spec, outcome):
            promotion.register_and_promote(tracker.run_id, self.registered_name, self.spec, outcome,
                                           trial.number, self.tracking_uri)
        return values if self.spec.multi_objective else values[0]

    def _utility(self, model, trial: optuna.Trial, tracker) -> dict[str, float]:
        """The study's augmentation-utility run for this trial's model (on the val split by default): its gain and
        TSTR ratio as `utility_<task>_gain` / `utility_<task>_tstr_ratio`; with tracking, the full result is a run
        nested under the trial's run and the two numbers are logged on the trial's run too."""
        from mrigen.device import pick_device
        from mrigen.utility import run_utility, summary

        from mrigen.utility.pool import default_workers

        cfg = self.spec.utility
        device = pick_device(self.device)
        result = run_utility(model, self.store, cfg, device=device, progress=False, workers=default_workers(device))
        s = summary(result)
        values = {f"utility_{cfg.task}_gain": float(s["gain"]), f"utility_{cfg.task}_tstr_ratio": float(s["tstr_ratio"])}
        log.info("trial %d: utility %s on %s: gain %+.4f, TSTR ratio %.3f (%s)", trial.number, cfg.task,
                 cfg.eval_split, s["gain"], s["tstr_ratio"], s["verdict"])
        if tracker is not None:
            from mlflow import MlflowClient

            from mrigen.utility.tracking import log_utility

            log_utility(result, parent_run_id=tracker.run_id, tracking_uri=self.tracking_uri)
            client = MlflowClient(self.tracking_uri)
            for key, value in values.items():
                client.log_metric(tracker.run_id, f"val_{key}", value)
        return values

    def _tracker(self, trial: optuna.Trial):
        if self.tracking_uri is None:
            return None
        from mrigen.tracking import MlflowHook

        return MlflowHook(tracking_uri=self.tracking_uri, experiment=self.experiment,
                          run_name=f"{self.spec.name}-trial-{trial.number:04d}", parent_run_id=self.parent_run_id,
                          tags={"optuna.study": self.spec.name, "optuna.trial_number": str(trial.number),
                                "optuna.trial_id": str(trial._trial_id), "mrigen.worker": self.worker})
