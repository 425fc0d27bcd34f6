"""`python -m mrigen.tune`: studies complete, trials are child runs, the best model is the champion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState
from tunelib import check_study


def tune(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")}
    env = {**base, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mrigen.tune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_three_trial_study_on_sqlite_then_generate(tiny_study, tune_store, tmp_path):
    work = tmp_path / "work"
    proc = tune(["--study", str(tiny_study), "--data", str(tune_store.path), "--work-dir", str(work)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo budget, 3 trials x 1 epochs at 32px" in proc.stdout
    assert "models:/mrigen-tiny@champion" in proc.stdout
    storage, tracking = f"sqlite:///{work}/optuna.db", f"sqlite:///{work}/mlflow.db"
    check_study(storage, tracking, "tiny", 3)
    gen = subprocess.run([sys.executable, "-m", "mrigen.generate", "--model", "models:/mrigen-tiny@champion",
                          "-n", "4", "--out", str(tmp_path / "synthetic"), "--tracking-uri", tracking],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert len(list((tmp_path / "synthetic").glob("*.png"))) == 4

    again = tune(["--study", str(tiny_study), "--data", str(tune_store.path), "--work-dir", str(work)], tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stdout


@pytest.mark.parametrize("args,needle", [
    (["--study", "no-such-study"], "unknown study"),
    (["--study", "TINY", "--storage", "postgresql+psycopg://u:secretpw@127.0.0.1:1/db"], "storage"),
    (["--study", "TINY", "--gpus", "x"], "--gpus"),
])
def test_bad_input_is_one_clear_line(args, needle, tmp_path, tune_store, tiny_study):
    args = [str(tiny_study) if a == "TINY" else a for a in args]
    proc = tune([*args, "--work-dir", str(tmp_path / "w"), "--data", str(tune_store.path)], tmp_path, timeout=120)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "secretpw" not in proc.stderr + proc.stdout


def test_bad_study_file_is_one_clear_line(tmp_path, tune_store):
    bad = tmp_path / "bad.yaml"
    bad.write_text("description: x\nfamily: vae\nsearch_space: {train.lr: {type: float, low: 1, high: 0}}\n")
    proc = tune(["--study", str(bad), "--data", str(tune_store.path), "--work-dir", str(tmp_path / "w")], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "search_space.train.lr" in proc.stderr


def test_pruning_stops_a_bad_trial_early(tune_store, tmp_path):
    from mrigen.tune.runner import TuneOptions, run_worker
    from mrigen.tune.study import load_study

    path = tmp_path / "prune.yaml"
    path.write_text(
        "description: deliberately bad learning-rate region\nfamily: vae\n"
        "base: {model: {blocks: 3}, train: {batch_size: 16, grid_every: 0, final_eval: false}}\n"
        "search_space: {train.lr: {type: categorical, choices: [0.002, 1.0e-9]}}\n"
        "pruner: {type: median, n_startup_trials: 1, n_warmup_steps: 0}\n"
        "demo_budget: {trials: 2, epochs: 4, image_size: 32}\n")
    spec = load_study(path)
    opts = TuneOptions(study=str(path), storage=f"sqlite:///{tmp_path}/o.db",
                       tracking_uri=f"sqlite:///{tmp_path}/m.db", work_dir=tmp_path)
    study = optuna.create_study(study_name=spec.name, storage=opts.storage, direction="maximize")
    study.enqueue_trial({"train.lr": 0.002})
    study.enqueue_trial({"train.lr": 1.0e-9})
    study = run_worker(spec, opts, tune_store, parent_run_id=None)
    good, bad = sorted(study.trials, key=lambda t: t.number)[:2]
    assert good.state == TrialState.COMPLETE and len(good.intermediate_values) == 4
    assert bad.state == TrialState.PRUNED and len(bad.intermediate_values) < 4
    run = MlflowClient(opts.tracking_uri).get_run(bad.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
