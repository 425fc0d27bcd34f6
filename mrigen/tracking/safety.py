"""Crash safety: runs still open when the process dies are terminated KILLED (signal) or FAILED (exception).

A process-wide registry of open runs, a SIGTERM/SIGINT handler (installed only from the main thread, chaining to
the previous handler) and an `atexit` hook. A run left RUNNING forever would look alive in the UI and to the tuner.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Callable

__all__ = ["signals_deferred", "register_open_run", "unregister_run", "open_runs", "terminate_open_runs", "install_handlers"]

log = logging.getLogger(__name__)

# run_id -> (owner pid, closer(status, reason)); a forked child never closes its parent's runs.
_OPEN: dict[str, tuple[int, Callable[[str, str], None]]] = {}
_LOCK = threading.Lock()
_STATE = {"atexit": False, "signals": False, "crashed": False}
_PREVIOUS: dict[int, object] = {}


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread for the block; a signal that arrives meanwhile is delivered on
    exit. Outside the main thread (handlers only run there) or without pthread_sigmask it does nothing."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    mask = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def register_open_run(run_id: str, closer: Callable[[str, str], None]) -> None:
    """Remember an open run; `closer(status, reason)` terminates it (must not raise)."""
    with _LOCK:
        _OPEN[run_id] = (os.getpid(), closer)


def unregister_run(run_id: str) -> None:
    """Forget a run that was terminated normally."""
    with _LOCK:
        _OPEN.pop(run_id, None)


def open_runs() -> list[str]:
    """Ids of runs this process opened and has not terminated."""
    with _LOCK:
        return [rid for rid, (pid, _) in _OPEN.items() if pid == os.getpid()]


def terminate_open_runs(status: str, reason: str) -> None:
    """Terminate every run this process still holds open with `status` ("KILLED" or "FAILED")."""
    with _LOCK:
        mine = [(rid, closer) for rid, (pid, closer) in _OPEN.items() if pid == os.getpid()]
        for rid, _ in mine:
            _OPEN.pop(rid, None)
    for rid, closer in mine:
        try:
            closer(status, reason)
        except Exception as exc:  # reported, not swallowed silently: the process is going down anyway
            print(f"mrigen.tracking: could not mark run {rid} {status}: {exc}", file=sys.stderr)


def _at_exit() -> None:
    if open_runs():
        crashed = _STATE["crashed"]
        terminate_open_runs("FAILED" if crashed else "KILLED",
                            "uncaught exception" if crashed else "process exited before training ended")


def _excepthook(exc_type, exc, tb) -> None:
    _STATE["crashed"] = True
    _PREVIOUS_EXCEPTHOOK(exc_type, exc, tb)


_PREVIOUS_EXCEPTHOOK = sys.excepthook


def _on_signal(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    terminate_open_runs("KILLED", f"received {name}")
    previous = _PREVIOUS.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)                       # e.g. Python's KeyboardInterrupt for SIGINT
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)         # die the way the signal intends
        os.kill(os.getpid(), signum)
    # SIG_IGN: the process chose to ignore it; so do we (the runs are closed already).


def install_handlers() -> None:
    """Install the atexit hook (once) and, from the main thread only, SIGTERM/SIGINT handlers (once)."""
    global _PREVIOUS_EXCEPTHOOK
    with _LOCK:
        if not _STATE["atexit"]:
            atexit.register(_at_exit)
            _PREVIOUS_EXCEPTHOOK = sys.excepthook
            sys.excepthook = _excepthook
            _STATE["atexit"] = True
        if _STATE["signals"] or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                _PREVIOUS[signum] = signal.getsignal(signum)
                signal.signal(signum, _on_signal)
            except (ValueError, OSError) as exc:      # e.g. embedded interpreters without signal support
                log.warning("mrigen.tracking: no %s handler installed (%s)", signal.Signals(signum).name, exc)
        _STATE["signals"] = True
