"""`python -m mrigen.tune`: studies complete, trials are child runs, the promotion rule picks the champion, multi-
objective studies log their Pareto front. The final evaluation is faked (`fake_eval`) where sample metrics
decide the outcome; the CLI's argument errors run in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
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


def run_main(args: list[str], monkeypatch) -> int:
    """`python -m mrigen.tune ARGS` in this process (so `fake_eval` applies), on the embedded local stores."""
    from mrigen.tune.__main__ import main

    for var in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    return main(args)


def test_three_trial_study_on_sqlite_then_generate(tiny_study, tune_store, tmp_path, fake_eval, capsys, monkeypatch):
    """Objective val_ssim, default promotion rule (minimise val_fd_ratio): the champion is the trial with the best
    fd_ratio, not the one with the best SSIM; the summary shows the sample-quality columns."""
    fake_eval.results = [{"ssim": 0.6, "fd_ratio": 2.5}, {"ssim": 0.7, "fd_ratio": 2.9, "precision": 0.8},
                         {"ssim": 0.5, "fd_ratio": 1.9}]
    work = tmp_path / "work"
    assert run_main(["--study", str(tiny_study), "--data", str(tune_store.path), "--work-dir", str(work)],
                    monkeypatch) == 0
    out = capsys.readouterr().out
    assert "demo budget, 3 trials x 1 epochs at 32px" in out
    assert "models:/mrigen-tiny@champion" in out
    storage, tracking = f"sqlite:///{work}/optuna.db", f"sqlite:///{work}/mlflow.db"
    check_study(storage, tracking, "tiny", 3)
    study = optuna.load_study(study_name="tiny", storage=storage)
    champion = MlflowClient(tracking, registry_uri=tracking).get_model_version_by_alias("mrigen-tiny", "champion")
    assert study.best_trial.number == 1 and champion.tags["optuna.trial_number"] == "2"
    header = next(line for line in out.splitlines() if line.lstrip().startswith("trial"))
    assert header.split()[:9] == ["trial", "state", "val_ssim", "fd_ratio", "precision", "recall", "memorised",
                                  "rule", "seconds"]
    assert "held-out recon: SSIM 0.500" in out and "fd_ratio 1.900 (under 1 feature network)," in out
    exp_id = MlflowClient(tracking).get_experiment_by_name("mrigen-tiny").experiment_id
    assert (f"mlflow ui --backend-store-uri {tracking}, then open "
            f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning") in out
    gen = subprocess.run([sys.executable, "-m", "mrigen.generate", "--model", "models:/mrigen-tiny@champion",
                          "-n", "4", "--out", str(tmp_path / "synthetic"), "--tracking-uri", tracking],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert len(list((tmp_path / "synthetic").glob("*.png"))) == 4

    assert run_main(["--study", str(tiny_study), "--data", str(tune_store.path), "--work-dir", str(work)],
                    monkeypatch) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_stored_study_of_another_objective_is_refused(tiny_study, tune_store, tmp_path, fake_eval, capsys,
                                                        monkeypatch):
    work = tmp_path / "work"
    args = ["--study", str(tiny_study), "--data", str(tune_store.path), "--work-dir", str(work), "--n-trials", "1",
            "--no-tracking"]
    assert run_main(args, monkeypatch) == 0
    tiny_study.write_text(tiny_study.read_text().replace("objective: {metric: val_ssim, direction: maximize}",
                                                         "objective: {metric: val_fd_ratio, direction: minimize}"))
    assert run_main(args, monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "created to optimise val_ssim (maximize)" in err[0]
    assert f"{tiny_study} now optimises val_fd_ratio (minimize)" in err[0]


def test_a_trial_without_the_promotion_metric_fails_with_its_name(tiny_study, tune_store, tmp_path, fake_eval,
                                                                  capsys, monkeypatch):
    """A model whose final evaluation has no sample metrics (e.g. a VQ-VAE that cannot sample) fails clearly."""
    fake_eval.results = [{"fd": None, "fd_real": None, "fd_ratio": None, "precision": None, "recall": None,
                          "memorised": None}]
    work = tmp_path / "work"
    assert run_main(["--study", str(tiny_study), "--data", str(tune_store.path), "--work-dir", str(work),
                     "--n-trials", "1", "--no-tracking"], monkeypatch) == 0        # the next trial completed
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{work}/optuna.db")
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"].startswith("promotion rule needs val_fd_ratio, which this model's")
    assert f"trial 0 failed: {trial.user_attrs['fail_reason']}" in capsys.readouterr().out


def test_a_study_whose_every_trial_fails_exits_1(tiny_study, tune_store, tmp_path, fake_eval, capsys, monkeypatch):
    missing = {"fd": None, "fd_real": None, "fd_ratio": None, "precision": None, "recall": None, "memorised": None}
    fake_eval.results = [missing] * 3                   # the study stops once failures outnumber its 1 trial
    assert run_main(["--study", str(tiny_study), "--data", str(tune_store.path), "--work-dir", str(tmp_path / "w"),
                     "--n-trials", "1", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], monkeypatch) == 1
    assert "no trial completed; see the log above" in capsys.readouterr().out


def test_a_study_begun_on_another_tracking_store_is_refused(tiny_study, tune_store, tmp_path, fake_eval, capsys,
                                                           monkeypatch):
    """The study's parent run lives on the tracking store it began with; another store is a one-line error."""
    args = ["--study", str(tiny_study), "--data", str(tune_store.path), "--work-dir", str(tmp_path / "work")]
    assert run_main([*args, "--n-trials", "1", "--tracking-uri", f"sqlite:///{tmp_path}/a.db"], monkeypatch) == 0
    capsys.readouterr()
    assert run_main([*args, "--n-trials", "2", "--tracking-uri", f"sqlite:///{tmp_path}/b.db"], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "which the tracking store" in err[0] and "b.db does not have" in err[0], err


@pytest.mark.parametrize("args,needle", [
    (["--study", "TINY", "--n-trials", "0"], "--n-trials 0: must be >= 1"),
    (["--study", "TINY", "--epochs", "-1"], "--epochs -1: must be >= 1"),
    (["--study", "TINY", "--heartbeat", "0"], "--heartbeat 0: must be >= 1"),
    (["--study", "TINY", "--timeout", "0"], "--timeout 0.0: must be > 0 seconds"),
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


@pytest.mark.parametrize("objective", ["{metric: val_ssim, direction: maximize}",
                                       "{metric: val_fd_ratio, direction: minimize}"])
def test_pruning_stops_a_bad_trial_early(tune_store, tmp_path, fake_eval, objective):
    """Pruned on val_ssim per epoch; in a study minimising fd_ratio the pruner must still drop the low-SSIM trial."""
    from mrigen.tune.runner import TuneOptions, run_worker
    from mrigen.tune.study import load_study

    path = tmp_path / "prune.yaml"
    path.write_text(
        "description: deliberately bad learning-rate region\nfamily: vae\n"
        "base: {model: {blocks: 3}, train: {batch_size: 16, grid_every: 0}}\n"
        "search_space: {train.lr: {type: categorical, choices: [0.002, 1.0e-9]}}\n"
        f"objective: {objective}\n"
        "pruner: {type: median, metric: val_ssim, n_startup_trials: 1, n_warmup_steps: 0}\n"
        "demo_budget: {trials: 2, epochs: 4, image_size: 32}\n")
    spec = load_study(path)
    opts = TuneOptions(study=str(path), storage=f"sqlite:///{tmp_path}/o.db",
                       tracking_uri=f"sqlite:///{tmp_path}/m.db", work_dir=tmp_path)
    study = optuna.create_study(study_name=spec.name, storage=opts.storage, direction=spec.direction)
    study.enqueue_trial({"train.lr": 0.002})
    study.enqueue_trial({"train.lr": 1.0e-9})
    study = run_worker(spec, opts, tune_store, parent_run_id=None)
    good, bad = sorted(study.trials, key=lambda t: t.number)[:2]
    assert good.state == TrialState.COMPLETE and len(good.intermediate_values) == 4
    assert bad.state == TrialState.PRUNED and len(bad.intermediate_values) < 4
    run = MlflowClient(opts.tracking_uri).get_run(bad.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    # the summary shows no objective value for it (Optuna's value is the last val_ssim report, negated when the
    # study minimises), and says where and on what it was pruned
    from mrigen.tune.report import summary_table

    table = summary_table(study, spec)
    row = next(line.split() for line in table.splitlines() if line.split()[:2] == [str(bad.number), "PRUNED"])
    assert row[2] == "-"
    ssim = bad.intermediate_values[max(bad.intermediate_values)] * (1 if "maximize" in objective else -1)
    assert (f"trial {bad.number} pruned after epoch {len(bad.intermediate_values)}: val_ssim {ssim:.4f} behind "
            f"the earlier trials at that epoch") in table


def _study_on_sqlite(tmp_path: Path, body: str):
    """(spec, options) of a study file with `body`, on SQLite Optuna / MLflow stores under tmp_path."""
    from mrigen.tune.runner import TuneOptions
    from mrigen.tune.study import load_study

    path = tmp_path / "study.yaml"
    path.write_text(body)
    opts = TuneOptions(study=str(path), storage=f"sqlite:///{tmp_path}/o.db",
                       tracking_uri=f"sqlite:///{tmp_path}/m.db", work_dir=tmp_path)
    return load_study(path), opts


def test_a_budget_set_field_reaches_every_trial_config(tune_store, tmp_path, fake_eval):
    """`demo_budget.set` (the embedded preview trains half-width networks) is in each trial's logged config."""
    from mrigen.tune.runner import run_worker

    spec, opts = _study_on_sqlite(tmp_path, (
        "description: half-width preview\nfamily: vae\n"
        "base: {model: {blocks: 3}, train: {batch_size: 16, grid_every: 0}}\n"
        "search_space: {train.lr: {type: categorical, choices: [0.002]}}\n"
        "demo_budget: {trials: 1, epochs: 1, image_size: 32, set: {model.width: 0.5}}\n"))
    (trial,) = run_worker(spec, opts, tune_store, parent_run_id=None).trials
    params = MlflowClient(opts.tracking_uri).get_run(trial.user_attrs["mlflow_run_id"]).data.params
    assert (params["model.width"], params["model.image_size"], params["train.epochs"]) == ("0.5", "32", "1")


def test_the_budget_s_first_values_start_a_new_study_once(tune_store, tmp_path, fake_eval, capsys):
    """`demo_budget.first`: trial 0 of a new study takes those values, the sampler draws the rest; running the
    study on (more trials, same storage) does not queue them again."""
    from mrigen.tune.runner import run_worker

    spec, opts = _study_on_sqlite(tmp_path, (
        "description: a study with a known-good start\nfamily: vae\n"
        "base: {model: {blocks: 3}, train: {batch_size: 16, grid_every: 0}}\n"
        "search_space:\n"
        "  train.lr: {type: float, low: 5.0e-4, high: 3.0e-3, log: true}\n"
        "  model.kernel_size: {type: categorical, choices: [3, 4, 5]}\n"
        "pruner: {type: none}\n"
        "demo_budget: {trials: 2, epochs: 1, image_size: 32, first: {train.lr: 1.234e-3}}\n"))
    trials = sorted(run_worker(spec, opts, tune_store, parent_run_id=None).trials, key=lambda t: t.number)
    assert len(trials) == 2 and trials[0].params["train.lr"] == 1.234e-3
    assert trials[0].params["model.kernel_size"] in (3, 4, 5)             # left to the sampler
    assert trials[0].user_attrs["start"] == "demo_budget.first" and "start" not in trials[1].user_attrs
    assert trials[1].params["train.lr"] != 1.234e-3
    assert "first trial starts from train.lr=0.001234" in capsys.readouterr().out
    params = MlflowClient(opts.tracking_uri).get_run(trials[0].user_attrs["mlflow_run_id"]).data.params
    assert params["train.lr"] == "0.001234"                                  # the trial's config really had it
    more = run_worker(spec, replace(opts, n_trials=3), tune_store, parent_run_id=None).trials
    assert len(more) == 3 and [t.number for t in more if t.params["train.lr"] == 1.234e-3] == [0]


MULTI_STUDY = """
description: tiny multi-objective study for tests
family: vae
base:
  model: {blocks: 3}
  train: {batch_size: 16, grid_every: 0}
search_space:
  train.lr: {type: float, low: 5.0e-4, high: 3.0e-3, log: true}
objective:
  - {metric: val_fd_ratio, direction: minimize}
  - {metric: val_ssim, direction: maximize}
pruner: {type: none}
promotion: {metric: val_fd_ratio, direction: minimize, require: {val_memorised: "<= 0.05"}}
demo_budget: {trials: 3, epochs: 1, image_size: 32}
"""


def test_multi_objective_study_logs_its_pareto_front_and_promotes_by_the_rule(tune_store, tmp_path, fake_eval,
                                                                              capsys, monkeypatch):
    """Trial 1 has the best fd_ratio but copies training slices: it is on the Pareto front yet never registered;
    trial 0 meets the rule and is champion; trial 2 (best SSIM) is on the front but ranks below trial 0."""
    fake_eval.results = [{"fd_ratio": 2.0, "ssim": 0.5}, {"fd_ratio": 1.5, "ssim": 0.7, "memorised": 0.2},
                         {"fd_ratio": 3.0, "ssim": 0.8}]
    path = tmp_path / "multi.yaml"
    path.write_text(MULTI_STUDY)
    work = tmp_path / "work"
    assert run_main(["--study", str(path), "--data", str(tune_store.path), "--work-dir", str(work)], monkeypatch) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="multi", storage=f"sqlite:///{work}/optuna.db")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [t.values for t in trials] == [[2.0, 0.5], [1.5, 0.7], [3.0, 0.8]]
    assert {t.number for t in study.best_trials} == {1, 2}
    assert trials[1].user_attrs["promotion"]["failures"] == ["val_memorised=0.2 fails <= 0.05"]

    tracking = f"sqlite:///{work}/mlflow.db"
    client = MlflowClient(tracking, registry_uri=tracking)
    champion = client.get_model_version_by_alias("mrigen-multi", "champion")
    assert champion.run_id == trials[0].user_attrs["mlflow_run_id"]
    assert champion.tags["mrigen.metric"] == "val_fd_ratio" and float(champion.tags["mrigen.metric_value"]) == 2.0
    registered = {v.run_id for v in client.search_model_versions("name = 'mrigen-multi'")}
    assert trials[1].user_attrs["mlflow_run_id"] not in registered

    parent = study.user_attrs["mlflow_parent_run_id"]
    files = {f.path for f in client.list_artifacts(parent, "study")}
    assert {"study/pareto_front.json", "study/pareto_front.csv", "study/pareto_front.png"} <= files
    table = client.download_artifacts(parent, "study/pareto_front.csv", str(tmp_path))
    rows = Path(table).read_text().splitlines()
    assert rows[0] == "trial,val_fd_ratio,val_ssim,train.lr" and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert client.get_run(parent).data.metrics["n_pareto"] == 2

    assert "Pareto front (2 trials; val_fd_ratio minimize, val_ssim maximize):" in out
    assert "trial 1 does not meet the promotion rule: val_memorised=0.2 fails <= 0.05" in out
    assert "trial 0 ranks first under the promotion rule" in out
    assert "held-out recon: SSIM 0.500" in out and "fd_ratio 2.000" in out
    assert "demo targets (ssim >= 0.75, fd_ratio <= 3): NOT met: ssim 0.5 misses >= 0.75" in out


def test_a_study_can_select_on_augmentation_utility(tune_store, tmp_path, fake_eval, monkeypatch):
    """Each trial's model runs the utility protocol (val split); its gain is the objective, is logged on the trial's
    run with a nested utility run, and is recorded in the trial's metrics."""
    import textwrap

    from mrigen.metrics.probe import ProbeConfig, get_probes

    get_probes(tune_store, config=ProbeConfig(input_size=32, channels=(8, 16), hidden=16, steps=20, batch_size=16))
    path = tmp_path / "augment.yaml"
    path.write_text(textwrap.dedent("""
        description: tiny conditional VAE selected on site utility
        family: vae
        base:
          model: {blocks: 3, conditions: [site]}
          train: {batch_size: 16}
        search_space:
          train.lr: {type: float, low: 5.0e-4, high: 3.0e-3, log: true}
        objective: {metric: val_utility_site_gain, direction: maximize}
        pruner: {type: none}
        promotion: {metric: val_utility_site_gain, direction: maximize}
        utility: {task: site, seeds: 1, synthetic: [16], steps: 3, batch_size: 16, input_size: 32, channels: [8, 16]}
        demo_budget: {trials: 1, epochs: 1, image_size: 32}
    """))
    work = tmp_path / "work"
    assert run_main(["--study", str(path), "--data", str(tune_store.path), "--work-dir", str(work)], monkeypatch) == 0
    storage = f"sqlite:///{work / 'optuna.db'}"
    trial = optuna.load_study(study_name="augment", storage=storage).trials[0]
    gain = trial.user_attrs["metrics"]["val_utility_site_gain"]
    assert trial.value == pytest.approx(gain) and "val_utility_site_tstr_ratio" in trial.user_attrs["metrics"]
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    run_id = trial.user_attrs["mlflow_run_id"]
    assert client.get_run(run_id).data.metrics["val_utility_site_gain"] == pytest.approx(gain)
    nested = client.search_runs([client.get_run(run_id).info.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    assert [r.data.tags["mrigen.kind"] for r in nested] == ["utility"]
