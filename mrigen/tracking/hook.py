"""`MlflowHook`: logs one training run (params, metrics, image grids, figures, the model) into MLflow.

    hook = MlflowHook(experiment="vae-kernels")            # URI: argument > MLFLOW_TRACKING_URI > ./mlflow.db
    result = train(model_cfg, train_cfg, store, hooks=[hook])
    hook.run_id                                             # the MLflow run

Metrics and images go through a background thread (the training thread only queues them); the run is
terminated FINISHED, KILLED (stopped early: pruned, or SIGTERM/SIGINT) or FAILED (exception) -- never left RUNNING.

Server outages: queued metrics and images survive them (the background thread retries with backoff, see
`LogWorker`), and the end-of-run calls (figure, tags, model upload, final status) are retried for up to
`end_retry_s`. If the end still fails, the run is marked FAILED when the server allows it, and the error names
the local folder that keeps the trained model (never lost with the run).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag, Param, RunTag

import mrigen
from mrigen.train.hooks import Hook, TrainContext
from mrigen.tracking import safety
from mrigen.tracking.client import TrackingError, error_line, get_or_create_experiment, git_commit, make_client, redact
from mrigen.tracking.retry import retry_call
from mrigen.tracking.worker import LogWorker

if TYPE_CHECKING:  # pragma: no cover
    from mrigen.train.loop import TrainResult

__all__ = ["MlflowHook", "PARAM_MAX_CHARS", "store_dataset_input"]

log = logging.getLogger(__name__)

PARAM_MAX_CHARS = 6000          # MLflow's limit on a param value


class MlflowHook(Hook):
    """Training hook that tracks the run in MLflow.

    Args:
        tracking_uri: tracking server / store; None = `MLFLOW_TRACKING_URI`, else SQLite `./mlflow.db`.
        experiment: experiment name (created if missing; safe when many processes create it at once).
        run_name: display name of the run (MLflow picks one when None).
        parent_run_id: makes this a nested (child) run of that run, e.g. a tuning study's parent run.
        tags: extra run tags (values are redacted of credentials).
        log_model: log the trained model (pyfunc, models-from-code) at the end; skipped for stopped runs.
        image_every: log the image grids of every `image_every`-th `on_images` call (the loop already
            thins them by `TrainConfig.grid_every`); the final grids are always logged.
        system_metrics: log CPU / memory / GPU usage as `system/*` metrics (needs psutil; GPU needs pynvml).
        flush_interval_s: longest time a queued metric waits in the background before it is sent.
        end_retry_s: how long the end-of-run calls (flushing queued metrics, the loss figure, the model upload,
            the final status) are retried through a server outage before the run is given up as FAILED.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "mrigen", run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, Any] | None = None, log_model: bool = True,
                 image_every: int = 1, system_metrics: bool = True, flush_interval_s: float = 2.0,
                 end_retry_s: float = 300.0) -> None:
        if not experiment:
            raise ValueError("MlflowHook.experiment must be a non-empty experiment name")
        if int(image_every) < 1:
            raise ValueError(f"MlflowHook.image_every={image_every!r} must be >= 1")
        if not flush_interval_s > 0:
            raise ValueError(f"MlflowHook.flush_interval_s={flush_interval_s!r} must be > 0")
        if not end_retry_s >= 0:
            raise ValueError(f"MlflowHook.end_retry_s={end_retry_s!r} must be >= 0 seconds")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.log_model = log_model
        self.image_every = int(image_every)
        self.system_metrics = system_metrics
        self.flush_interval_s = flush_interval_s
        self.end_retry_s = end_retry_s
        self.model_log_retries = 0                 # retries the model upload needed (outage statistics)
        self.kept_model_dir: Path | None = None    # where the model is kept when the end of the run failed
        self.client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.model_uri: str | None = None          # models:/<model_id> once the model is logged
        self._worker: LogWorker | None = None
        self._monitor = None
        self._image_calls = 0
        self._unlogged_grids: tuple[int, dict[str, np.ndarray]] | None = None

    # -- hook interface ------------------------------------------------------------------------------------------
    def on_start(self, ctx: TrainContext) -> None:
        """Create the run in its experiment, log params, tags and the dataset input; start background logging."""
        if self.run_id is not None:
            if self.run_id in safety.open_runs():
                return                               # resumed inside the same process: keep the run
            raise RuntimeError(f"MlflowHook: run {self.run_id} is already terminated; use a new hook per run")
        self.client, self.tracking_uri = make_client(self.tracking_uri)
        self.experiment_id = get_or_create_experiment(self.client, self.experiment)
        safety.install_handlers()
        # Ctrl-C / SIGTERM between "the server created the run" and "a closer is registered" would leave the run
        # RUNNING for ever: hold those signals until the closer exists (they are delivered right after).
        with safety.signals_deferred():
            run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=self._run_tags(ctx))
            self.run_id = run.info.run_id
            safety.register_open_run(self.run_id, self._close_from_signal)
        try:
            params = [Param(k, _param_value(v)) for k, v in sorted(ctx.params().items())]
            params += [Param("data.n_train", str(ctx.n_train)), Param("data.n_val", str(ctx.n_val))]
            for i in range(0, len(params), 100):         # log_batch takes at most 100 params per call
                self.client.log_batch(self.run_id, params=params[i:i + 100], synchronous=True)
            self._log_inputs_retrying(store_dataset_input(ctx.data_path, ctx.data_digest, ctx.n_train, ctx.n_val))
            self._worker = LogWorker(self.client, self.run_id, interval_s=self.flush_interval_s)
            self._start_system_metrics(ctx)
        except BaseException as exc:
            self.close("FAILED", f"on_start failed: {error_line(exc)}")
            raise
        log.info("MLflow run %s in experiment %r at %s", self.run_id, self.experiment, redact(self.tracking_uri))

    def on_epoch_end(self, ctx: TrainContext, epoch: int, metrics: dict[str, float]) -> None:
        """Queue the epoch's metrics (step = epoch) for the background thread."""
        self._require_run()
        self._worker.log_metrics(metrics, step=epoch)

    def on_images(self, ctx: TrainContext, epoch: int, grids: dict[str, np.ndarray]) -> None:
        """Queue grids as `log_image(key=name, step=epoch)` on every `image_every`-th call."""
        self._require_run()
        self._image_calls += 1
        if (self._image_calls - 1) % self.image_every == 0:
            for name, grid in grids.items():
                self._worker.log_image(grid, key=name, step=epoch)
            self._unlogged_grids = None
        else:
            self._unlogged_grids = (epoch, grids)

    def on_end(self, ctx: TrainContext, result: "TrainResult") -> None:
        """Log the loss curves (the prior's as `prior_train_loss` / `prior_val_loss` by prior step), `final_*`
        metrics and the model, then terminate the run.

        Raises:
            TrackingError: the end of the run could not be logged (after retries); the run is marked FAILED and
                the message names the folder keeping the trained model.
        """
        self._require_run()
        try:
            if self._unlogged_grids is not None:
                epoch, grids = self._unlogged_grids
                for name, grid in grids.items():
                    self._worker.log_image(grid, key=name, step=epoch)
            for row in result.prior_curve:          # the second stage's curves, by optimiser step of the prior
                self._worker.log_metrics({f"prior_{k}": v for k, v in row.items() if k != "step"},
                                         step=int(row["step"]))
            step = max(result.epochs_run - 1, 0)
            self._worker.log_metrics({f"final_{k}": v for k, v in result.val_metrics.items()}, step=step)
            self._worker.flush(timeout=max(self.end_retry_s, 1.0))
            if result.history:
                self._retry(lambda: self._log_loss_figure(result.history), "log the loss curves")
            tags = [RunTag("mrigen.epochs_run", str(result.epochs_run))]
            if result.stopped_early:
                tags.append(RunTag("mrigen.stop_reason", redact(result.stop_reason or "stopped early")[:5000]))
            self._retry(lambda: self.client.log_batch(self.run_id, tags=tags, synchronous=True), "log the end tags")
            if self.log_model and not result.stopped_early:
                self._log_model(ctx, result, step)
        except BaseException as exc:
            kept = self._keep_model(result) if self.log_model and not result.stopped_early else None
            where = f"; the trained model is kept at {kept}" if kept is not None else ""
            try:
                self.close("FAILED", f"logging at the end of training failed: {error_line(exc)}")
            except Exception as close_exc:
                log.error("mrigen.tracking: run %s could not be marked FAILED (%s); it stays RUNNING on the server",
                          self.run_id, error_line(close_exc))
            if isinstance(exc, Exception):
                raise TrackingError(f"MLflow run {self.run_id}: logging at the end of training failed: "
                                    f"{error_line(exc)}{where}") from exc
            raise
        self.close("KILLED" if result.stopped_early else "FINISHED", result.stop_reason or "")

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def close(self, status: str = "FINISHED", reason: str = "") -> None:
        """Flush and terminate the run with `status` (FINISHED / KILLED / FAILED); idempotent.

        Raises:
            TrackingError: queued metrics could not be sent (the run is still terminated first).
        """
        if self.run_id is None or self.run_id not in safety.open_runs():
            return
        safety.unregister_run(self.run_id)
        pending_error: BaseException | None = None
        try:
            if self._worker is not None:
                self._worker.close(timeout=60.0)
        except Exception as exc:
            pending_error = exc
        finally:
            self._stop_system_metrics()
            if status != "FINISHED" and reason:
                self._retry(lambda: self.client.set_tag(self.run_id, "mrigen.end_reason", redact(reason)[:5000]),
                            "tag the end reason")
            self._retry(lambda: self.client.set_terminated(self.run_id, status=status), f"mark the run {status}")
        if pending_error is not None and status == "FINISHED":
            raise pending_error

    def __enter__(self) -> "MlflowHook":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """As a context manager: a run still open when the block raises is marked FAILED (KILLED on Ctrl-C)."""
        if exc_type is None:
            return
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        self.close(status, f"{exc_type.__name__}: {error_line(exc)}")

    def _close_from_signal(self, status: str, reason: str) -> None:
        # Runs in a signal handler / atexit: do not wait long for queued metrics.
        if self._worker is not None:
            try:
                self._worker.flush(timeout=10.0)
            except Exception as exc:
                log.error("mrigen.tracking: pending metrics of run %s lost: %s", self.run_id, error_line(exc))
        self._stop_system_metrics()
        self.client.set_tag(self.run_id, "mrigen.end_reason", redact(reason)[:5000])
        self.client.set_terminated(self.run_id, status=status)

    # -- helpers -------------------------------------------------------------------------------------------------
    @property
    def log_stats(self) -> dict[str, float]:
        """Background-logging counters (metrics_sent, images_sent, retries, outage_s, metrics_dropped)."""
        return dict(self._worker.stats) if self._worker is not None else {}

    def _retry(self, fn, what: str):
        return retry_call(fn, what=f"{what} (run {self.run_id})", retry_for_s=self.end_retry_s)[0]

    def _keep_model(self, result: "TrainResult") -> Path | None:
        """The local folder holding the trained model: the training's own, else a new kept temporary folder."""
        if result.model_dir is not None and Path(result.model_dir).is_dir():
            self.kept_model_dir = Path(result.model_dir)
            return self.kept_model_dir
        try:
            from mrigen.models import save_model

            self.kept_model_dir = save_model(result.model, Path(tempfile.mkdtemp(prefix="mrigen-unlogged-")) / "model")
        except Exception as exc:
            log.error("mrigen.tracking: could not keep the trained model locally: %s", error_line(exc))
            return None
        return self.kept_model_dir

    def _require_run(self) -> None:
        if self.run_id is None or self._worker is None:
            raise RuntimeError("MlflowHook: on_start was not called (or failed) before this hook method")

    def _log_inputs_retrying(self, dataset: DatasetInput, attempts: int = 5) -> None:
        """`log_inputs`, retried: the server's get-or-create of a dataset row races when many runs log the same
        store at once (a unique-key violation in one of them); a retry finds the row the winner created."""
        from mlflow.exceptions import MlflowException

        for i in range(attempts):
            try:
                self.client.log_inputs(self.run_id, datasets=[dataset])
                return
            except MlflowException as exc:
                if i == attempts - 1:
                    raise
                log.info("mrigen.tracking: log_inputs retry %d after: %s", i + 1, error_line(exc))
                time.sleep(0.05 * (i + 1))

    def _run_tags(self, ctx: TrainContext) -> dict[str, str]:
        tags = {"mrigen.version": mrigen.__version__, "mrigen.family": str(ctx.model_cfg.family),
                "mrigen.data_digest": ctx.data_digest, "mrigen.device": str(ctx.device)}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["mrigen.git_commit"] = commit
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        tags.update({str(k): str(v) for k, v in self.tags.items()})
        return {k: redact(v)[:5000] for k, v in tags.items()}

    def _log_loss_figure(self, history: list[dict[str, float]]) -> None:
        import matplotlib.pyplot as plt

        from mrigen.train.images import loss_figure

        fig = loss_figure(history)
        try:
            self.client.log_figure(self.run_id, fig, "loss_curves.png")
        finally:
            plt.close(fig)

    def _log_model(self, ctx: TrainContext, result: "TrainResult", step: int) -> None:
        from mrigen.tracking.model_log import log_pyfunc_model

        def upload(model_dir: Path) -> str:
            uri, retries = retry_call(lambda: log_pyfunc_model(self.client, self.tracking_uri, self.run_id, model_dir,
                                                               ctx.model_cfg.image_size, step=step),
                                      what=f"upload the model of run {self.run_id}", retry_for_s=self.end_retry_s)
            self.model_log_retries += retries
            return uri

        t0 = time.perf_counter()
        if result.model_dir is not None:
            self.model_uri = upload(Path(result.model_dir))
        else:
            from mrigen.models import save_model

            with tempfile.TemporaryDirectory(prefix="mrigen-model-") as tmp:
                self.model_uri = upload(save_model(result.model, Path(tmp) / "model"))
        self._retry(lambda: self.client.set_tag(self.run_id, "mrigen.model_uri", self.model_uri), "tag the model")
        log.info("logged model %s for run %s in %.1f s", self.model_uri, self.run_id, time.perf_counter() - t0)

    def _start_system_metrics(self, ctx: TrainContext) -> None:
        if not self.system_metrics:
            return
        try:
            import psutil  # noqa: F401  (MLflow's system metrics need it)
        except ImportError:
            log.info("mrigen.tracking: system metrics skipped (psutil is not installed)")
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if ctx.device.type == "cuda":
            try:
                import pynvml  # noqa: F401
            except ImportError:
                log.info("mrigen.tracking: GPU system metrics skipped (pynvml / nvidia-ml-py is not installed)")
        self._monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.tracking_uri)
        self._monitor.start()

    def _stop_system_metrics(self) -> None:
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            monitor.finish()


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return redact(text)[:PARAM_MAX_CHARS]


def store_dataset_input(path: str, digest: str, n_train: int, n_val: int) -> DatasetInput:
    """The slice store as a run input (context "train"): its digest identifies the data. The trials and the study's
    parent run log the same one, so the UI's Dataset column names the store on both."""
    source = json.dumps({"uri": redact(str(path))})
    dataset = Dataset(name=Path(path).name or "slice-store", digest=digest[:36], source_type="local", source=source,
                      profile=json.dumps({"n_train": n_train, "n_val": n_val, "sha256": digest}))
    return DatasetInput(dataset=dataset, tags=[InputTag("mlflow.data.context", "train")])
