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

from mrigen.train import Hook, StopTraining, TrainContext, train
from mrigen.train.configs import build_configs
from mrigen.tune.study import Budget, StudySpec

__all__ = ["TrialRunner", "PruningHook", "ProgressHook", "RunIdRecorder", "objective_value"]

log = logging.getLogger(__name__)


class PruningHook(Hook):
    """Reports the study metric to Optuna each epoch and stops training when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def on_epoch_end(self, ctx: TrainContext, epoch: int, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        _storage_retry(lambda: self.trial.report(value, step=epoch), "report to the Optuna storage")
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
    """One live line per epoch: worker, trial n/N, epoch, current metric, best so far."""

    def __init__(self, worker: str, trial: optuna.Trial, total: int, metric: str, best: float | None) -> None:
        self.worker, self.trial, self.total, self.metric, self.best = worker, trial, total, metric, best

    def on_epoch_end(self, ctx: TrainContext, epoch: int, metrics: dict[str, float]) -> None:
        best = "-" if self.best is None else f"{self.best:.4f}"
        print(f"[{self.worker}] trial {self.trial.number + 1}/{self.total} epoch {epoch + 1}/"
              f"{ctx.train_cfg.epochs} {self.metric}={metrics.get(self.metric, float('nan')):.4f} "
              f"best={best} ({metrics.get('img_per_s', 0):.0f} img/s on {ctx.device})", flush=True)


def objective_value(metric: str, val_metrics: dict[str, float], history: list[dict[str, float]]) -> float:
    """The trial's objective: `metric` from the final evaluation if present, else its last epoch's value."""
    short = metric.removeprefix("val_")
    for source in (val_metrics.get(metric), val_metrics.get(short), history[-1].get(metric) if history else None):
        if source is not None:
            return float(source)
    raise KeyError(f"metric {metric!r} was not produced by training (have: {sorted(history[-1]) if history else []})")


@dataclass
class TrialRunner:
    """Callable objective for `study.optimize`: samples params, trains, tracks, registers the best."""

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

    def __call__(self, trial: optuna.Trial) -> float:
        params = {p.name: p.suggest(trial) for p in self.spec.space}
        layer: dict[str, dict[str, Any]] = {"model": {"image_size": self.budget.image_size},
                                           "train": {"epochs": self.budget.epochs, "device": self.device}}
        for name, value in params.items():
            section, _, field_name = name.partition(".")
            layer[section][field_name] = value
        model_cfg, train_cfg = build_configs(self.spec.family, self.spec.base, layer)
        best = self._best_value(trial.study)
        hooks: list[Hook] = [PruningHook(trial, self.spec.metric),
                             ProgressHook(self.worker, trial, self.budget.trials, self.spec.metric, best)]
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
        value = objective_value(self.spec.metric, result.val_metrics, result.history)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"{self.spec.metric} is not finite ({value})")
        if self.registered_name and tracker is not None and self._is_best(trial.study, value):
            self._register(tracker.run_id, value, result.val_metrics)
        return value

    def _best_value(self, study: optuna.Study) -> float | None:
        try:
            return study.best_value
        except ValueError:            # no completed trial yet
            return None

    def _is_best(self, study: optuna.Study, value: float) -> bool:
        best = self._best_value(study)
        if best is None:
            return True
        return value > best if self.spec.greater_is_better else value < best

    def _tracker(self, trial: optuna.Trial):
        if self.tracking_uri is None:
            return None
        from mrigen.tracking import MlflowHook

        return MlflowHook(tracking_uri=self.tracking_uri, experiment=self.experiment,
                          run_name=f"{self.spec.name}-trial-{trial.number:04d}", parent_run_id=self.parent_run_id,
                          tags={"optuna.study": self.spec.name, "optuna.trial_number": str(trial.number),
                                "optuna.trial_id": str(trial._trial_id), "mrigen.worker": self.worker})

    def _register(self, run_id: str, value: float, val_metrics: dict[str, float]) -> None:
        from mrigen.registry import promote_if_better, register

        version = register(run_id, self.registered_name, metric=self.spec.metric, value=value,
                           greater_is_better=self.spec.greater_is_better, tracking_uri=self.tracking_uri)
        promoted = promote_if_better(self.registered_name, version, metric=self.spec.metric,
                                     greater_is_better=self.spec.greater_is_better, tracking_uri=self.tracking_uri)
        log.info("registered %s version %s (%s=%.4f)%s", self.registered_name, version, self.spec.metric, value,
                 "; now champion" if promoted else "")
