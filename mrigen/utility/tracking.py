"""Utility results into MLflow: a run nested under the model's training run, and tags on the model version.

The nested run holds the config as params, one metric per arm (`utility_<task>_<arm>_mean` / `_std`) and the
summary numbers, and three artifacts under `utility/`: the markdown table, the full result as JSON and the plot
of the score against the synthetic count. The registered version (when the model came from `models:/`) gets
`utility.<task>` (a JSON summary that `python -m mrigen.registry show` prints) and `metric.utility_<task>_gain`
/ `metric.utility_<task>_tstr_ratio`, which promotion rules can `--require` like any recorded metric.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException

from mrigen.tracking.client import TrackingError, error_line, make_client

from .report import plot, summary, table
from .runner import UtilityResult

__all__ = ["UTILITY_TAG_PREFIX", "arm_key", "log_utility", "version_tags"]

UTILITY_TAG_PREFIX = "utility."


def arm_key(arm: str, synthetic: int) -> str:
    """MLflow-safe name of an arm: real, real_classic, real_synthetic_1000, synthetic."""
    key = arm.replace("+", "_")
    return f"{key}_{synthetic}" if arm == "real+synthetic" else key


def version_tags(result: UtilityResult, run_id: str | None) -> dict[str, str]:
    """The registry tags of one result."""
    s = summary(result)
    short = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in s.items()}
    tags = {f"{UTILITY_TAG_PREFIX}{result.task}": json.dumps({**short, "run_id": run_id}, sort_keys=True)}
    for key in ("gain", "tstr_ratio"):
        if math.isfinite(float(s[key])):
            tags[f"metric.utility_{result.task}_{key}"] = repr(float(s[key]))
    return tags


def log_utility(result: UtilityResult, *, parent_run_id: str, model_name: str | None = None,
                model_version: str | None = None, tracking_uri: str | None = None, model_uri: str = "") -> str:
    """Log `result` as a run nested under `parent_run_id` (same experiment) and tag the model version.

    Returns:
        The new run's id.

    Raises:
        TrackingError: unknown parent run, or the tracking server refused a write.
    """
    client, _ = make_client(tracking_uri, announce=False)
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as exc:
        raise TrackingError(f"cannot nest the utility run under run {parent_run_id}: {error_line(exc)}") from None
    s = summary(result)
    tags = {"mlflow.parentRunId": parent_run_id, "mrigen.kind": "utility", "mrigen.utility.task": result.task,
            "mrigen.utility.label_source": result.label_source, "mrigen.utility.verdict": s["verdict"],
            "mrigen.utility.model": model_uri}
    try:
        run = client.create_run(parent.info.experiment_id, run_name=f"utility-{result.task}", tags=tags)
        rid = run.info.run_id
        try:
            for k, v in result.config.items():
                client.log_param(rid, f"utility.{k}", str(v))
            for k in ("n_real_subjects", "n_real_slices", "n_test_subjects", "n_test_slices", "image_size"):
                client.log_param(rid, f"utility.{k}", str(getattr(result, k)))
            for a in result.arms:
                client.log_metric(rid, f"utility_{result.task}_{arm_key(a.arm, a.synthetic)}_mean", a.mean)
                client.log_metric(rid, f"utility_{result.task}_{arm_key(a.arm, a.synthetic)}_std", a.std)
                for n_seed, v in enumerate(a.scores):          # the seed index as the step: the spread is visible
                    client.log_metric(rid, f"utility_{result.task}_{arm_key(a.arm, a.synthetic)}", v, step=n_seed)
            for k in ("chance", "gain", "tstr_ratio"):
                client.log_metric(rid, f"utility_{result.task}_{k}", float(s[k]))
            client.log_metric(rid, f"utility_{result.task}_learnable", float(s["learnable"]))
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                (folder / f"utility_{result.task}.md").write_text(table(result, model_uri) + "\n")
                (folder / f"utility_{result.task}.json").write_text(json.dumps(result.to_dict(), indent=1))
                plot(result, folder / f"utility_{result.task}.png")
                for f in sorted(folder.iterdir()):
                    client.log_artifact(rid, str(f), artifact_path="utility")
            client.set_terminated(rid, "FINISHED")
        except BaseException:
            client.set_terminated(rid, "FAILED")
            raise
        if model_name and model_version:
            for k, v in version_tags(result, rid).items():
                client.set_model_version_tag(model_name, str(model_version), k, v)
    except MlflowException as exc:
        raise TrackingError(f"could not log the utility run: {error_line(exc)}") from None
    return rid
