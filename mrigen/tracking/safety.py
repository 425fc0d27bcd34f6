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
_STATE = {"atexit": False, "signals": False, "crashed": False, "deferring": False}
_PREVIOUS: dict[int, object] = {}
_DEFERRED = (signal.SIGINT, signal.SIGTERM)
_HELD: dict[int, object] = {}          # signum -> handler to restore when the signals_deferred block ends


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block; one that arrives meanwhile is delivered (to the handler in place
    before the block) when the block exits. Outside the main thread (Python runs handlers only there) it does
    nothing.

    Blocking the signals in the calling thread (`pthread_sigmask`) is not enough: the kernel delivers a
    process-directed signal such as Ctrl-C to any thread that does not block it (MLflow's, torch's), and
    Python then runs the handler in the main thread at once. So the Python-level handlers are swapped for a
    recorder too; the mask stays so that a signal arriving in the main thread does not interrupt system calls.
    """
    if threading.current_thread() is not threading.main_thread() or _STATE["deferring"]:
        yield                                          # nested blocks: the outermost one holds the signals
        return
    received: list[int] = []
    for signum in _DEFERRED:
        if signal.getsignal(signum) is not None:       # None: a handler set outside Python, left alone
            _HELD[signum] = signal.signal(signum, lambda s, frame: received.append(s))
    _STATE["deferring"] = True
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)   # runs any pending handler: the recorder's
        for signum in list(_HELD):
            signal.signal(signum, _HELD.pop(signum))
        _STATE["deferring"] = False
        for signum in dict.fromkeys(received):         # once each, in arrival order, to the restored handler
            signal.raise_signal(signum)


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
                if signum in _HELD:                   # inside signals_deferred: install behind the recorder
                    _PREVIOUS[signum], _HELD[signum] = _HELD[signum], _on_signal
                    continue
                _PREVIOUS[signum] = signal.getsignal(signum)
                signal.signal(signum, _on_signal)
            except (ValueError, OSError) as exc:      # e.g. embedded interpreters without signal support
                log.warning("mrigen.tracking: no %s handler installed (%s)", signal.Signals(signum).name, exc)
        _STATE["signals"] = True
