"""Riding out tracking-server outages: which errors are transient, and a retry loop with capped backoff.

A restarted MLflow server, a restarted PostgreSQL behind it, or an S3 server that is briefly gone all show up
on the client as connection errors, timeouts or HTTP 5xx / 429 answers. Those are worth retrying; a 4xx answer
(bad parameter, missing resource, refused credentials) is not: retrying it would only hide a bug.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from mrigen.tracking.client import error_line

__all__ = ["is_transient", "retry_call", "backoff_s"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_TEXT = ("failed with exception", "failed with timeout", "max retries exceeded", "connection refused",
                   "connection reset", "connection aborted", "remote end closed", "bad gateway",
                   "service unavailable", "gateway timeout", "too many 500 error", "too many 502 error",
                   "too many 503 error", "too many 504 error",
                   # the server's own database connection dropped (PostgreSQL restarting behind MLflow)
                   "operationalerror", "could not connect", "server closed the connection",
                   "terminating connection", "connection is closed")


def is_transient(exc: BaseException) -> bool:
    """True when `exc` looks like a server that is down or restarting, not like a bad request.

    Transient: connection errors, timeouts, HTTP 5xx and 429 from `requests` (artifact uploads); from MLflow's
    REST layer 429 / 502-504, and errors whose text says the connection (or the server's database connection)
    failed, also when MLflow wraps them in an `MlflowException` after its own retries. A bare HTTP 500 from the
    tracking API is not retried: it is as likely a bug as an outage.
    """
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, requests.HTTPError):
        status = getattr(exc.response, "status_code", None)
        return status is not None and (status >= 500 or status == 429)
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        if status in (429, 502, 503, 504):
            return True
        text = str(exc).lower()
        return any(t in text for t in _TRANSIENT_TEXT)
    return False


def backoff_s(attempt: int, base_s: float = 0.5, cap_s: float = 15.0) -> float:
    """Pause before retry number `attempt` (0-based): base * 2**attempt, at most `cap_s`."""
    return min(cap_s, base_s * (2.0 ** min(attempt, 30)))


def retry_call(fn: Callable[[], T], *, what: str, retry_for_s: float, base_s: float = 0.5, cap_s: float = 15.0,
               sleep: Callable[[float], None] = time.sleep) -> tuple[T, int]:
    """Call `fn` until it succeeds, retrying transient errors with capped exponential backoff.

    Args:
        fn: the call (no arguments).
        what: readable name for the log lines ("log the model of run 1a2b").
        retry_for_s: stop retrying once this many seconds have passed since the first failure.
        base_s, cap_s: backoff (see `backoff_s`).
        sleep: injectable for tests.

    Returns:
        (fn's result, number of retries it took).

    Raises:
        The last error: at once when it is not transient, else when `retry_for_s` has run out.
    """
    first_failure, attempt = None, 0
    while True:
        try:
            return fn(), attempt
        except Exception as exc:
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            if not is_transient(exc) or now - first_failure >= retry_for_s:
                raise
            pause = min(backoff_s(attempt, base_s, cap_s), max(0.0, first_failure + retry_for_s - now))
            log.warning("mrigen.tracking: %s failed (%s); retry %d in %.1f s", what, error_line(exc), attempt + 1,
                        pause)
            sleep(pause)
            attempt += 1
