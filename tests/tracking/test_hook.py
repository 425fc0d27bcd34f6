"""MlflowHook against a local SQLite store: what a run records, the pyfunc model, run end states."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from mlflow_testlib import tiny_model_cfg, tiny_train_cfg
from mrigen.registry import PICKLE_SUFFIXES
from mrigen.train import Hook, StopTraining, train
from mrigen.train.hooks import TrainContext
from mrigen.tracking import MlflowHook, get_or_create_experiment, use_tracking_uri
from mrigen.tracking import safety

PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@pytest.fixture(scope="module")
def trained(sqlite_uri, fake_store):
    hook = MlflowHook(tracking_uri=sqlite_uri, experiment="hook-tests", run_name="tiny", system_metrics=False,
                      tags={"note": "db at postgresql://mlflow:hunter2@db/x"}, flush_interval_s=0.2)
    result = train(tiny_model_cfg(), tiny_train_cfg(epochs=3), fake_store, hooks=[hook], progress=False)
    return hook, result, MlflowClient(sqlite_uri, registry_uri=sqlite_uri).get_run(hook.run_id)


def test_run_records_params_tags_and_data(trained, fake_store):
    hook, result, run = trained
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == MlflowClient(hook.tracking_uri).get_experiment_by_name("hook-tests").experiment_id
    ctx = TrainContext(model=None, model_cfg=tiny_model_cfg(), train_cfg=tiny_train_cfg(epochs=3), device=None,
                       data_digest="", data_path="", out_dir=None, n_train=0, n_val=0)
    expected = {k: json.dumps(v) if isinstance(v, (list, tuple)) else str(v) for k, v in ctx.params().items()}
    assert {k: v for k, v in run.data.params.items() if not k.startswith("data.")} == expected
    assert run.data.params["data.n_train"] == "40"
    tags = run.data.tags
    import mrigen

    assert tags["mrigen.version"] == mrigen.__version__ and tags["mrigen.family"] == "vae"
    assert tags["mrigen.data_digest"] == fake_store.digest and tags["mlflow.runName"] == "tiny"
    assert "hunter2" not in tags["note"]
    (ds,) = run.inputs.dataset_inputs
    assert json.loads(ds.dataset.profile)["sha256"] == fake_store.digest


def test_metrics_have_one_point_per_epoch(trained):
    hook, result, run = trained
    client = MlflowClient(hook.tracking_uri)
    for key in ("train_loss", "val_loss", "val_ssim", "active_units"):
        history = client.get_metric_history(hook.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2]
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
            [h[key] for h in result.history])
    assert run.data.metrics["final_val_ssim"] == pytest.approx(result.val_metrics["val_ssim"])


def test_images_and_figures_are_logged_with_steps(trained):
    hook, _, run = trained
    client = MlflowClient(hook.tracking_uri)
    names = [Path(a.path).name for a in client.list_artifacts(hook.run_id, "images")]
    for key in ("reconstruction", "samples"):
        steps = sorted({int(n.split("+step+")[1].split("+")[0]) for n in names if n.startswith(f"{key}+")})
        assert steps == [0, 1, 2], (key, names)
    assert "loss_curves.png" in [a.path for a in client.list_artifacts(hook.run_id)]


def test_logged_model_loads_without_pickle_and_generates(trained, tmp_path):
    hook, _, _ = trained
    with use_tracking_uri(hook.tracking_uri):
        local = Path(mlflow.artifacts.download_artifacts(f"runs:/{hook.run_id}/model", dst_path=str(tmp_path)))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert {"MLmodel", "pyfunc_model.py", "model.safetensors", "config.json"} <= {p.name for p in files}
    for p in files:
        assert not p.name.lower().endswith(PICKLE_SUFFIXES), p
        assert not p.read_bytes()[:2] in PICKLE_MAGIC, f"{p} looks like a pickle"
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    with use_tracking_uri(hook.tracking_uri):
        model = mlflow.pyfunc.load_model(f"runs:/{hook.run_id}/model")
    a = model.predict({"n": 5, "seed": 3})
    assert a.shape == (5, 32, 32) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, model.predict({"n": 5, "seed": 3}))
    assert not np.array_equal(a, model.predict({"n": 5, "seed": 4}))
    assert model.predict({"n": 1, "seed": 0}).shape == (1, 32, 32)
    assert model.metadata.signature.inputs.input_names() == ["n", "seed"]


class _StopAfterFirst(Hook):
    def on_epoch_end(self, ctx, epoch, metrics):
        raise StopTraining("pruned by test at epoch 0")


def test_stopped_run_is_killed_with_reason_and_no_model(sqlite_uri, fake_store):
    client = MlflowClient(sqlite_uri)
    parent = client.create_run(get_or_create_experiment(client, "hook-stopped")).info.run_id
    hook = MlflowHook(tracking_uri=sqlite_uri, experiment="hook-stopped", parent_run_id=parent, system_metrics=False)
    train(tiny_model_cfg(), tiny_train_cfg(epochs=3), fake_store, hooks=[_StopAfterFirst(), hook], progress=False)
    run = MlflowClient(sqlite_uri).get_run(hook.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["mrigen.stop_reason"] == "pruned by test at epoch 0"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert hook.model_uri is None and "mrigen.model_uri" not in run.data.tags


_CRASH = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {testlib!r})
    import torch
    from mlflow_testlib import tiny_model_cfg, tiny_train_cfg
    from mrigen.models import build_model
    from mrigen.train.hooks import TrainContext
    from mrigen.tracking import MlflowHook
    ctx = TrainContext(model=build_model(tiny_model_cfg()), model_cfg=tiny_model_cfg(), train_cfg=tiny_train_cfg(),
                       device=torch.device("cpu"), data_digest="0" * 64, data_path="/tmp/x", out_dir=None,
                       n_train=1, n_val=1)
    hook = MlflowHook(tracking_uri={uri!r}, experiment="hook-crash", run_name=sys.argv[1], system_metrics=False)
    hook.on_start(ctx)
    hook.on_epoch_end(ctx, 0, {{"train_loss": 1.0}})
    if sys.argv[1] == "exception":
        raise RuntimeError("training blew up")
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    time.sleep(30)
""")


