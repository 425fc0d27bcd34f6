"""Trial plumbing without training: objective values, trial metrics, promotion outcomes, pruning reports, and
riding out a restarting storage database."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from mrigen.registry.rule import MissingMetricError, PromotionRule
from mrigen.tune import objective
from mrigen.tune.objective import PruningHook, objective_value, trial_metrics
from mrigen.tune.promotion import Outcome


def test_objective_prefers_final_evaluation_then_last_epoch():
    history = [{"val_ssim": 0.1}, {"val_ssim": 0.2}]
    assert objective_value("val_ssim", {"ssim": 0.5}, history) == 0.5
    assert objective_value("val_ssim", {}, history) == 0.2
    with pytest.raises(KeyError, match="val_psnr"):
        objective_value("val_psnr", {}, history)


def test_storage_retry_rides_out_connection_errors(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("UPDATE trials", {}, Exception("server closed the connection unexpectedly"))
        return "ok"

    assert objective._storage_retry(flaky, "report") == "ok" and len(calls) == 3


def test_storage_retry_does_not_hide_other_database_errors(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)

    def broken():
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):
        objective._storage_retry(broken, "report")


def test_storage_retry_gives_up_after_its_budget(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)

    def down():
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    with pytest.raises(OperationalError):
        objective._storage_retry(down, "report", retry_for_s=0.0)


def test_storage_retry_unwraps_optunas_storage_error(monkeypatch):
    """Optuna re-raises a failed commit as StorageInternalError from the driver's OperationalError."""
    from optuna.exceptions import StorageInternalError

    monkeypatch.setattr("time.sleep", lambda s: None)
    calls = []

    def commit_while_db_restarts():
        calls.append(1)
        if len(calls) == 1:
            try:
                raise OperationalError("COMMIT", {}, Exception("the database system is shutting down"))
            except OperationalError as exc:
                raise StorageInternalError("An exception is raised during the commit.") from exc
        return "ok"

    assert objective._storage_retry(commit_while_db_restarts, "report") == "ok" and len(calls) == 2


def test_sample_objective_missing_is_a_clear_error_naming_it():
    with pytest.raises(MissingMetricError) as err:
        objective_value("val_fd_ratio", {"ssim": 0.5, "psnr": 20.0}, [{"val_ssim": 0.4, "val_fd_ratio": 9.0}])
    message = str(err.value)
    assert "'val_fd_ratio'" in message and "final evaluation" in message and "ssim" in message
    assert "\n" not in message
    assert objective_value("val_fd_ratio", {"fd_ratio": 1.5}, []) == 1.5


def test_trial_metrics_use_study_names_and_prefer_the_final_evaluation():
    got = trial_metrics({"ssim": 0.7, "fd_ratio": 2.0, "bad": float("nan")}, [{"val_ssim": 0.6, "val_loss": 3.0,
                                                                              "train_loss": 4.0}])
    assert got == {"val_ssim": 0.7, "val_loss": 3.0, "val_fd_ratio": 2.0}


def test_promotion_rule_requirements_and_missing_metrics():
    rule = PromotionRule.parse({"metric": "val_fd_ratio", "require": {"val_ssim": ">= 0.6",
                                                                      "val_memorised": "<= 0.05"}})
    assert rule.direction == "minimize" and rule.looks_at_samples
    assert Outcome.of(rule, {"val_fd_ratio": 1.5, "val_ssim": 0.7, "val_memorised": 0.0}).failures == ()
    outcome = Outcome.of(rule, {"val_fd_ratio": 1.2, "val_ssim": 0.7, "val_memorised": 0.3})
    assert outcome.value == 1.2 and outcome.failures == ("val_memorised=0.3 fails <= 0.05",)
    with pytest.raises(MissingMetricError, match="val_memorised"):
        Outcome.of(rule, {"val_fd_ratio": 1.2, "val_ssim": 0.7})
    assert PromotionRule.from_json(rule.to_json()) == rule


class _Trial:
    """Records what the pruning hook reports."""

    def __init__(self):
        self.reported = []

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return False


def test_pruning_metric_is_reported_in_the_studys_direction():
    trial = _Trial()
    PruningHook(trial, "val_ssim", sign=-1.0).on_epoch_end(None, 0, {"val_ssim": 0.7})
    PruningHook(trial, "val_ssim").on_epoch_end(None, 1, {"val_ssim": 0.8})
    PruningHook(trial, "val_ssim").on_epoch_end(None, 2, {"val_loss": 1.0})      # absent: nothing reported
    assert trial.reported == [(0, -0.7), (1, 0.8)]
