"""The local stack: PostgreSQL + SeaweedFS S3 + MLflow on loopback, data, logs and credentials under one dir.

Layout of DIR:

    credentials.json      generated passwords and keys (0600); reused on every `up`
    stack.json            ports, pids and settings of the running stack (no secret)
    run/<service>.pid     pid files
    logs/<service>.log    server logs (no secret is passed where a server could log it)
    postgres/data         the PostgreSQL cluster (embedded server only)
    postgres/install      under root: the copy of the server binaries it runs from (see postgres.server_bin)
    s3/data, s3/s3.json   SeaweedFS data and its identity file (0600)
    mlflow/               working dir of the MLflow server (auth .ini, no secret)

Usage:
    stack = Stack(StackConfig(directory=Path(".stack")))
    info = stack.up()          # idempotent: returns the running stack's info when it already runs
    ...                        # info.tracking_uri, info.postgres_url (Optuna), info.s3_endpoint, ...
    stack.down()
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import signal
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mrigen.stack import mlflow as mlflow_server
from mrigen.stack import postgres, s3
from mrigen.stack.procs import (
    ProcessRecord, StackError, free_ports, is_alive, port_is_free, read_json, stop, wait_ready, write_private,
)  # fmt: skip

__all__ = ["StackConfig", "StackInfo", "ServiceStatus", "Stack", "SERVICES"]

_log = logging.getLogger(__name__)
SERVICES = ("postgres", "s3", "mlflow")  # start order; stopped in reverse
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


@dataclass(frozen=True)
class StackConfig:
    """Settings of a local stack."""

    directory: Path = Path(".stack")  # data, logs, pid files and credentials live here
    bucket: str = "mlflow"  # S3 bucket of the MLflow artifacts (S3 naming rules)
    artifact_prefix: str = "artifacts"  # key prefix of the artifacts inside the bucket
    auth: bool = False  # run MLflow's basic-auth app (admin password generated into credentials.json)
    workers: int = 1  # uvicorn workers of the MLflow server (1 suits a 2-core laptop)
    postgres_url: str | None = field(default=None, repr=False)  # existing server (role with CREATEDB); None: embedded
    start_timeout_s: float = 90.0  # per-server health wait before `up` fails (first start runs DB migrations)
    stop_timeout_s: float = 30.0  # SIGTERM -> SIGKILL grace per server (SeaweedFS can take many seconds)

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))
        if not _BUCKET_RE.match(self.bucket):
            raise ValueError(f"bucket={self.bucket!r} is invalid: use 3-63 of lowercase letters, digits, '.', '-'")
        if not _PREFIX_RE.match(self.artifact_prefix):
            raise ValueError(
                f"artifact_prefix={self.artifact_prefix!r} is invalid: use letters, digits, '._-' and inner '/'"
            )
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers={self.workers!r} is invalid: use an integer >= 1")
        for name in ("start_timeout_s", "stop_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: use a number of seconds > 0")
        if self.postgres_url is not None:
            postgres.parse_external(self.postgres_url)  # ValueError naming postgres_url


@dataclass(frozen=True)
class StackInfo:
    """How to reach a running stack. Fields holding secrets are left out of `repr`."""

    directory: Path  # the stack directory
    tracking_uri: str  # http://127.0.0.1:PORT (clients need nothing else, no S3 keys)
    s3_endpoint: str  # http://127.0.0.1:PORT
    bucket: str  # artifact bucket
    artifact_prefix: str  # key prefix inside the bucket
    postgres_host: str  # PostgreSQL address
    postgres_port: int  # PostgreSQL port
    auth: bool  # basic auth on the MLflow server
    admin_username: str  # MLflow admin user (meaningful when auth)
    log_dir: Path  # server logs
    postgres_url: str = field(repr=False)  # Optuna storage URL, with password
    mlflow_db_url: str = field(repr=False)  # MLflow metadata database URL, with password
    s3_access_key: str = field(repr=False)  # S3 keys (only the server and admin tools need them)
    s3_secret_key: str = field(repr=False)
    admin_password: str = field(repr=False)  # MLflow admin password (meaningful when auth)

    def client_env(self) -> dict[str, str]:
        """Return the variables a user exports to use the stack (hold the DB password; terminal only)."""
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri, "OPTUNA_STORAGE": self.postgres_url}
        if self.auth:
            env["MLFLOW_TRACKING_USERNAME"] = self.admin_username
            env["MLFLOW_TRACKING_PASSWORD"] = self.admin_password
        return env


@dataclass(frozen=True)
class ServiceStatus:
    """One line of `status`: what runs where (no secret)."""

    name: str  # "postgres" | "s3" | "mlflow"
    state: str  # "running" | "stopped" | "external"
    address: str  # http(s) URL or host:port, "" when unknown
    pid: int | None  # server pid when running here
    log: str  # log file path ("" for an external server)


class Stack:
    """Start, inspect and stop the three servers of one stack directory."""

    def __init__(self, config: StackConfig | Path | str) -> None:
        self.config = config if isinstance(config, StackConfig) else StackConfig(directory=Path(config))
        self.dir = self.config.directory.resolve()
        self._procs: dict[str, subprocess.Popen] = {}

    # ---- files -----------------------------------------------------------------------------------------
    @property
    def _state_path(self) -> Path:
        return self.dir / "stack.json"

    @property
    def _cred_path(self) -> Path:
        return self.dir / "credentials.json"

    def _credentials(self) -> dict[str, str]:
        creds = read_json(self._cred_path) or {}
        fresh = {
            "postgres_user": "mrigen",
            "postgres_password": secrets.token_urlsafe(24),
            "s3_access_key": "MRIGEN" + secrets.token_hex(8).upper(),
            "s3_secret_key": secrets.token_urlsafe(30),
            "mlflow_admin_username": "admin",
            "mlflow_admin_password": secrets.token_urlsafe(18),
            "flask_secret_key": secrets.token_hex(32),
        }
        missing = {k: v for k, v in fresh.items() if k not in creds}
        if missing or self._cred_path.stat().st_mode & 0o077:
            creds.update(missing)
            write_private(self._cred_path, json.dumps(creds, indent=2))
        return creds

    def _state(self) -> dict:
        return read_json(self._state_path) or {}

    def _save_state(self, state: dict) -> None:
        self._state_path.write_text(json.dumps(state, indent=2), encoding="utf-8")

    def _records(self, state: dict) -> dict[str, ProcessRecord]:
        return {k: ProcessRecord.from_dict(v) for k, v in state.get("records", {}).items()}

    def _settings(self) -> dict:
        ext = postgres.parse_external(self.config.postgres_url)[0] if self.config.postgres_url else None
        return {"bucket": self.config.bucket, "artifact_prefix": self.config.artifact_prefix,
                "auth": self.config.auth, "workers": self.config.workers,
                "external_postgres": None if ext is None else [ext.host, ext.port, ext.user, ext.admin_db]}  # fmt: skip

    # ---- public API --------------------------------------------------------------------------------------
    def info(self) -> StackInfo:
        """Return how to reach the stack described by DIR (whether or not it runs; see `is_running`)."""
        state, creds = self._state(), read_json(self._cred_path)
        if not state or creds is None:
            raise StackError(f"no stack in {self.dir}: run `python -m mrigen.stack up --dir {self.dir}` first")
        pg = postgres.PgTarget(*state["postgres"])
        pg_password = creds["external_postgres_password"] if state["settings"]["external_postgres"] else creds[
            "postgres_password"]
        return StackInfo(
            directory=self.dir,
            tracking_uri=f"http://127.0.0.1:{state['mlflow_port']}",
            s3_endpoint=f"http://127.0.0.1:{state['s3_ports']['s3']}",
            bucket=state["settings"]["bucket"],
            artifact_prefix=state["settings"]["artifact_prefix"],
            postgres_host=pg.host,
            postgres_port=pg.port,
            auth=state["settings"]["auth"],
            admin_username=creds["mlflow_admin_username"],
            log_dir=self.dir / "logs",
            postgres_url=postgres.db_url(pg, "optuna", pg_password),
            mlflow_db_url=postgres.db_url(pg, "mlflow", pg_password),
            s3_access_key=creds["s3_access_key"],
            s3_secret_key=creds["s3_secret_key"],
            admin_password=creds["mlflow_admin_password"],
        )

    def is_running(self) -> bool:
        """Return True when every server this directory started is alive."""
        state = self._state()
        records = self._records(state)
        needed = [s for s in SERVICES if not (s == "postgres" and state.get("settings", {}).get("external_postgres"))]
        return bool(state) and all(s in records and is_alive(records[s]) for s in needed)

    def status(self) -> list[ServiceStatus]:
        """Return what runs where, one entry per service (nothing secret)."""
        state = self._state()
        records = self._records(state)
        external = bool(state.get("settings", {}).get("external_postgres"))
        addresses = {
            "postgres": f"{state['postgres'][0]}:{state['postgres'][1]}" if state else "",
            "s3": f"http://127.0.0.1:{state['s3_ports']['s3']}" if state else "",
            "mlflow": f"http://127.0.0.1:{state['mlflow_port']}" if state else "",
        }
        out = []
        for name in SERVICES:
            rec = records.get(name)
            if name == "postgres" and external:
                out.append(ServiceStatus(name, "external", addresses[name], None, ""))
            elif rec is not None and is_alive(rec):
                out.append(ServiceStatus(name, "running", addresses[name], rec.pid, rec.log))
            else:
                out.append(ServiceStatus(name, "stopped", addresses[name], None, rec.log if rec else ""))
        return out

    def up(self, progress: bool = False) -> StackInfo:
        """Start the stack, or return the running one's info when it already runs with the same settings.

        Args:
            progress: show a tqdm bar over the three servers.

        Raises:
            StackError: a server failed to start or to become healthy (naming its log file); whatever was
                started by this call is stopped again.
        """
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        creds = self._credentials()
        state = self._state()
        if state and state.get("settings") == self._settings() and self.is_running():
            try:
                self._wait_healthy(self.info(), timeout_s=5.0)
                return self.info()
            except StackError:
                _log.warning("stack in %s runs but is not healthy: restarting it", self.dir)
        self.down()
        t0 = time.monotonic()
        try:
            with (tqdm(total=len(SERVICES), desc="stack up", unit="server", disable=not progress) as bar,
                  logging_redirect_tqdm() if progress else nullcontext()):  # warnings on their own line
                self._start_all(creds, state, bar)
        except BaseException:
            self.down()
            raise
        info = self.info()
        _log.info("stack up in %.1f s: MLflow %s, S3 %s, PostgreSQL %s:%d (dir %s)", time.monotonic() - t0,
                  info.tracking_uri, info.s3_endpoint, info.postgres_host, info.postgres_port, self.dir)  # fmt: skip
        return info

    def down(self) -> list[str]:
        """Stop every server of this directory (reverse order); return the names that needed SIGKILL."""
        state = self._state()
        records = self._records(state)
        killed = []
        for name in reversed(SERVICES):
            rec = records.pop(name, None)
            if rec is None:
                continue
            sig = signal.SIGINT if name == "postgres" else signal.SIGTERM  # SIGINT: PostgreSQL's fast shutdown
            if stop(rec, sig=sig, timeout_s=self.config.stop_timeout_s):
                killed.append(name)
            proc = self._procs.pop(name, None)
            if proc is not None:
                proc.wait(timeout=5.0)  # reap our own child
            (self.dir / "run" / f"{name}.pid").unlink(missing_ok=True)
            if state:
                state["records"] = {k: v.to_dict() for k, v in records.items()}
                self._save_state(state)
        return killed

    def stop_service(self, name: str, *, timeout_s: float | None = None) -> bool:
        """Stop one server of the running stack (e.g. to inject a fault); the others keep running.

        Args:
            name: "postgres", "s3" or "mlflow".
            timeout_s: grace before SIGKILL (default `StackConfig.stop_timeout_s`).

        Returns:
            True when it needed SIGKILL.

        Raises:
            ValueError: unknown service name, or the embedded PostgreSQL when an external one is used.
        """
        self._check_service(name)
        state = self._state()
        records = self._records(state)
        rec = records.pop(name, None)
        if rec is None:
            return False
        sig = signal.SIGINT if name == "postgres" else signal.SIGTERM
        killed = stop(rec, sig=sig, timeout_s=self.config.stop_timeout_s if timeout_s is None else timeout_s)
        proc = self._procs.pop(name, None)
        if proc is not None:
            proc.wait(timeout=5.0)
        (self.dir / "run" / f"{name}.pid").unlink(missing_ok=True)
        state["records"] = {k: v.to_dict() for k, v in records.items()}
        self._save_state(state)
        return killed

    def start_service(self, name: str) -> float:
        """Start one stopped server of the stack again on its recorded ports and wait until it is healthy.

        Returns:
            Seconds it took (start + health wait); 0.0 when it already ran.

        Raises:
            ValueError: unknown service name. StackError: no stack in DIR, or the server did not become healthy.
        """
        self._check_service(name)
        state = self._state()
        if not state:
            raise StackError(f"no stack in {self.dir}: run `python -m mrigen.stack up --dir {self.dir}` first")
        rec = self._records(state).get(name)
        if rec is not None and is_alive(rec):
            return 0.0
        t0 = time.monotonic()
        self._start_service(name, state, self._credentials())
        return time.monotonic() - t0

    def restart(self, name: str, *, timeout_s: float | None = None) -> float:
        """`stop_service(name)` then `start_service(name)`; returns the seconds the service was down."""
        t0 = time.monotonic()
        self.stop_service(name, timeout_s=timeout_s)
        self.start_service(name)
        return time.monotonic() - t0

    def _check_service(self, name: str) -> None:
        if name not in SERVICES:
            raise ValueError(f"service={name!r} is invalid: use one of {list(SERVICES)}")
        if name == "postgres" and self.config.postgres_url:
            raise ValueError("service='postgres' is external (postgres_url): the stack does not manage it")

    # ---- start -------------------------------------------------------------------------------------------
    def _ports(self, old: dict) -> tuple[int, dict[str, int], int]:
        """Reuse last run's ports when still free (SeaweedFS keeps per-port master state), else new ones."""
        fresh = iter(free_ports(2 + len(s3.PORT_NAMES)))
        pg_port, mlflow_port = next(fresh), next(fresh)
        s3_ports = {n: next(fresh) for n in s3.PORT_NAMES}
        old_s3 = old.get("s3_ports", {})
        if set(old_s3) == set(s3.PORT_NAMES) and all(port_is_free(p) for p in old_s3.values()):
            s3_ports = dict(old_s3)
        if old.get("postgres") and not old.get("settings", {}).get("external_postgres"):
            pg_port = old["postgres"][1] if port_is_free(old["postgres"][1]) else pg_port
        if old.get("mlflow_port") and port_is_free(old["mlflow_port"]):
            mlflow_port = old["mlflow_port"]
        taken = {pg_port, mlflow_port, *s3_ports.values()}
        if len(taken) != 2 + len(s3_ports):  # an old port collided with a fresh one: take all fresh
            fresh = iter(free_ports(2 + len(s3.PORT_NAMES)))
            pg_port, mlflow_port = next(fresh), next(fresh)
            s3_ports = {n: next(fresh) for n in s3.PORT_NAMES}
        return pg_port, s3_ports, mlflow_port

    def _record(self, state: dict, name: str, proc: subprocess.Popen, rec: ProcessRecord) -> None:
        self._procs[name] = proc
        state.setdefault("records", {})[name] = rec.to_dict()
        self._save_state(state)

    def _start_all(self, creds: dict, old: dict, bar: tqdm) -> None:
        cfg = self.config
        pg_port, s3_ports, mlflow_port = self._ports(old)
        if cfg.postgres_url:
            target, pg_password = postgres.parse_external(cfg.postgres_url)
            if creds.get("external_postgres_password") != pg_password:
                creds["external_postgres_password"] = pg_password
                write_private(self._cred_path, json.dumps(creds, indent=2))
        else:
            target = postgres.PgTarget("127.0.0.1", pg_port, creds["postgres_user"])
        state = {"settings": self._settings(), "postgres": [target.host, target.port, target.user, target.admin_db],
                 "s3_ports": s3_ports, "mlflow_port": mlflow_port, "records": {}}  # fmt: skip
        self._save_state(state)
        for name in SERVICES:
            self._start_service(name, state, creds)
            bar.update()

    def _start_service(self, name: str, state: dict, creds: dict) -> None:
        """Start one server on the ports recorded in `state` and wait until it is healthy."""
        cfg, d = self.config, self.dir
        logs, run, timeout = d / "logs", d / "run", cfg.start_timeout_s
        target = postgres.PgTarget(*state["postgres"])
        pg_password = creds["external_postgres_password"] if cfg.postgres_url else creds["postgres_password"]
        endpoint = f"http://127.0.0.1:{state['s3_ports']['s3']}"
        keys = (creds["s3_access_key"], creds["s3_secret_key"])
        if name == "postgres":
            pg_proc = pg_rec = None
            if not cfg.postgres_url:
                owner = postgres.run_as()
                postgres.init_cluster(d / "postgres" / "data", user=target.user, password=pg_password, owner=owner)
                pg_proc, pg_rec = postgres.start_server(d / "postgres" / "data", target.port,
                                                        log=logs / "postgres.log", pid_file=run / "postgres.pid",
                                                        owner=owner)  # fmt: skip
                self._record(state, "postgres", pg_proc, pg_rec)
            wait_ready(f"PostgreSQL on {target.host}:{target.port}", lambda: postgres.probe(target, pg_password),
                       proc=pg_proc, record=pg_rec, timeout_s=timeout)  # fmt: skip
            postgres.ensure_databases(target, pg_password)
        elif name == "s3":
            identity = d / "s3" / "s3.json"
            s3.write_identity(identity, *keys)
            proc, rec = s3.start_server(d / "s3" / "data", state["s3_ports"], identity, log=logs / "s3.log",
                                        pid_file=run / "s3.pid")  # fmt: skip
            self._record(state, "s3", proc, rec)
            wait_ready(f"SeaweedFS S3 on {endpoint}", lambda: s3.probe(endpoint, *keys), proc=proc, record=rec,
                       timeout_s=timeout)  # fmt: skip
            s3.ensure_bucket(endpoint, *keys, cfg.bucket)
        else:
            (d / "mlflow").mkdir(exist_ok=True)
            port = state["mlflow_port"]
            env = mlflow_server.server_env(
                backend_uri=postgres.db_url(target, "mlflow"), db_password=pg_password,
                auth_db_uri=postgres.db_url(target, "mlflow_auth"),
                artifacts_destination=f"s3://{cfg.bucket}/{cfg.artifact_prefix}", s3_endpoint=endpoint,
                s3_access_key=keys[0], s3_secret_key=keys[1], port=port, workers=cfg.workers, auth=cfg.auth,
                admin_username=creds["mlflow_admin_username"], admin_password=creds["mlflow_admin_password"],
                flask_secret=creds["flask_secret_key"], auth_config_dir=d / "mlflow",
            )  # fmt: skip
            proc, rec = mlflow_server.start_server(env, log=logs / "mlflow.log", pid_file=run / "mlflow.pid",
                                                   cwd=d / "mlflow")  # fmt: skip
            self._record(state, "mlflow", proc, rec)
            self._wait_healthy(self.info(), timeout_s=timeout, proc=proc, record=rec)

    def _wait_healthy(self, info: StackInfo, timeout_s: float, proc=None, record=None) -> None:
        user, password = (info.admin_username, info.admin_password) if info.auth else (None, None)
        if record is None:
            record = self._records(self._state()).get("mlflow")
        wait_ready(f"MLflow server on {info.tracking_uri}",
                   lambda: mlflow_server.probe(info.tracking_uri, user, password),
                   proc=proc, record=record, timeout_s=timeout_s)  # fmt: skip