def test_crashed_processes_leave_failed_or_killed_runs(sqlite_uri, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(_CRASH.format(testlib=str(Path(__file__).parent), uri=sqlite_uri))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cases = {"exception": "FAILED", "SIGTERM": "KILLED"}
    procs = {name: subprocess.Popen([sys.executable, str(script), name], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name in cases}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0, (name, out)
    if hasattr(signal, "SIGTERM"):
        assert procs["SIGTERM"].returncode == -signal.SIGTERM                  # chained to the default action
    client = MlflowClient(sqlite_uri)
    exp = client.get_experiment_by_name("hook-crash").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([exp])}
    for name, status in cases.items():
        assert runs[name].info.status == status, (name, runs[name].data.tags)
        assert runs[name].data.metrics["train_loss"] == 1.0                      # queued metrics were flushed
    assert "SIGTERM" in runs["SIGTERM"].data.tags["mrigen.end_reason"]


def test_sigint_handler_closes_runs_killed_then_chains(monkeypatch):
    closed, chained = [], []
    monkeypatch.setitem(safety._PREVIOUS, signal.SIGINT, lambda signum, frame: chained.append(signum))
    safety.register_open_run("run-under-test", lambda status, reason: closed.append((status, reason)))
    safety._on_signal(signal.SIGINT, None)
    assert closed == [("KILLED", "received SIGINT")] and chained == [signal.SIGINT]
    assert "run-under-test" not in safety.open_runs()


def test_runs_of_a_parent_process_are_not_closed_by_a_child(monkeypatch):
    closed = []
    safety.register_open_run("parent-run", lambda status, reason: closed.append(status))
    monkeypatch.setattr(safety.os, "getpid", lambda: -1)                       # as seen from a forked child
    safety.terminate_open_runs("FAILED", "child exiting")
    monkeypatch.undo()
    assert closed == [] and "parent-run" in safety.open_runs()
    safety.unregister_run("parent-run")


def test_the_prior_curves_are_logged_by_prior_step(sqlite_uri, fake_store):
    """A VQ-VAE's code prior trains after the epochs: its training and held-out loss go to MLflow as
    `prior_train_loss` / `prior_val_loss`, one point per twentieth of its steps, stepped by prior step."""
    hook = MlflowHook(tracking_uri=sqlite_uri, experiment="hook-prior", system_metrics=False, log_model=False)
    model_cfg = tiny_model_cfg(family="vqvae", latent="spatial", grid=4, codebook_size=16, code_dim=8,
                               prior_channels=16, prior_layers=1)
    result = train(model_cfg, tiny_train_cfg(epochs=1, prior_steps=40), fake_store, hooks=[hook], progress=False)
    client = MlflowClient(sqlite_uri)
    for key in ("train_loss", "val_loss"):
        history = sorted(client.get_metric_history(hook.run_id, f"prior_{key}"), key=lambda m: m.step)
        assert [m.step for m in history] == [r["step"] for r in result.prior_curve] == list(range(2, 41, 2))
        assert [m.value for m in history] == pytest.approx([r[key] for r in result.prior_curve])
    assert client.get_run(hook.run_id).info.status == "FINISHED"
