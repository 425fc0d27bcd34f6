"""Reliability scenarios 2-4: servers of the stack stopped or restarted while mrigen uses them.

2. PostgreSQL restarted (fast shutdown + start, twice) while a `python -m mrigen.tune` study runs in a subprocess:
   the worker survives, the study reaches its trial count, no MLflow run is left RUNNING.
3. The MLflow server stopped for ~30 s in the middle of a training run, then started again: training goes on,
   the metrics of the outage window arrive after recovery, the run ends FINISHED with its model registered.
4. The S3 server stopped during the model upload: (a) restarted a few seconds later -- the upload is retried and
   the registered model verifies; (b) left down past the hook's retry budget -- the run is FAILED, the model is
   kept on disk, and `register` refuses the FAILED model; (c) a READY model whose weights object vanished from
   the bucket is refused by `register` (sha256 check).

The scenarios restart servers, so they run on a private stack (not the session one). MLflow's own HTTP retries
are turned down in this process (`MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`) so that mrigen's retry layer is what
rides out the outages. Counts go to ``tests/reliability/.results/servers-<scenario>.json`` (docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mrigen.train import Hook

# Deadlines only bound a hang: generous, so that a machine kept busy by other work still passes.
pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1800)]

RESULTS = Path(__file__).parent / ".results"
_CLIENT_ENV_DROP = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                    "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")
TINY_STUDY = """
description: tiny VAE study (reliability)
family: vae
base:
  model: {blocks: 3}
  train: {batch_size: 16, grid_every: 1}
search_space:
  train.lr: {type: float, low: 5.0e-4, high: 3.0e-3, log: true}
