"""Trial plumbing without training: objective value lookup and riding out a restarting storage database."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from mrigen.tune import objective
from mrigen.tune.objective import objective_value


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
