"""Background logging: metrics and images are queued by the training thread and sent by one worker thread.

The training loop only pays for a `queue.put`; the worker batches metrics into `log_batch` calls (at most
`MAX_METRICS_PER_BATCH` each, MLflow's limit) and uploads image grids. An error in the worker is kept and
re-raised (as `TrackingError`) on the next `put` / `flush`, never swallowed.
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
    """

    def __init__(self, client: MlflowClient, run_id: str, interval_s: float = 2.0) -> None:
        self.client, self.run_id, self.interval_s = client, run_id, interval_s
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
        """Flush, then stop the thread."""
        try:
            self.flush(timeout)
        finally:
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
        try:
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH], synchronous=True)
            for image, key, step in images:
                self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)
        except Exception as exc:  # kept and re-raised in the training thread
            log.error("mrigen.tracking: logging to run %s failed: %s", self.run_id, error_line(exc))
            self._error = exc
        finally:
            with self._idle:
                self._pending -= jobs
                self._idle.notify_all()
