"""A stack of its own with basic auth: up, idempotent up, 401 without credentials, down leaves no process."""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mrigen.stack import Stack, StackConfig
from mrigen.stack.__main__ import main as cli_main
from mrigen.stack.procs import ProcessRecord, is_alive

pytestmark = [pytest.mark.servers, pytest.mark.slow]


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _processes_under(directory: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(directory) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@pytest.fixture
def stack_dir() -> Iterator[Path]:
    """A fresh directory outside pytest's basetemp (see the `stack` fixture in tests/conftest.py for why)."""
    directory = Path(tempfile.mkdtemp(prefix="mrigen-authstack-"))
    yield directory
    shutil.rmtree(directory)


def test_auth_stack_lifecycle(stack_dir: Path, capsys: pytest.CaptureFixture) -> None:
    directory = stack_dir
    stack = Stack(StackConfig(directory=directory, auth=True))
    try:
        info = stack.up()
        records = json.loads((directory / "stack.json").read_text())["records"]
        assert set(records) == {"postgres", "s3", "mlflow"}
        for name, rec in records.items():
            assert (directory / "run" / f"{name}.pid").read_text().strip() == str(rec["pid"])

        again = stack.up()  # already running: same servers, nothing restarted
        assert again.tracking_uri == info.tracking_uri
        assert json.loads((directory / "stack.json").read_text())["records"] == records

        api = f"{info.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(api) == 401
        assert _status(api, (info.admin_username, "wrong-password")) == 401
        assert _status(api, (info.admin_username, info.admin_password)) == 200
        assert info.client_env()["MLFLOW_TRACKING_PASSWORD"] == info.admin_password

        for log in info.log_dir.glob("*.log"):
            assert info.admin_password not in log.read_text(errors="replace"), log
    finally:
        stack.down()
    assert _processes_under(directory) == []
    for rec in records.values():
        assert not is_alive(ProcessRecord.from_dict(rec))
    assert not list((directory / "run").glob("*.pid"))
    assert [r.state for r in stack.status()] == ["stopped"] * 3
    assert cli_main(["status", "--dir", str(directory)]) == 1
    assert "stopped" in capsys.readouterr().out
