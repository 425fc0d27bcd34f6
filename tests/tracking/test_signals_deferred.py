"""`safety.signals_deferred` holds Ctrl-C / SIGTERM for its block, whichever thread the kernel hands them to.

A process-directed signal goes to any thread that does not block it. Blocking it in the main thread alone
(the earlier implementation) let the handler run inside the block whenever another thread (MLflow's, torch's)
took the signal: issue 12's run left RUNNING. The tests make the C-level handler run in another thread on
purpose and wait for it (through `signal.set_wakeup_fd`) before checking, so they do not depend on timing.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading

import pytest

from mrigen.tracking import safety


@contextlib.contextmanager
def _handler_and_wakeup(calls: list[int]):
    """Install a recording SIGINT/SIGTERM handler and a wakeup pipe; yield a function that waits for the
    C-level handler to have run for one signal (in whichever thread)."""
    old = {s: signal.signal(s, lambda signum, frame: calls.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    r, w = os.pipe()
    os.set_blocking(w, False)
    old_fd = signal.set_wakeup_fd(w)

    def wait_tripped() -> int:
        ready, _, _ = select.select([r], [], [], 60)
        assert ready, "the signal was not delivered within 60 s"
        return os.read(r, 1)[0]

    try:
        yield wait_tripped
    finally:
        signal.set_wakeup_fd(old_fd)
        os.close(r)
        os.close(w)
        for s, h in old.items():
            signal.signal(s, h)


def _other_thread():
    """A live thread that does not block signals (as MLflow's and torch's threads do not)."""
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    return t, stop


def _bytecodes() -> None:
    """Enough Python function calls that a tripped handler would have run in the main thread by now."""
    for _ in range(1000):
        len(())


@pytest.mark.parametrize("delivery", ["other thread", "process"])
def test_signal_in_the_block_is_held_then_delivered_once(delivery: str) -> None:
    calls: list[int] = []
    thread, stop = _other_thread()
    with _handler_and_wakeup(calls) as wait_tripped:
        handler = signal.getsignal(signal.SIGINT)
        with safety.signals_deferred():
            if delivery == "other thread":
                signal.pthread_kill(thread.ident, signal.SIGINT)   # the kernel's choice for a Ctrl-C, forced
            else:
                os.kill(os.getpid(), signal.SIGINT)
            if delivery == "other thread":
                assert wait_tripped() == signal.SIGINT
            _bytecodes()
            inside = list(calls)
        after = list(calls)
        restored = signal.getsignal(signal.SIGINT) is handler
    stop.set()
    assert inside == []                        # held for the whole block
    assert after == [signal.SIGINT]            # then delivered, once, to the handler in place before the block
    assert restored


def test_nested_blocks_deliver_when_the_outermost_ends() -> None:
    calls: list[int] = []
    thread, stop = _other_thread()
    with _handler_and_wakeup(calls) as wait_tripped:
        with safety.signals_deferred():
            with safety.signals_deferred():
                signal.pthread_kill(thread.ident, signal.SIGTERM)
                wait_tripped()
                _bytecodes()
            _bytecodes()
            after_inner = list(calls)
        after_outer = list(calls)
    stop.set()
    assert after_inner == [] and after_outer == [signal.SIGTERM]


def test_handlers_installed_inside_a_block_take_effect_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """MlflowHook.on_start may install safety's handlers while signals are held: they must not chain to the
    temporary recorder, and must be in place once the block ends."""
    calls: list[int] = []
    monkeypatch.setitem(safety._STATE, "signals", False)
    monkeypatch.setattr(safety, "_PREVIOUS", {})
    with _handler_and_wakeup(calls):
        before = signal.getsignal(signal.SIGINT)
        with safety.signals_deferred():
            safety.install_handlers()
        try:
            assert signal.getsignal(signal.SIGINT) is safety._on_signal
            assert safety._PREVIOUS[signal.SIGINT] is before         # chains to the real previous handler
        finally:
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, safety._PREVIOUS[s])
