"""Study summaries without training: the trial table, the Pareto front (rows, CSV, plot) and target verdicts."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from mrigen.tune.pareto import front_csv, front_rows, plot_front
from mrigen.tune.report import DEMO_TARGETS, summary_table, verdict
from mrigen.tune.study import load_study

STUDY = """
description: report test
family: vae
search_space:
  train.lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
objective: {objective}
pruner: {{type: none}}
promotion: {{metric: val_fd_ratio, require: {{val_memorised: "<= 0.05"}}}}
"""
MULTI = "[{metric: val_fd_ratio, direction: minimize}, {metric: val_ssim, direction: maximize}]"


def _study(tmp_path, objective: str, trials: list[tuple]):
    path = tmp_path / "rep.yaml"
    path.write_text(STUDY.format(objective=objective))
    spec = load_study(path)
    study = optuna.create_study(directions=spec.directions)
    for lr, values, metrics, failures in trials:
        state = TrialState.COMPLETE if values is not None else TrialState.FAIL
        attrs = {"metrics": metrics} if metrics else {}
        if failures is not None:
            attrs["promotion"] = {"metric": "val_fd_ratio", "value": metrics["val_fd_ratio"], "failures": failures}
        if state == TrialState.FAIL:
            attrs["fail_reason"] = "promotion rule needs val_fd_ratio"
        study.add_trial(create_trial(state=state, values=values, params={"train.lr": lr},
                                     distributions={"train.lr": FloatDistribution(1e-4, 1e-2, log=True)},
                                     user_attrs=attrs))
    return spec, study


TRIALS = [(1e-3, [2.0, 0.5], {"val_fd_ratio": 2.0, "val_ssim": 0.5, "val_precision": 0.6}, []),
          (2e-3, [1.5, 0.7], {"val_fd_ratio": 1.5, "val_ssim": 0.7, "val_memorised": 0.2},
           ["val_memorised=0.2 fails <= 0.05"]),
          (3e-3, [3.0, 0.8], {"val_fd_ratio": 3.0, "val_ssim": 0.8}, []),
          (4e-3, None, None, None)]


def test_multi_objective_summary_marks_and_lists_the_front(tmp_path):
    spec, study = _study(tmp_path, MULTI, TRIALS)
    text = summary_table(study, spec)
    lines = text.splitlines()
    assert lines[0].split() == ["trial", "state", "val_fd_ratio", "val_ssim", "front", "precision", "memorised",
                                "rule", "seconds", "params"]
    assert lines[2].split()[:5] == ["1", "COMPLETE", "1.5000", "0.7000", "*"]
    assert lines[1].split()[4] != "*" and lines[4].split()[1] == "FAIL"
    assert "Pareto front (2 trials; val_fd_ratio minimize, val_ssim maximize):" in text
    assert "  trial 1: val_fd_ratio=1.5000, val_ssim=0.7000  [train.lr=0.002]" in text
    assert "trial 1 does not meet the promotion rule: val_memorised=0.2 fails <= 0.05" in text
    assert "trial 3 failed: promotion rule needs val_fd_ratio" in text


def test_pareto_rows_csv_and_plot(tmp_path):
    spec, study = _study(tmp_path, MULTI, TRIALS)
    rows = front_rows(study, spec)
    assert rows == [{"trial": 1, "val_fd_ratio": 1.5, "val_ssim": 0.7, "train.lr": 0.002},
                    {"trial": 2, "val_fd_ratio": 3.0, "val_ssim": 0.8, "train.lr": 0.003}]
    assert front_csv(rows).splitlines()[0] == "trial,val_fd_ratio,val_ssim,train.lr"
    fig = plot_front(study, spec)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "val_fd_ratio (lower is better)" and ax.get_ylabel() == "val_ssim (higher is better)"
    assert sorted(t.get_text() for t in ax.texts) == ["1", "2"]


def test_single_objective_summary_has_sample_columns_and_no_front(tmp_path):
    trials = [(lr, None if v is None else v[:1], m, f) for lr, v, m, f in TRIALS]
    spec, study = _study(tmp_path, "{metric: val_fd_ratio, direction: minimize}", trials)
    text = summary_table(study, spec)
    assert text.splitlines()[0].split()[:6] == ["trial", "state", "val_fd_ratio", "ssim", "precision", "memorised"]
    assert "Pareto" not in text and plot_front(study, spec) is None


@pytest.mark.parametrize("metrics,expected", [
    ({"final_ssim": 0.8, "final_fd_ratio": 2.4}, "met"),
    ({"final_ssim": 0.7, "final_fd_ratio": 2.4}, "NOT met: ssim 0.7 misses >= 0.75"),
    ({"final_val_ssim": 0.8}, "NOT met: fd_ratio not recorded"),
])
def test_verdict_against_the_demo_targets(metrics, expected):
    assert verdict(metrics, DEMO_TARGETS) == expected
