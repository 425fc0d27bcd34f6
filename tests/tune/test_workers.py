"""Several workers on one PostgreSQL study: unique trials, the requested total, and a SIGKILLed worker's trial
retried with the same params while its MLflow run is ended FAILED (never left RUNNING)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState
from tunelib import check_study

RESULTS = Path(__file__).parents[1] / "reliability" / ".results"   # counts for docs/RELIABILITY.md

pytestmark = [pytest.mark.servers, pytest.mark.slow]

STUDY = """
description: {description}
family: vae
base:
  model: {{blocks: 3}}
  train: {{batch_size: 16, grid_every: 0, eval_samples: 32}}
search_space:
  train.lr: {{type: float, low: 5.0e-4, high: 3.0e-3, log: true}}
objective: {{metric: val_ssim, direction: maximize}}
pruner: {{type: none}}
promotion: {{metric: val_fd_ratio, direction: minimize}}
demo_budget: {{trials: {trials}, epochs: {epochs}, image_size: 32}}
"""


@pytest.fixture(scope="module", autouse=True)
def feature_net(tune_store):
    """Train the store's feature network (for the final evaluation's sample metrics) once, before workers race."""
    from mrigen.metrics import get_feature_net

    get_feature_net(tune_store)


def write_study(path, name, trials, epochs):
    path = path / f"{name}.yaml"
    path.write_text(STUDY.format(description=name, trials=trials, epochs=epochs))
    return path


def worker(study, stack, store, work_dir, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")}
    env.update(stack.client_env())
    cmd = [sys.executable, "-m", "mrigen.tune", "--study", str(study), "--data", str(store.path),
           "--work-dir", str(work_dir), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_workers_share_one_postgres_study(stack, tune_store, tmp_path):
    study = write_study(tmp_path, "two-workers", trials=4, epochs=1)
    procs = [worker(study, stack, tune_store, tmp_path / f"w{i}", "--seed", str(i)) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    loaded = optuna.load_study(study_name="two-workers", storage=stack.client_env()["OPTUNA_STORAGE"])
    numbers = [t.number for t in loaded.trials]
    assert len(numbers) == len(set(numbers))
    finished = [t for t in loaded.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= 4
    client = MlflowClient(stack.tracking_uri)
    exp = client.get_experiment_by_name("mrigen-two-workers")
    parents = client.search_runs([exp.experiment_id], "tags.`mrigen.role` = 'study-parent'")
    assert len(parents) == 1
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(children) == len(loaded.trials)
    # the champion is the trial the promotion rule ranks first, and it generates slices (PostgreSQL + S3 + MLflow)
    check_study(stack.client_env()["OPTUNA_STORAGE"], stack.tracking_uri, "two-workers", 4)
    gen = subprocess.run([sys.executable, "-m", "mrigen.generate", "--model", "models:/mrigen-two-workers@champion",
                          "-n", "3", "--out", str(tmp_path / "synthetic"), "--tracking-uri", stack.tracking_uri],
                         capture_output=True, text=True, timeout=300, env={**os.environ, **stack.client_env()})
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert len(list((tmp_path / "synthetic").glob("*.png"))) == 3


@pytest.mark.reliability
def test_sigkilled_worker_trial_is_retried_with_same_params(stack, tune_store, tmp_path):
    """Reliability scenario 1 (also issue 5): SIGKILL a worker mid-trial; another worker finishes the study."""
    study_file = write_study(tmp_path, "kill-worker", trials=2, epochs=40)
    storage = stack.client_env()["OPTUNA_STORAGE"]
    a = worker(study_file, stack, tune_store, tmp_path / "a", "--heartbeat", "2")
    victim = None
    for _ in range(240):                                             # poll for up to ~4 minutes
        if victim is not None:
            break
        time.sleep(1)
        try:
            trials = optuna.load_study(study_name="kill-worker", storage=storage).trials
        except KeyError:            # study not created yet
            continue
        running = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("mlflow_run_id")
                   and len(t.intermediate_values) >= 1]
        victim = running[0] if running else None
    assert victim is not None, "no trial got going in worker A"
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    time.sleep(7)                                                    # > grace period (3 x heartbeat)

    b = worker(study_file, stack, tune_store, tmp_path / "b", "--heartbeat", "2")
    out = b.communicate(timeout=900)[0]
    assert b.returncode == 0, out[-3000:]
    trials = {t.number: t for t in optuna.load_study(study_name="kill-worker", storage=storage).trials}
    assert trials[victim.number].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params
    assert retries[0].state == TrialState.COMPLETE
    finished = [t for t in trials.values() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= 2
    client = MlflowClient(stack.tracking_uri)
    run = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "worker lost" in run.data.tags["mrigen.stop_reason"]
    versions = client.search_model_versions("name = 'mrigen-kill-worker'")
    assert victim.user_attrs["mlflow_run_id"] not in {v.run_id for v in versions}
    assert len({v.run_id for v in versions}) == len(versions)        # no run registered twice
    exp = client.get_experiment_by_name("mrigen-kill-worker")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "worker-sigkill.json").write_text(json.dumps({
        "workers_killed": 1, "trials_requested": 2, "trials_finished": len(finished),
        "killed_trial_retried_same_params": len(retries),
        "runs_left_running": len(client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")),
        "killed_run_status": run.info.status,
        "registered_versions_of_killed_run": sum(v.run_id == run.info.run_id for v in versions),
        "duplicate_registered_runs": len(versions) - len({v.run_id for v in versions})}, indent=2))
