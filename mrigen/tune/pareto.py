"""The Pareto front of a multi-objective study: a table (trial, objective values, params) and a scatter plot.

Logged to the study's parent run as `study/pareto_front.json` (an MLflow table), `study/pareto_front.csv` and
`study/pareto_front.png` (first two objectives; every completed trial in grey, the front highlighted).
"""

from __future__ import annotations

import csv
import io
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mrigen.tune.study import StudySpec

__all__ = ["front", "front_rows", "front_csv", "plot_front", "log_front"]


def front(study: optuna.Study) -> list[FrozenTrial]:
    """The study's Pareto-optimal completed trials, by trial number (empty when none completed)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return sorted(study.best_trials, key=lambda t: t.number)


def front_rows(study: optuna.Study, spec: StudySpec) -> list[dict[str, Any]]:
    """One dict per front trial: `trial`, each objective metric, each param (`model.grid`, `train.lr`, ...)."""
    names = sorted({k for t in front(study) for k in t.params})
    return [{"trial": t.number, **dict(zip(spec.metrics, t.values)), **{k: t.params.get(k) for k in names}}
            for t in front(study)]


def front_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV text (header from the first row)."""
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot_front(study: optuna.Study, spec: StudySpec):
    """A matplotlib figure: first objective on x, second on y; completed trials grey, the front red and labelled.

    Returns None when the study has fewer than two objectives or no completed trial.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(spec.objectives) < 2 or not done:
        return None
    best = front(study)
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter([t.values[0] for t in done], [t.values[1] for t in done], c="0.7", s=25, label="trials")
    pts = sorted(((t.values[0], t.values[1], t.number) for t in best))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", c="tab:red", ms=7, label="Pareto front")
    for x, y, n in pts:
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    (m0, d0), (m1, d1) = ((o.metric, o.direction) for o in spec.objectives[:2])
    ax.set_xlabel(f"{m0} ({'higher' if d0 == 'maximize' else 'lower'} is better)")
    ax.set_ylabel(f"{m1} ({'higher' if d1 == 'maximize' else 'lower'} is better)")
    ax.set_title(f"{spec.name}: Pareto front ({len(best)} of {len(done)} completed trials)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def log_front(client, run_id: str, study: optuna.Study, spec: StudySpec) -> int:
    """Log the front's table (JSON table + CSV) and plot to `run_id`; returns the front's size."""
    import matplotlib.pyplot as plt

    rows = front_rows(study, spec)
    if rows:
        client.log_table(run_id, data={k: [r[k] for r in rows] for k in rows[0]},
                         artifact_file="study/pareto_front.json")
        client.log_text(run_id, front_csv(rows), "study/pareto_front.csv")
    fig = plot_front(study, spec)
    if fig is not None:
        client.log_figure(run_id, fig, "study/pareto_front.png")
        plt.close(fig)
    return len(rows)