objective: {metric: val_ssim, direction: maximize}
pruner: {type: none}
demo_budget: {trials: 3, epochs: 4, image_size: 32}
"""


def _write_result(scenario: str, counts: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"servers-{scenario}.json").write_text(json.dumps(counts, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def own_stack():
    """A private stack (its servers get stopped and restarted); yields (Stack, StackInfo)."""
    from mrigen.stack import Stack, StackConfig

    saved = {k: os.environ.get(k) for k in (*_CLIENT_ENV_DROP, "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                            "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    for k in _CLIENT_ENV_DROP:
        os.environ.pop(k, None)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"     # mrigen's retries, not MLflow's, ride out outages
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "15"
    directory = Path(tempfile.mkdtemp(prefix="mrigen-rel-stack-"))
    stack = Stack(StackConfig(directory=directory, stop_timeout_s=10.0))
    try:
        yield stack, stack.up()
    finally:
        stack.down()
        shutil.rmtree(directory, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mrigen.data import build_demo_store

    return build_demo_store(tmp_path_factory.mktemp("rel-store"), subjects=6, size=32, seed=0)


@pytest.fixture
def healthy(own_stack):
    """Every server of the private stack runs before and after the test."""
    stack, info = own_stack
    for name in ("postgres", "s3", "mlflow"):
        stack.start_service(name)
    yield stack, info
    for name in ("postgres", "s3", "mlflow"):
        stack.start_service(name)


def _cfgs(epochs: int, grid_every: int = 1):
    from mrigen.models import ModelConfig
    from mrigen.train import TrainConfig

    return (ModelConfig(family="vae", image_size=32, blocks=3, latent_dim=16),
            TrainConfig(epochs=epochs, batch_size=16, final_eval=False, grid_every=grid_every, grid_n=4, device="cpu"))


def _metric_points(client, run_id: str, keys) -> dict[str, int]:
    return {k: len(client.get_metric_history(run_id, k)) for k in keys}


# ---- scenario 3: MLflow server down ~30 s mid-run --------------------------------------------------------------
class _MlflowOutage(Hook):
    """Stops the MLflow server after epoch `at`, keeps each later epoch ~`epoch_s` long, starts it again after
    `down_s` seconds (in a thread: training goes on while it starts)."""

    def __init__(self, stack, at: int, down_s: float, epoch_s: float) -> None:
        self.stack, self.at, self.down_s, self.epoch_s = stack, at, down_s, epoch_s
        self.t_down = self.t_up = None
        self.epochs_during_outage = 0
        self._starter: threading.Thread | None = None

    def on_epoch_end(self, ctx, epoch, metrics) -> None:
        if epoch == self.at:
            self.stack.stop_service("mlflow", timeout_s=10.0)
            self.t_down = time.monotonic()
        if self.t_down is None:
            return
        if self.t_up is None:
            self.epochs_during_outage += 1
        time.sleep(self.epoch_s)
        if self._starter is None and time.monotonic() - self.t_down >= self.down_s:
            def start():
                self.stack.start_service("mlflow")
                self.t_up = time.monotonic()

            self._starter = threading.Thread(target=start, daemon=True)
            self._starter.start()

    def join(self) -> None:
        if self._starter is not None:
            self._starter.join(timeout=120)


@pytest.mark.servers
def test_mlflow_server_outage_mid_run(healthy, store, tmp_path):
    from mlflow import MlflowClient

    from mrigen.registry import register
    from mrigen.tracking import MlflowHook
    from mrigen.train import train

    stack, info = healthy
    epochs = 30
    model_cfg, train_cfg = _cfgs(epochs, grid_every=4)
    hook = MlflowHook(tracking_uri=info.tracking_uri, experiment="rel-mlflow-outage", flush_interval_s=0.5)
    outage = _MlflowOutage(stack, at=2, down_s=18.0, epoch_s=1.0)
    result = train(model_cfg, train_cfg, store, out_dir=tmp_path / "out", hooks=[hook, outage], progress=False,
                   checkpoints=False)
    outage.join()
    client = MlflowClient(info.tracking_uri)
    run = client.get_run(hook.run_id)
    keys = ["train_loss", "val_ssim", "epoch_seconds"]
    points = _metric_points(client, hook.run_id, keys)
    version = register(hook.run_id, "rel-outage", metric="val_ssim", value=result.history[-1]["val_ssim"],
                       greater_is_better=True, tracking_uri=info.tracking_uri)
    stats = hook.log_stats
    counts = {"scenario": 3, "injected": "MLflow server stopped mid-run, started again", "times": 1,
              "outage_s": round((outage.t_up or time.monotonic()) - outage.t_down, 1),
              "epochs": epochs, "epochs_trained_during_outage": outage.epochs_during_outage,
              "metric_points_expected": epochs * len(keys), "metric_points_found": sum(points.values()),
              "metrics_lost": epochs * len(keys) - sum(points.values()), "client_retries": stats["retries"],
              "run_status": run.info.status, "runs_left_running": int(run.info.status == "RUNNING"),
              "model_registered_version": version, "corrupt_models_registered": 0}
    _write_result("mlflow-outage", counts)
    assert outage.t_down is not None and outage.epochs_during_outage >= 10     # training went on during the outage
    assert stats["retries"] > 0 and stats["metrics_dropped"] == 0
    assert points == {k: epochs for k in keys}, points                        # nothing lost, nothing doubled
    assert run.info.status == "FINISHED" and hook.model_uri
    assert result.model_dir is not None and (result.model_dir / "model.safetensors").is_file()


# ---- scenario 4: S3 down during the model upload ----------------------------------------------------------------
class _S3Cut:
    """Patches the artifact upload so that S3 is stopped right before the `after`-th file of the model upload;
    optionally started again `restart_after_s` later (in a thread)."""

    def __init__(self, stack, monkeypatch, after: int = 3, restart_after_s: float | None = None) -> None:
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

        self.stack, self.after, self.restart_after_s = stack, after, restart_after_s
        self.calls, self.cut, self._thread = 0, False, None
        original = HttpArtifactRepository.log_artifact

        def log_artifact(repo, local_file, artifact_path=None):
            if "/models/" in repo.artifact_uri or "logged_models" in repo.artifact_uri:
                self.calls += 1
                if self.calls == self.after and not self.cut:
                    self.cut = True
                    self.stack.stop_service("s3", timeout_s=3.0)
                    if self.restart_after_s is not None:
                        self._thread = threading.Thread(target=self._restart, daemon=True)
                        self._thread.start()
            return original(repo, local_file, artifact_path)

        monkeypatch.setattr(HttpArtifactRepository, "log_artifact", log_artifact)

    def _restart(self) -> None:
        time.sleep(self.restart_after_s)
        self.stack.start_service("s3")

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=120)


def _logged_models(client, run_id: str) -> list:
    run = client.get_run(run_id)
    return [m for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])
            if m.source_run_id == run_id]


@pytest.mark.servers
def test_s3_down_during_model_upload(healthy, store, tmp_path, monkeypatch):
    import boto3
    from mlflow import MlflowClient

    from mrigen.registry import RegistryError, register
    from mrigen.tracking import MlflowHook, TrackingError
    from mrigen.train import train

    stack, info = healthy
    client = MlflowClient(info.tracking_uri)
    model_cfg, train_cfg = _cfgs(2)
    counts = {"scenario": 4, "injected": "S3 server stopped during the model upload", "times": 3}

    # (a) S3 back after ~4 s: the hook retries the upload; the registered model verifies.
    cut = _S3Cut(stack, monkeypatch, after=3, restart_after_s=4.0)
    hook = MlflowHook(tracking_uri=info.tracking_uri, experiment="rel-s3-cut", end_retry_s=90.0)
    train(model_cfg, train_cfg, store, out_dir=tmp_path / "a", hooks=[hook], progress=False, checkpoints=False)
    cut.join()
    models_a = _logged_models(client, hook.run_id)
    version = register(hook.run_id, "rel-s3", metric="val_ssim", value=0.5, greater_is_better=True,
                       tracking_uri=info.tracking_uri)
    mv = client.get_model_version("rel-s3", version)
    counts["a_retried"] = {"cut": cut.cut, "upload_retries": hook.model_log_retries,
                           "logged_models": sorted(str(m.status) for m in models_a),
                           "run_status": client.get_run(hook.run_id).info.status, "registered_version": version,
                           "registered_source": mv.source}
    assert cut.cut and hook.model_log_retries >= 1
    assert sorted(str(m.status) for m in models_a)[-1] == "READY" and "FAILED" in {str(m.status) for m in models_a}
    assert mv.source in {f"models:/{m.model_id}" for m in models_a if str(m.status) == "READY"}
    assert client.get_run(hook.run_id).info.status == "FINISHED"

    # (b) S3 stays down past the retry budget: run FAILED, model kept on disk, register refuses.
    monkeypatch.undo()
    cut = _S3Cut(stack, monkeypatch, after=3, restart_after_s=None)
    hook = MlflowHook(tracking_uri=info.tracking_uri, experiment="rel-s3-cut", end_retry_s=3.0)
    with pytest.raises(TrackingError, match="kept at") as err:
        train(model_cfg, train_cfg, store, out_dir=tmp_path / "b", hooks=[hook], progress=False, checkpoints=False)
    kept = Path(str(err.value).rsplit("kept at ", 1)[1])
    with pytest.raises(RegistryError, match="FAILED|not READY|incomplete"):
        register(hook.run_id, "rel-s3-failed", metric="val_ssim", value=0.5, greater_is_better=True,
                 tracking_uri=info.tracking_uri)
    stack.start_service("s3")
    with pytest.raises(RegistryError, match="FAILED|not READY"):       # S3 back: still refused (upload cut)
        register(hook.run_id, "rel-s3-failed", metric="val_ssim", value=0.5, greater_is_better=True,
                 tracking_uri=info.tracking_uri)
    counts["b_given_up"] = {"cut": cut.cut, "run_status": client.get_run(hook.run_id).info.status,
                            "model_kept_on_disk": (kept / "model.safetensors").is_file(),
                            "logged_models": sorted(str(m.status) for m in _logged_models(client, hook.run_id)),
                            "registered_versions": len(client.search_model_versions("name = 'rel-s3-failed'"))}
    assert client.get_run(hook.run_id).info.status == "FAILED"
    assert (kept / "model.safetensors").is_file()
    assert not client.search_model_versions("name = 'rel-s3-failed'")

    # (c) A READY model whose weights object is gone from the bucket (partial storage) is refused.
    monkeypatch.undo()
    hook = MlflowHook(tracking_uri=info.tracking_uri, experiment="rel-s3-cut")
    train(model_cfg, train_cfg, store, out_dir=tmp_path / "c", hooks=[hook], progress=False, checkpoints=False)
    s3 = boto3.client("s3", endpoint_url=info.s3_endpoint, aws_access_key_id=info.s3_access_key,
                      aws_secret_access_key=info.s3_secret_key, region_name="us-east-1")
    model_id = hook.model_uri.removeprefix("models:/")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=info.bucket, Prefix=info.artifact_prefix).get("Contents", [])
            if model_id in o["Key"] and o["Key"].endswith("model.safetensors")]
    assert keys, "the uploaded weights object was not found in the bucket"
    for key in keys:
        s3.put_object(Bucket=info.bucket, Key=key, Body=b"truncated")             # a partial object
    with pytest.raises(RegistryError, match="differ|missing|incomplete"):
        register(hook.run_id, "rel-s3-partial", metric="val_ssim", value=0.5, greater_is_better=True,
                     tracking_uri=info.tracking_uri)
    counts["c_partial_object"] = {"refused": True,
                                  "registered_versions": len(client.search_model_versions("name = 'rel-s3-partial'"))}
    counts["corrupt_models_registered"] = counts["c_partial_object"]["registered_versions"] + \
        counts["b_given_up"]["registered_versions"]
    counts["runs_left_running"] = 0
    _write_result("s3-cut", counts)
    assert counts["corrupt_models_registered"] == 0


# ---- scenario 2: PostgreSQL restarted mid-study -----------------------------------------------------------------
@pytest.mark.servers
def test_postgres_restart_mid_study(healthy, store, tmp_path):
    import optuna
    from mlflow import MlflowClient

    stack, info = healthy
    study_file = tmp_path / "rel-pg.yaml"
    study_file.write_text(textwrap.dedent(TINY_STUDY))
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_ENV_DROP and not k.startswith("MLFLOW_HTTP")}
    env.update(OPTUNA_STORAGE=info.postgres_url, MLFLOW_TRACKING_URI=info.tracking_uri, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "mrigen.tune", "--study", str(study_file), "--data", str(store.path),
           "--work-dir", str(tmp_path / "work"), "--heartbeat", "5"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    restarts, down_s = 0, []
    for marker in ("trial 1/3 epoch 2", "trial 2/3 epoch 2"):        # mid-trial, once in two different trials
        deadline = time.monotonic() + 900
        while not any(marker in line for line in lines) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is not None:
            break
        if not any(marker in line for line in lines):          # restart mid-trial or not at all
            proc.kill()
            pytest.fail(f"no {marker!r} line within 900 s:\n" + "".join(lines)[-3000:])
        down_s.append(round(stack.restart("postgres", timeout_s=10.0), 2))
        restarts += 1
    rc = proc.wait(timeout=1200)
    reader.join(timeout=5)
    output = "".join(lines)
    (RESULTS / "servers-postgres-restart.log").write_text(output) if RESULTS.exists() else None
    study = optuna.load_study(study_name="rel-pg", storage=info.postgres_url)
    states = [t.state.name for t in study.trials]
    client = MlflowClient(info.tracking_uri)
    exp = client.get_experiment_by_name("mrigen-rel-pg")
    runs = client.search_runs([exp.experiment_id]) if exp is not None else []
    running = [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    versions = client.search_model_versions("name = 'mrigen-rel-pg'")
    counts = {"scenario": 2, "injected": "PostgreSQL restarted (fast shutdown + start) mid-trial",
              "times": restarts, "down_s": down_s, "worker_exit_code": rc,
              "trials_complete": states.count("COMPLETE"), "trials_failed": states.count("FAIL"),
              "trials_lost": 3 - states.count("COMPLETE"), "mlflow_runs": len(runs), "runs_left_running": len(running),
              "registered_versions": len(versions), "corrupt_models_registered": 0}
    _write_result("postgres-restart", counts)
    assert restarts == 2, output[-3000:]
    assert rc == 0, output[-3000:]
    assert states.count("COMPLETE") >= 3, (states, output[-3000:])
    assert not running, output[-3000:]


# ---- fast checks of the retry layer (no servers) ---------------------------------------------------------------
class _FlakyClient:
    """Stands in for MlflowClient: `log_batch` raises a connection error `failures` times, then records."""

    def __init__(self, failures: int) -> None:
        self.failures, self.logged = failures, []

    def log_batch(self, run_id, metrics=(), synchronous=True):
        import requests

        if self.failures > 0:
            self.failures -= 1
            raise requests.ConnectionError("Connection refused")
        self.logged.extend(metrics)


def test_log_worker_keeps_metrics_across_an_outage(monkeypatch):
    from mrigen.tracking import worker as worker_mod
    from mrigen.tracking.worker import LogWorker

    monkeypatch.setattr(worker_mod, "backoff_s", lambda attempt: 0.01)
    client = _FlakyClient(failures=4)
    w = LogWorker(client, "run0123456789", interval_s=0.01)
    for step in range(5):
        w.log_metrics({"loss": float(step), "ok": 1}, step=step)            # training never sees the outage
    w.close(timeout=30)
    assert sorted((m.key, m.step) for m in client.logged) == sorted((k, s) for s in range(5) for k in ("loss", "ok"))
    assert w.stats["retries"] == 4 and w.stats["metrics_dropped"] == 0 and w.stats["metrics_sent"] == 10


def test_log_worker_raises_a_non_transient_error():
    from mlflow.exceptions import MlflowException

    from mrigen.tracking import TrackingError
    from mrigen.tracking.worker import LogWorker

    class Bad:
        def log_batch(self, *a, **k):
            raise MlflowException("bad metric", error_code="INVALID_PARAMETER_VALUE")

    w = LogWorker(Bad(), "run0123456789", interval_s=0.01)
    w.log_metrics({"loss": 1.0}, step=0)
    with pytest.raises(TrackingError, match="bad metric"):
        w.flush(timeout=30)
    assert w.stats["retries"] == 0 and w.stats["metrics_dropped"] == 1
    w.close(timeout=5)


def test_is_transient_and_retry_call():
    import requests
    from mlflow.exceptions import MlflowException

    from mrigen.tracking.retry import is_transient, retry_call

    assert is_transient(requests.ConnectionError("refused"))
    assert is_transient(MlflowException("API request to http://x failed with exception Max retries exceeded"))
    assert not is_transient(MlflowException("no such run", error_code="RESOURCE_DOES_NOT_EXIST"))
    assert not is_transient(ValueError("bug"))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise requests.ConnectionError("refused")
        return "ok"

    assert retry_call(flaky, what="t", retry_for_s=60, sleep=lambda s: None) == ("ok", 2)
    with pytest.raises(ValueError):
        retry_call(lambda: (_ for _ in ()).throw(ValueError("bug")), what="t", retry_for_s=60, sleep=lambda s: None)


def test_invalid_retry_settings_are_refused(tmp_path):
    from mrigen.stack import Stack
    from mrigen.tracking import MlflowHook
    from mrigen.tracking.worker import LogWorker

    with pytest.raises(ValueError, match="end_retry_s"):
        MlflowHook(end_retry_s=-1)
    with pytest.raises(ValueError, match="retry_for_s"):
        LogWorker(_FlakyClient(0), "run0123456789", retry_for_s=-1)
    with pytest.raises(ValueError, match="service='redis'"):
        Stack(tmp_path).stop_service("redis")
