"""The study's MLflow parent run (created once, shared by all workers) and its end-of-study summary."""

from __future__ import annotations

import logging
import warnings

import optuna
from optuna.trial import TrialState

from mrigen.tune.study import StudySpec

__all__ = ["ensure_parent_run", "summarise", "summary_table"]

log = logging.getLogger(__name__)
PARENT_ATTR = "mlflow_parent_run_id"


def ensure_parent_run(study: optuna.Study, spec: StudySpec, tracking_uri: str, experiment: str) -> str:
    """Return the study's parent run id, creating it once even when several workers start together.

    Racing workers may each create a parent run; all then pick the oldest one with the study's tags, delete
    their own if it lost, and record the winner in the study's user attributes.
    """
    from mlflow import MlflowClient

    from mrigen.tracking import get_or_create_experiment

    existing = study.user_attrs.get(PARENT_ATTR)
    if existing:
        return existing
    client = MlflowClient(tracking_uri)
    exp_id = _with_retries(lambda: get_or_create_experiment(client, experiment), "open the MLflow tracking store")
    tags = {"mrigen.role": "study-parent", "optuna.study": spec.name, "mlflow.note.content": spec.description}
    mine = client.create_run(exp_id, run_name=f"{spec.name}-study", tags=tags).info.run_id
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`mrigen.role` = 'study-parent' and tags.`optuna.study` = '{spec.name}'",
        order_by=["attributes.start_time ASC"], max_results=50)
    winner = sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))[0].info.run_id
    if winner != mine:
        client.delete_run(mine)
    else:
        client.log_batch(mine, params=[
            _param("study.family", spec.family), _param("study.metric", spec.metric),
            _param("study.direction", spec.direction), _param("study.file", spec.path.name)])
    study.set_user_attr(PARENT_ATTR, winner)
    return winner


def _with_retries(fn, what: str, attempts: int = 5):
    """Run `fn`, retrying when workers starting together race to create a local (SQLite) tracking schema."""
    import random
    import time

    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts):
        try:
            return fn()
        except (MlflowException, SQLAlchemyError) as exc:
            if attempt + 1 == attempts:
                raise
            log.info("could not %s yet (%s); retrying", what, str(exc).splitlines()[0][:200])
            time.sleep(0.5 + random.random() * (attempt + 1))
    raise AssertionError("unreachable")


def _param(key: str, value):
    """An MLflow Param with the value as a string."""
    from mlflow.entities import Param

    return Param(key, str(value))


def summary_table(study: optuna.Study) -> str:
    """A plain-text table of every trial: number, state, value, duration, params."""
    rows = ["trial  state     value     seconds  params"]
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        value = "-" if t.value is None else f"{t.value:.4f}"
        secs = "-" if t.duration is None else f"{t.duration.total_seconds():.1f}"
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        rows.append(f"{t.number:5d}  {t.state.name:8s}  {value:>8s}  {secs:>7s}  {params}")
    return "\n".join(rows)


def summarise(study: optuna.Study, tracking_uri: str, parent_run_id: str, status: str = "FINISHED") -> None:
    """Log best params/value, trial counts and Optuna's plots to the parent run, then set its status."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient
    import time

    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    now = int(time.time() * 1000)
    metrics = [Metric(f"n_{s.name.lower()}", states.count(s), now, 0)
               for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if completed:
        best = study.best_trial
        metrics.append(Metric("best_value", best.value, now, 0))
        metrics.append(Metric("best_trial", best.number, now, 0))
        client.set_tag(parent_run_id, "best_params", str(best.params))
        client.set_tag(parent_run_id, "best_trial_run_id", best.user_attrs.get("mlflow_run_id", ""))
    client.log_batch(parent_run_id, metrics=metrics)
    client.log_text(parent_run_id, summary_table(study), "study_summary.txt")
    plots = {"optimization_history": optuna.visualization.matplotlib.plot_optimization_history}
    if len(completed) >= 2:
        plots["parallel_coordinate"] = optuna.visualization.matplotlib.plot_parallel_coordinate
        if len(study.best_trial.params) >= 2:
            plots["param_importances"] = optuna.visualization.matplotlib.plot_param_importances
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as exc:   # e.g. importances need varied params
                log.warning("study plot %s skipped: %s", name, exc)
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(9, 5)
        client.log_figure(parent_run_id, fig, f"study/{name}.png")
        plt.close(fig)
    client.set_terminated(parent_run_id, status=status)
