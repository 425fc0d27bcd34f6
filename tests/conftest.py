"""Shared test fixtures: real servers on loopback for integration tests, GPU skipping.

- `stack` (session): PostgreSQL + SeaweedFS S3 + MLflow started once per test session in a temp dir through
  `mrigen.stack`, only when a test asks for it; always stopped at the end (failures, Ctrl-C and SIGTERM too).
  Tests that use it get the `servers` marker automatically, so `-m "not servers"` skips them.
- `mlflow_env`: points MLflow at the stack for one test, with no S3 keys in the client's environment
  (artifacts go through the server's proxy).
- Tests marked `gpu` are skipped when CUDA is not available.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Flows that only need *a* feature network (tune, train with a final evaluation, the CLIs they start) train it
# with 600 steps instead of the default 1,500 to keep the suite's time; tests of what the metrics can see pass
# an explicit FeatureNetConfig() (tests/metrics/test_metrics_discrimination.py).
os.environ.setdefault("MRIGEN_FEATURE_NET_STEPS", "600")
os.environ.setdefault("MRIGEN_FEATURE_NET_MEMBERS", "1")   # one network: the ensemble is tested on its own

# Variables that would give the client direct S3 access or another tracking server; removed by `mlflow_env`.
_CLIENT_ENV_DROP = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                    "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "MLFLOW_REGISTRY_URI")  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    """Under `make test`'s xdist workers, SIGTERM to the pytest process that runs them goes on to the workers, which
    stop their servers (the `stack` fixture turns SIGTERM into KeyboardInterrupt), and is then a KeyboardInterrupt
    of its own: as in one process, a CI runner's SIGTERM leaves no server running."""
    if (getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput")
            and threading.current_thread() is threading.main_thread()):
        signal.signal(signal.SIGTERM, _stop_workers_then_interrupt)


def _stop_workers_then_interrupt(signum: int, frame) -> None:
    import psutil

    stop_processes(psutil.Process().children(), signum)
    raise KeyboardInterrupt(f"signal {signum}")


def stop_processes(processes: list, signum: int = signal.SIGTERM, timeout_s: float = 120.0) -> list:
    """Send `signum` to each `psutil.Process` and wait up to `timeout_s` for the processes they started (the
    servers a worker's teardown stops) to exit; returns those still alive. The workers themselves are not waited
    for: after their teardown they wait for the xdist controller, which shuts them down once this returns."""
    import psutil

    started = []
    for proc in processes:
        try:
            started += proc.children(recursive=True)
            proc.send_signal(signum)
        except psutil.NoSuchProcess:
            pass  # already gone: nothing to stop
    deadline = time.monotonic() + timeout_s
    while True:
        running = [p for p in started if _running(p)]
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.2)


def _running(proc) -> bool:
    """Whether a `psutil.Process` still runs: an exited child that its parent has not reaped yet (a zombie) does
    not (psutil's own wait would wait for the reaping)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests using `stack` as `servers`; run the long files first; skip `gpu` tests without CUDA."""
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.servers)
    # `make test` runs two xdist workers that take whole files in collection order (`--dist loadfile
    # --no-loadscope-reorder`): the files with long end-to-end tests go first, so that the run does not end with
    # one worker alone on one of them.
    long_files = {item.path for item in items
                  if item.get_closest_marker("slow") or item.get_closest_marker("reliability")}
    items.sort(key=lambda item: item.path not in long_files)  # stable: the order within each group is kept
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch  # only when a gpu test was collected

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stack() -> Iterator:
    """Start the three servers once per session and yield their `mrigen.stack.StackInfo`; stop them at the end."""
    from mrigen.stack import Stack, StackConfig

    # Not under pytest's basetemp: pytest resets /tmp/pytest-of-<user> to 0700 whenever a session starts, and
    # PostgreSQL (run as a non-root user when the tests run as root) must traverse the parents of its data dir.
    directory = Path(tempfile.mkdtemp(prefix="mrigen-stack-"))
    server_stack = Stack(StackConfig(directory=directory))
    previous = None
    if threading.current_thread() is threading.main_thread():
        # A CI runner that times out sends SIGTERM: turn it into KeyboardInterrupt so the teardown below runs.
        def _terminate(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield server_stack.up()
    finally:
        server_stack.down()
        shutil.rmtree(directory)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def mlflow_env(stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point MLflow at the session stack for one test; yield the tracking URI. The client holds no S3 keys."""
    import mlflow

    for name in _CLIENT_ENV_DROP:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.tracking_uri)
    mlflow.set_tracking_uri(stack.tracking_uri)
    try:
        yield stack.tracking_uri
    finally:
        if mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # back to the environment, which monkeypatch restores next
