"""Process helpers for the local stack: free ports, detached servers, pid files, health waits, clean stops.

Every server runs in its own session (process group) so that `down` from another shell, or the end of a test
session, can stop it and everything it spawned: SIGTERM (or the server's own "fast stop" signal) first, then
SIGKILL for whatever is still alive after a timeout. Identity is the pid plus the process start time, so a
recycled pid is never mistaken for a server of ours.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

__all__ = [
    "ProcessRecord",
    "StackError",
    "free_ports",
    "port_is_free",
    "spawn",
    "is_alive",
    "stop",
    "wait_ready",
    "write_private",
    "read_json",
]


class StackError(RuntimeError):
    """A server of the stack could not be started, reached or stopped (the message names the log file)."""


@dataclass(frozen=True)
class ProcessRecord:
    """What identifies one running server.

    Attributes:
        name: service name ("postgres", "s3", "mlflow").
        pid: pid of the session leader (the server's main process).
        create_time: psutil start time of `pid`; guards against pid reuse.
        log: path of the file that receives the server's stdout and stderr.
    """

    name: str
    pid: int
    create_time: float
    log: str

    def to_dict(self) -> dict:
        """Return a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> ProcessRecord:
        """Inverse of `to_dict`."""
        return cls(name=str(d["name"]), pid=int(d["pid"]), create_time=float(d["create_time"]), log=str(d["log"]))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Return True when nothing listens on `host:port` and it can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Return `n` distinct ports that are free on `host` right now (the OS picks them).

    All sockets are held open until every port is chosen, so the ports differ from each other.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (0600), created that way so it is never world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT; force it


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    log: Path,
    pid_file: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: tuple[int, int] | None = None,
) -> tuple[subprocess.Popen, ProcessRecord]:
    """Start `argv` detached in a new session, output appended to `log`, its pid written to `pid_file`.

    Args:
        name: service name for the record.
        argv: command line; must not contain secrets (process listings show it to every local user).
        log: log file (created); the server's stdout and stderr go there.
        pid_file: file that receives the pid (plain text, one line).
        env: full environment of the child (None: inherit).
        cwd: working directory of the child.
        user: (uid, gid) to run as, for servers that refuse to run as root.

    Returns:
        The Popen handle (so the caller can reap it) and the `ProcessRecord`.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        kwargs: dict = {}
        if user is not None:
            kwargs = {"user": user[0], "group": user[1], "extra_groups": []}
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            start_new_session=True,
            close_fds=True,
            **kwargs,
        )
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:  # died at once: keep a record so the health wait reports the log
        create_time = 0.0
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{proc.pid}\n", encoding="utf-8")
    return proc, ProcessRecord(name=name, pid=proc.pid, create_time=create_time, log=str(log))


def _process(record: ProcessRecord) -> psutil.Process | None:
    """Return the live psutil process of `record`, or None when it is gone, a zombie, or another process."""
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > 1e-3 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.NoSuchProcess:
        return None


def is_alive(record: ProcessRecord) -> bool:
    """Return True while the server of `record` runs (same pid and start time, not a zombie)."""
    return _process(record) is not None


def stop(record: ProcessRecord, *, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> bool:
    """Stop a server and all its descendants: `sig` first, SIGKILL after `timeout_s`.

    Args:
        record: the server to stop.
        sig: polite stop signal (SIGTERM; PostgreSQL's fast shutdown is SIGINT).
        timeout_s: seconds to wait after `sig` before SIGKILL.

    Returns:
        True when SIGKILL was needed.
    """
    leader = _process(record)
    if leader is None:
        return False
    try:
        procs = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = [leader]
    deadline = time.monotonic() + timeout_s
    try:
        leader.send_signal(sig)
    except psutil.NoSuchProcess:
        pass
    # A well-behaved leader stops its children itself; descendants it left behind get SIGTERM once it is gone.
    psutil.wait_procs([leader], timeout=timeout_s)
    for proc in procs[1:]:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=max(deadline - time.monotonic(), 1.0))
    killed = False
    for proc in alive:
        try:
            proc.kill()
            killed = True
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5.0)
    return killed


def wait_ready(
    what: str,
    check: Callable[[], bool],
    *,
    proc: subprocess.Popen | None,
    record: ProcessRecord | None,
    timeout_s: float,
    interval_s: float = 0.2,
) -> float:
    """Poll `check()` until it returns True; fail fast when the server exits.

    Args:
        what: readable name ("PostgreSQL on 127.0.0.1:5432") used in the error.
        check: returns True when ready; may raise `OSError`-like errors while not ready (they count as "not yet").
        proc: the Popen handle when we started the server here (to see an early exit).
        record: the server's record (for its log path); None for an external server.
        timeout_s: seconds before giving up.
        interval_s: pause between polls.

    Returns:
        Seconds waited.

    Raises:
        StackError: on exit or timeout, naming the log file to read.
    """
    start = time.monotonic()
    where = f"; see the log {record.log}" if record is not None else ""
    last_error = ""
    while True:
        try:
            if check():
                return time.monotonic() - start
        except Exception as exc:  # noqa: BLE001 - any failure of a probe means "not ready yet"; kept for the message
            last_error = f" (last probe error: {type(exc).__name__})"
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode} while starting{where}")
        if record is not None and proc is None and not is_alive(record):
            raise StackError(f"{what} stopped while starting{where}")
        if time.monotonic() - start > timeout_s:
            raise StackError(f"{what} not ready after {timeout_s:.0f} s{last_error}{where}")
        time.sleep(interval_s)


def read_json(path: Path) -> dict | None:
    """Return the parsed JSON object at `path`, or None when the file does not exist."""
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
