"""Client helpers: URI precedence, redaction, fail-fast errors, the experiment-creation race, the log worker."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from mrigen.tracking import (MlflowHook, TrackingError, check_tracking_uri, get_or_create_experiment, git_commit,
                             make_client, redact, resolve_tracking_uri, ui_runs_url)
from mrigen.tracking.worker import MAX_METRICS_PER_BATCH, LogWorker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redact_strips_userinfo_query_secrets_and_env_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SuperSecretKey123")
    text = ("postgresql+psycopg://mlflow:hunter2@127.0.0.1:5432/db http://admin:pw@host:5000/ "
            "s3://b?secret_key=abc&x=1 key=SuperSecretKey123")
    out = redact(text)
    for secret in ("hunter2", "admin:pw", "abc", "SuperSecretKey123"):
        assert secret not in out
    assert "postgresql+psycopg://***@127.0.0.1:5432/db" in out and "http://***@host:5000/" in out


def test_tracking_uri_precedence(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri("http://arg:5000") == "http://arg:5000"
    assert resolve_tracking_uri(None) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(TrackingError, match="mrigen-work/mlflow.db"):   # a reader gets no empty store made for it
        resolve_tracking_uri(None, read_only=True)
    uri = resolve_tracking_uri(None)                                  # the store `mrigen.tune` writes by default
    assert uri == f"sqlite:///{tmp_path / 'mrigen-work' / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in capsys.readouterr().out


def test_server_down_is_one_clear_line_without_password():
    uri = f"http://alice:s3cr3tpw@127.0.0.1:{_free_port()}"
    with pytest.raises(TrackingError) as err:
        make_client(uri)
    msg = str(err.value)
    assert "cannot reach the MLflow tracking server" in msg and "\n" not in msg
    assert "s3cr3tpw" not in msg and "alice" not in msg


@pytest.mark.parametrize("uri, expected", [("nonsense", "is not a URI"), ("gopher://x/y", "unsupported scheme")])
def test_bad_uri_is_rejected(uri, expected):
    with pytest.raises(TrackingError, match=expected):
        check_tracking_uri(uri)


class _RacingClient:
    """Lost the creation race: the name is absent on the first read, creation fails, the re-read finds it."""

    def __init__(self, error_code: int = databricks_pb2.RESOURCE_ALREADY_EXISTS):
        self.reads, self.error_code = 0, error_code

    def get_experiment_by_name(self, name):
        self.reads += 1
        if self.reads == 1:
            return None
        return type("E", (), {"experiment_id": "7", "lifecycle_stage": "active",
                              "tags": {"mlflow.experimentKind": "custom_model_development"}})()

    tracking_uri = "http://test"

    def create_experiment(self, name, artifact_location=None, tags=None):
        raise MlflowException("exists", error_code=self.error_code)


def test_experiment_creation_race_rereads_the_winner():
    client = _RacingClient()
    assert get_or_create_experiment(client, "exp") == "7"
    assert client.reads == 2


def test_experiment_creation_other_errors_propagate():
    with pytest.raises(MlflowException):
        get_or_create_experiment(_RacingClient(databricks_pb2.PERMISSION_DENIED), "exp")


def test_experiments_are_tagged_as_model_training_so_the_ui_opens_on_the_runs(tracking_env):
    """MLflow 3's UI opens an experiment without `mlflow.experimentKind` on its GenAI overview; ours are tagged
    when created, and an existing untagged one (made by an older mrigen) is tagged on first use."""
    client, _ = make_client()
    new = get_or_create_experiment(client, "kind-new")
    assert client.get_experiment(new).tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("kind-old")
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert get_or_create_experiment(client, "kind-old") == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_ui_runs_url_opens_the_runs_page_without_credentials():
    """MLflow 3.17's UI needs `workflowType=machine_learning` in the URL to open an experiment on its runs (the
    browser test checks that it does); a local store is shown by `mlflow ui` at its default address."""
    assert (ui_runs_url("http://bob:s3cret@tracking.example:5000/", "7")
            == "http://tracking.example:5000/#/experiments/7/runs?workflowType=machine_learning")
    assert ui_runs_url("sqlite:////w/mlflow.db", "1").startswith("http://127.0.0.1:5000/#/experiments/1/runs?")


def test_deleted_experiment_is_a_clear_error(tracking_env):
    client, _ = make_client()
    exp = get_or_create_experiment(client, "to-delete")
    client.delete_experiment(exp)
    with pytest.raises(TrackingError, match="is deleted"):
        get_or_create_experiment(client, "to-delete")


def test_git_commit_outside_a_checkout_is_none(tmp_path):
    assert git_commit(tmp_path) is None


@pytest.mark.parametrize("kwargs, field", [({"experiment": ""}, "experiment"), ({"image_every": 0}, "image_every"),
                                           ({"flush_interval_s": 0}, "flush_interval_s")])
def test_hook_rejects_invalid_settings(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MlflowHook(**kwargs)


class _RecordingClient:
    def __init__(self, fail: bool = False):
        self.batches, self.images, self.threads, self.fail = [], [], set(), fail

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        self.threads.add(threading.get_ident())
        if self.fail:
            raise MlflowException("API request failed: http://u:topsecret@host/ returned 503")
        self.batches.append(list(metrics))

    def log_image(self, run_id, image, key=None, step=None, synchronous=None):
        self.threads.add(threading.get_ident())
        self.images.append((key, step, image.shape))


def test_worker_batches_off_the_training_thread_in_order():
    client = _RecordingClient()
    worker = LogWorker(client, "run", interval_s=0.5)
    for step in range(30):
        worker.log_metrics({"loss": float(step), "ok": np.float32(1.0), "skip": "text"}, step=step)
    worker.log_image(np.zeros((4, 6), np.uint8), key="samples", step=3)
    worker.close()
    sent = [m for batch in client.batches for m in batch]
    assert [m.step for m in sent if m.key == "loss"] == list(range(30))
    assert {m.key for m in sent} == {"loss", "ok"}
    assert len(client.batches) < 30 and all(len(b) <= MAX_METRICS_PER_BATCH for b in client.batches)
    assert client.images == [("samples", 3, (4, 6))]
    assert threading.get_ident() not in client.threads


def test_worker_errors_are_raised_not_swallowed_and_redacted():
    worker = LogWorker(_RecordingClient(fail=True), "run", interval_s=0.01)
    worker.log_metrics({"loss": 1.0}, step=0)
    with pytest.raises(TrackingError) as err:
        worker.flush()
    assert "503" in str(err.value) and "topsecret" not in str(err.value)
    worker.close()


def test_bad_credentials_and_non_mlflow_server_are_one_line(monkeypatch):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            self.send_response(401 if "Authorization" in self.headers else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-123")
        with pytest.raises(TrackingError, match="refused the credentials") as err:
            check_tracking_uri(uri)
        assert "wrong-password-123" not in str(err.value)
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        with pytest.raises(TrackingError, match="does not answer like an MLflow tracking server"):
            check_tracking_uri(uri)
    finally:
        server.shutdown()
