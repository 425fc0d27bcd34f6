"""Fast tests of the stack's settings, the MLflow entrypoint's validation and the process helpers (no servers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mrigen.stack import StackConfig, StackError, StackInfo
from mrigen.stack.__main__ import main as cli_main
from mrigen.stack.mlflow_entry import ConfigError, build_server
from mrigen.stack.procs import free_ports, is_alive, spawn, stop, wait_ready, write_private

SECRET_DB = "db-Secret-123"
SECRET_KEY = "s3-Secret-456"
SECRET_ADMIN = "admin-Secret-789"


def _entry_env(**extra: str) -> dict[str, str]:
    env = {
        "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg://mrigen@127.0.0.1:5432/mlflow",
        "PGPASSWORD": SECRET_DB,
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow/artifacts",
        "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:8333",
        "AWS_ACCESS_KEY_ID": "AKID",
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "MLFLOW_PORT": "5123",
    }
    env.update(extra)
    return env


@pytest.mark.parametrize(
    ("field", "value"),
    [("bucket", "Bad_Bucket"), ("bucket", "ab"), ("artifact_prefix", "/abs"), ("artifact_prefix", "a//b"),
     ("workers", 0), ("start_timeout_s", 0), ("stop_timeout_s", -1.0), ("postgres_url", "mysql://u:p@h/db"),
     ("postgres_url", "postgresql://user@host/db")],
)  # fmt: skip
def test_stack_config_rejects_invalid_field(tmp_path: Path, field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        StackConfig(directory=tmp_path, **{field: value})


def test_postgres_url_error_does_not_echo_password(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        StackConfig(directory=tmp_path, postgres_url=f"mysql://u:{SECRET_DB}@h/db")
    assert SECRET_DB not in str(err.value)


def test_stack_info_repr_hides_secrets(tmp_path: Path) -> None:
    info = StackInfo(directory=tmp_path, tracking_uri="http://127.0.0.1:1", s3_endpoint="http://127.0.0.1:2",
                     bucket="mlflow", artifact_prefix="artifacts", postgres_host="127.0.0.1", postgres_port=3,
                     auth=True, admin_username="admin", log_dir=tmp_path,
                     postgres_url=f"postgresql+psycopg://u:{SECRET_DB}@h:3/optuna",
                     mlflow_db_url=f"postgresql+psycopg://u:{SECRET_DB}@h:3/mlflow", s3_access_key="AKID",
                     s3_secret_key=SECRET_KEY, admin_password=SECRET_ADMIN)  # fmt: skip
    text = repr(info) + str(info)
    for secret in (SECRET_DB, SECRET_KEY, SECRET_ADMIN, "AKID"):
        assert secret not in text
    assert info.client_env()["MLFLOW_TRACKING_PASSWORD"] == SECRET_ADMIN
    assert info.client_env()["OPTUNA_STORAGE"].endswith("/optuna")


def test_entry_builds_server_without_secrets_on_command_line() -> None:
    argv, env, ini = build_server(_entry_env())
    joined = " ".join(argv)
    assert SECRET_DB not in joined and SECRET_KEY not in joined
    assert argv[0] == "server" and "--serve-artifacts" in argv
    assert argv[argv.index("--allowed-hosts") + 1] == "localhost:5123,127.0.0.1:5123"
    assert argv[argv.index("--artifacts-destination") + 1] == "s3://mlflow/artifacts"
    assert "--app-name" not in argv and ini is None
    regex = env["MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX"]
    assert regex.startswith("^(models:/") and "s3://mlflow/" in regex
    assert env["PGPASSWORD"] == SECRET_DB  # secrets travel in the server's environment only


def test_entry_basic_auth_config_holds_no_password() -> None:
    argv, env, ini = build_server(
        _entry_env(MLFLOW_AUTH="basic", MLFLOW_AUTH_ADMIN_PASSWORD=SECRET_ADMIN, MLFLOW_FLASK_SERVER_SECRET_KEY="k")
    )
    assert argv[argv.index("--app-name") + 1] == "basic-auth"
    assert ini is not None and "database_uri = postgresql+psycopg://mrigen@127.0.0.1:5432/mlflow_auth" in ini
    assert SECRET_ADMIN not in ini and SECRET_DB not in ini
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == "admin"


@pytest.mark.parametrize(
    ("change", "needle"),
    [({"PGPASSWORD": ""}, "PGPASSWORD"),
     ({"MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg://u:{SECRET_DB}@h/db"}, "must not contain a password"),
     ({"MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db"}, "MLFLOW_BACKEND_STORE_URI"),
     ({"AWS_SECRET_ACCESS_KEY": ""}, "AWS_SECRET_ACCESS_KEY"),
     ({"MLFLOW_ARTIFACTS_DESTINATION": "/tmp/artifacts"}, "MLFLOW_ARTIFACTS_DESTINATION"),
     ({"MLFLOW_AUTH": "yes"}, "MLFLOW_AUTH"),
     ({"MLFLOW_PORT": "http"}, "MLFLOW_PORT"),
     ({"MLFLOW_WORKERS": "0"}, "MLFLOW_WORKERS"),
     ({"MLFLOW_AUTH": "basic", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"}, "MLFLOW_AUTH_ADMIN_PASSWORD"),
     ({"MLFLOW_AUTH": "basic", "MLFLOW_AUTH_ADMIN_PASSWORD": "p"}, "MLFLOW_FLASK_SERVER_SECRET_KEY")],
)  # fmt: skip
def test_entry_refuses_missing_or_unsafe_settings(change: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as err:
        build_server(_entry_env(**change))
    assert SECRET_DB not in str(err.value)


def test_entry_process_refuses_auth_without_admin_password() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(_entry_env(MLFLOW_AUTH="basic", MLFLOW_FLASK_SERVER_SECRET_KEY="k"))
    result = subprocess.run([sys.executable, "-m", "mrigen.stack.mlflow_entry"], env=env, capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "MLFLOW_AUTH_ADMIN_PASSWORD is not set" in lines[0], result.stderr
    assert SECRET_DB not in result.stderr and SECRET_KEY not in result.stderr


def test_free_ports_are_distinct() -> None:
    ports = free_ports(12)
    assert len(set(ports)) == 12 and all(0 < p < 65536 for p in ports)


def test_write_private_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, "{}")
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text() == "{}"


_TREE = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
_STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
             "time.sleep(60)")  # fmt: skip


def test_stop_ends_process_tree(tmp_path: Path) -> None:
    proc, rec = spawn("tree", [sys.executable, "-c", _TREE], log=tmp_path / "t.log", pid_file=tmp_path / "t.pid")
    import psutil

    deadline = time.monotonic() + 20
    while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children and is_alive(rec)
    assert (tmp_path / "t.pid").read_text().strip() == str(proc.pid)
    assert stop(rec, timeout_s=10) is False
    proc.wait(timeout=5)
    assert not is_alive(rec)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


def test_stop_kills_process_that_ignores_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "s.log"
    proc, rec = spawn("stubborn", [sys.executable, "-c", _STUBBORN], log=log, pid_file=tmp_path / "s.pid")
    wait_ready("stubborn", lambda: "ready" in log.read_text(), proc=proc, record=rec, timeout_s=20)
    assert stop(rec, sig=signal.SIGTERM, timeout_s=0.5) is True  # True: SIGKILL was needed
    proc.wait(timeout=5)
    assert not is_alive(rec)


def test_wait_ready_names_log_when_server_exits(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    proc, rec = spawn("x", [sys.executable, "-c", "raise SystemExit(3)"], log=log, pid_file=tmp_path / "x.pid")
    with pytest.raises(StackError, match=r"exited with code 3 .*x\.log"):
        wait_ready("server x", lambda: False, proc=proc, record=rec, timeout_s=30)


def test_wait_ready_times_out_with_log_path(tmp_path: Path) -> None:
    log = tmp_path / "y.log"
    proc, rec = spawn("y", [sys.executable, "-c", "import time; time.sleep(30)"], log=log, pid_file=tmp_path / "y.pid")
    try:
        with pytest.raises(StackError, match=r"not ready after 0 s.*y\.log"):
            wait_ready("server y", lambda: False, proc=proc, record=rec, timeout_s=0.3)
    finally:
        stop(rec, timeout_s=5)
        proc.wait(timeout=5)


def test_cli_status_without_stack(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["status", "--dir", str(tmp_path / "none")]) == 1
    assert "no stack" in capsys.readouterr().out


def test_cli_rejects_bad_bucket(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["up", "--dir", str(tmp_path), "--bucket", "NO"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bucket" in err[0]


def test_cli_help() -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0


class _FakeItem:
    """Just enough of a pytest item for the collection hook."""

    def __init__(self, fixturenames: tuple[str, ...], markers: tuple[str, ...], path: str = "test_a.py") -> None:
        self.fixturenames, self.path = fixturenames, Path(path)
        self.markers = [getattr(pytest.mark, m) for m in markers]

    def get_closest_marker(self, name: str):
        return next((m for m in self.markers if m.name == name), None)

    def add_marker(self, marker) -> None:
        self.markers.append(getattr(marker, "mark", marker))


def test_collection_hook_marks_servers_and_skips_gpu_without_cuda(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    conftest = Path(__file__).resolve().parents[1] / "conftest.py"
    plugin = next(p for p in request.config.pluginmanager.get_plugins()
                  if getattr(p, "__file__", None) and Path(p.__file__).resolve() == conftest)  # fmt: skip
    pytest_collection_modifyitems = plugin.pytest_collection_modifyitems

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    uses_stack, gpu, plain = _FakeItem(("stack",), ()), _FakeItem((), ("gpu",)), _FakeItem(("tmp_path",), ())
    pytest_collection_modifyitems(None, [uses_stack, gpu, plain])
    assert uses_stack.get_closest_marker("servers") is not None
    assert gpu.get_closest_marker("skip") is not None
    assert plain.get_closest_marker("skip") is None and plain.get_closest_marker("servers") is None


def test_collection_hook_puts_files_with_long_tests_first_and_keeps_files_whole(request: pytest.FixtureRequest) -> None:
    conftest = Path(__file__).resolve().parents[1] / "conftest.py"
    plugin = next(p for p in request.config.pluginmanager.get_plugins()
                  if getattr(p, "__file__", None) and Path(p.__file__).resolve() == conftest)  # fmt: skip
    a1, a2 = _FakeItem((), (), "test_a.py"), _FakeItem((), (), "test_a.py")
    b1, b2 = _FakeItem((), (), "test_b.py"), _FakeItem((), ("slow",), "test_b.py")
    c1, d1 = _FakeItem((), ("reliability",), "test_c.py"), _FakeItem((), (), "test_d.py")
    items = [a1, b1, a2, b2, c1, d1]
    plugin.pytest_collection_modifyitems(None, items)
    assert items == [b1, b2, c1, a1, a2, d1]  # a file with one slow test moves whole; the rest keep their order


def _conftest_plugin(request: pytest.FixtureRequest):
    conftest = Path(__file__).resolve().parents[1] / "conftest.py"
    return next(p for p in request.config.pluginmanager.get_plugins()
                if getattr(p, "__file__", None) and Path(p.__file__).resolve() == conftest)  # fmt: skip


def test_only_the_xdist_controller_passes_sigterm_on_to_its_workers(request: pytest.FixtureRequest) -> None:
    import types

    plugin = _conftest_plugin(request)
    before = signal.getsignal(signal.SIGTERM)
    try:
        for numprocesses, worker, installed in ((2, False, True), (2, True, False), (0, False, False)):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            config = types.SimpleNamespace(option=types.SimpleNamespace(numprocesses=numprocesses))
            if worker:
                config.workerinput = {}
            plugin.pytest_configure(config)
            handler = signal.getsignal(signal.SIGTERM)
            assert (handler is plugin._stop_workers_then_interrupt) is installed, (numprocesses, worker)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_stop_processes_waits_for_what_each_process_started_and_names_what_still_runs(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Two "workers", each with a "server" child: one stops its server on SIGTERM (after 0.5 s) and leaves an exited
    child unreaped, the other ignores SIGTERM. stop_processes returns once the first server is gone, naming the
    second one's server as running (not the zombie)."""
    import psutil

    done = tmp_path / "torn-down"
    server = "import time; time.sleep(60)"
    tears_down = ("import signal, subprocess, sys, time\n"
                  f"server = subprocess.Popen([sys.executable, '-c', {server!r}])\n"
                  "exited = subprocess.Popen([sys.executable, '-c', 'pass'])\n"      # never reaped: a zombie
                  "time.sleep(0.5)\n"
                  "def stop(*_):\n"
                  "    time.sleep(0.5); server.terminate(); server.wait(); open(sys.argv[1], 'w').write('done')\n"
                  "signal.signal(signal.SIGTERM, stop); print('ready', flush=True)\n"
                  "while True: time.sleep(0.1)\n")
    stubborn = ("import signal, subprocess, sys, time\n"
                f"server = subprocess.Popen([sys.executable, '-c', {server!r}])\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True)\n"
                "time.sleep(60)\n")
    workers = [subprocess.Popen([sys.executable, "-c", code, str(done)], stdout=subprocess.PIPE, text=True)
               for code in (tears_down, stubborn)]
    servers: list[psutil.Process] = []
    try:
        for worker in workers:
            assert worker.stdout.readline().strip() == "ready"
        servers = [psutil.Process(w.pid).children()[0] for w in workers]     # each one's first child
        still = _conftest_plugin(request).stop_processes([psutil.Process(w.pid) for w in workers], timeout_s=3)
        assert [p.pid for p in still] == [servers[1].pid]        # the stubborn worker's server
        assert done.read_text() == "done" and not servers[0].is_running()
        assert workers[0].poll() is None                          # the worker itself is left to xdist
    finally:
        for proc in workers:
            proc.kill()
            proc.wait()
        for proc in servers:
            if proc.is_running():
                proc.kill()
