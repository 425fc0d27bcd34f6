"""Background logging: metrics and images are queued by the training thread and sent by one worker thread.

The training loop only pays for a `queue.put`; the worker batches metrics into `log_batch` calls (at most
`MAX_METRICS_PER_BATCH` each, MLflow's limit) and uploads image grids. A transient error (server down or
restarting: see `mrigen.tracking.retry.is_transient`) keeps the batch and retries it with capped exponential
backoff for up to `retry_for_s`, while training goes on queueing; everything queued meanwhile is sent, in order,
once the server answers again. Any other error, or an outage longer than `retry_for_s`, is kept and re-raised
(as `TrackingError`) on the next `put` / `flush`, never swallowed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric

from mrigen.tracking.client import TrackingError, error_line
from mrigen.tracking.retry import backoff_s, is_transient

__all__ = ["LogWorker", "MAX_METRICS_PER_BATCH"]

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000        # MLflow's log_batch limit
_STOP = object()


class LogWorker:
    """One daemon thread sending a run's metrics (batched) and images.

    Args:
        client: the MLflow client (thread-safe for these calls).
        run_id: the run to log into.
        interval_s: longest time a queued metric waits before it is sent.
        retry_for_s: how long one batch is retried through a server outage before the error is kept.

    Attributes:
        stats: counters for reports and tests: metrics_sent, images_sent, retries, outage_s (seconds spent
            waiting for the server), metrics_dropped (given up after `retry_for_s` or at `close`).
    """

    def __init__(self, client: MlflowClient, run_id: str, interval_s: float = 2.0, retry_for_s: float = 3600.0) -> None:
        if not retry_for_s >= 0:
            raise ValueError(f"LogWorker.retry_for_s={retry_for_s!r} must be >= 0 seconds")
        self.client, self.run_id, self.interval_s, self.retry_for_s = client, run_id, interval_s, retry_for_s
        self.stats = {"metrics_sent": 0, "images_sent": 0, "retries": 0, "outage_s": 0.0, "metrics_dropped": 0}
        self._closing = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name=f"mlflow-log-{run_id[:8]}", daemon=True)
        self._thread.start()

    # -- training-thread side ------------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue numeric metrics at `step` (non-numeric values are skipped)."""
        self._raise_pending()
        now = int(time.time() * 1000)
        items = [Metric(key=k, value=float(v), timestamp=now, step=int(step))
                 for k, v in metrics.items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)]
        if items:
            self._put(("metrics", items))

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """Queue an image (uint8 (H, W) or (H, W, 3)) to be logged with `client.log_image(key=, step=)`."""
        self._raise_pending()
        self._put(("image", (np.array(image, copy=True), key, int(step))))

    def flush(self, timeout: float | None = 120.0) -> None:
        """Block until everything queued so far is sent; re-raise a worker error."""
        self._queue.put(("flush", None))
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending > 0 and self._thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TrackingError(f"MLflow logging for run {self.run_id} did not finish within {timeout} s")
                self._idle.wait(timeout=left)
        self._raise_pending()

    def close(self, timeout: float | None = 120.0) -> None:
        """Flush, then stop the thread (a batch still being retried is given up and counted as dropped)."""
        try:
            self.flush(timeout)
        finally:
            self._closing.set()
            self._queue.put((_STOP, None))
            self._thread.join(timeout=5)

    def _put(self, job: tuple) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(job)

    def _raise_pending(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise TrackingError(f"MLflow logging failed for run {self.run_id}: {error_line(exc)}") from None

    # -- worker side ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        carry = None
        while True:
            kind, payload = carry if carry is not None else self._queue.get()
            carry = None
            if kind is _STOP:
                return
            if kind == "flush":
                continue
            if kind == "image":
                self._send([], [payload], jobs=1)
                continue
            batch, jobs = list(payload), 1
            # Gather what else arrives within interval_s so that one request carries many metrics; anything
            # else (an image, a flush, stop) ends the gathering and is handled next, in order.
            deadline = time.monotonic() + self.interval_s
            while len(batch) < MAX_METRICS_PER_BATCH:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt[0] != "metrics":
                    carry = nxt
                    break
                batch.extend(nxt[1])
                jobs += 1
            self._send(batch, [], jobs=jobs)

    def _send(self, metrics: list[Metric], images: list[tuple], jobs: int) -> None:
        done_metrics, done_images, attempt, first_failure = 0, 0, 0, None
        try:
            while True:
                try:
                    while done_metrics < len(metrics):
                        chunk = metrics[done_metrics:done_metrics + MAX_METRICS_PER_BATCH]
                        self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
                        done_metrics += len(chunk)
                    while done_images < len(images):
                        image, key, step = images[done_images]
                        self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)
                        done_images += 1
                    return
                except Exception as exc:
                    now = time.monotonic()
                    first_failure = now if first_failure is None else first_failure
                    if (not is_transient(exc) or now - first_failure >= self.retry_for_s
                            or self._closing.is_set()):
                        raise
                    pause = backoff_s(attempt)
                    log.warning("mrigen.tracking: logging to run %s failed (%s); %d metrics / %d images kept, "
                                "retry %d in %.1f s", self.run_id, error_line(exc), len(metrics) - done_metrics,
                                len(images) - done_images, attempt + 1, pause)
                    self.stats["retries"] += 1
                    attempt += 1
                    self._closing.wait(pause)
        except Exception as exc:  # kept and re-raised in the training thread
            self.stats["metrics_dropped"] += len(metrics) - done_metrics
            log.error("mrigen.tracking: logging to run %s failed: %s", self.run_id, error_line(exc))
            self._error = exc
        finally:
            self.stats["metrics_sent"] += done_metrics
            self.stats["images_sent"] += done_images
            if first_failure is not None:
                self.stats["outage_s"] += time.monotonic() - first_failure
            with self._idle:
                self._pending -= jobs
                self._idle.notify_all()
