"""Assertions shared by the tuning tests (imported as a plain module: pytest puts this folder on sys.path)."""

from __future__ import annotations

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState


def best_by_rule(study: optuna.Study, champion_tags: dict):
    """The completed trial that meets the promotion rule and ranks first on its metric (ties: lower number)."""
    sign = 1.0 if champion_tags["mrigen.greater_is_better"] == "True" else -1.0
    ok = [t for t in study.trials if t.state == TrialState.COMPLETE and not t.user_attrs["promotion"]["failures"]]
    return min(ok, key=lambda t: (-sign * t.user_attrs["promotion"]["value"], t.number))


def check_study(storage: str, tracking: str, study_name: str, n: int) -> None:
    study = optuna.load_study(study_name=study_name, storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= n
    assert len({t.number for t in study.trials}) == len(study.trials)
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(f"mrigen-{study_name}")
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) >= n
    assert all(r.info.status != "RUNNING" for r in children)
    champion = client.get_model_version_by_alias(f"mrigen-{study_name}", "champion")
    assert champion.run_id == best_by_rule(study, champion.tags).user_attrs["mlflow_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.metrics["n_complete"] >= 1 and parent.info.status == "FINISHED"
    # The UI opens the experiment on its runs, and shows the store in the Dataset column of parent and trials.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    stores = {(d.dataset.name, d.dataset.digest) for r in [parent, *children] for d in r.inputs.dataset_inputs}
    assert len(stores) == 1 and len(parent.inputs.dataset_inputs) == 1
