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


def _check_parent_exists(client, run_id: str, study_name: str, tracking_uri: str) -> None:
    """A study's parent run must be on this tracking store: a study begun with another one (another
    --tracking-uri or MLFLOW_TRACKING_URI, or a deleted mlflow.db) cannot log its trials under it."""
    from mlflow.exceptions import MlflowException

    from mrigen.tracking import redact_uri

    try:
        client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ValueError(f"study {study_name!r} logs to MLflow parent run {run_id}, which the tracking store "
                         f"{redact_uri(tracking_uri)} does not have: use the tracking URI the study began with, or "
                         f"a new --storage (or study) for this one") from None


def ensure_parent_run(study: optuna.Study, spec: StudySpec, tracking_uri: str, experiment: str,
                      store=None) -> str:
    """Return the study's parent run id, creating it once even when several workers start together.

    Racing workers may each create a parent run; all then pick the oldest one with the study's tags, delete
    their own if it lost, and record the winner in the study's user attributes. The parent logs `store` (the
    slice store) as its dataset input, the same one its trials log.
    """
    from mlflow import MlflowClient

    from mrigen.tracking import get_or_create_experiment, safety

    existing = study.user_attrs.get(PARENT_ATTR)
    client = MlflowClient(tracking_uri)
    if existing:
        _check_parent_exists(client, existing, study.study_name, tracking_uri)
        return existing
    exp_id = _with_retries(lambda: get_or_create_experiment(client, experiment), "open the MLflow tracking store")
    tags = {"mrigen.role": "study-parent", "optuna.study": spec.name, "mlflow.note.content": spec.description}
    # As for a trial's run: Ctrl-C between "the server created the run" and "its closer is registered" would
    # leave it RUNNING for ever, so the signal is held until then. Until `summarise` ends it, Ctrl-C, SIGTERM
    # or a crash of this process marks it KILLED / FAILED.
    safety.install_handlers()
    with safety.signals_deferred():
        mine = client.create_run(exp_id, run_name=f"{spec.name}-study", tags=tags).info.run_id
        safety.register_open_run(mine, lambda status, reason: _close_parent(client, mine, status, reason))
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`mrigen.role` = 'study-parent' and tags.`optuna.study` = '{spec.name}'",
        order_by=["attributes.start_time ASC"], max_results=50)
    winner = sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))[0].info.run_id
    if winner != mine:
        client.delete_run(mine)
        safety.unregister_run(mine)
    else:
        client.log_batch(mine, params=[
            _param("study.family", spec.family), _param("study.metric", ",".join(spec.metrics)),
            _param("study.direction", ",".join(spec.directions)), _param("study.file", spec.path.name),
            _param("study.promotion", str(spec.promotion))])
        if store is not None:
            from mrigen.tracking.hook import store_dataset_input

            dataset = store_dataset_input(store.path, store.digest, len(store.images("train")),
                                          len(store.images("val")))
            _with_retries(lambda: client.log_inputs(mine, datasets=[dataset]), "log the study's dataset input")
    study.set_user_attr(PARENT_ATTR, winner)
    return winner


def _close_parent(client, run_id: str, status: str, reason: str) -> None:
    """Closer for `safety`: the study stopped before its summary (Ctrl-C, SIGTERM, crash)."""
    client.set_tag(run_id, "mrigen.end_reason", reason[:5000])
    client.set_terminated(run_id, status=status)


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


SAMPLE_COLUMNS = ("val_ssim", "val_fd_ratio", "val_precision", "val_recall", "val_hf_ratio", "val_memorised")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _params(t) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())


def summary_table(study: optuna.Study, spec: StudySpec) -> str:
    """A plain-text table of every trial: number, state, objective value(s), Pareto membership (multi-objective),
    held-out recon SSIM and sample-quality metrics when the trials recorded them, whether the trial meets the
    promotion rule, duration, params; then the Pareto front, unmet promotion requirements and failure reasons."""
    from mrigen.tune.pareto import front

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    extra = [m for m in SAMPLE_COLUMNS if m not in spec.metrics
             and any(m in (t.user_attrs.get("metrics") or {}) for t in trials)]
    on_front = {t.number for t in front(study)} if spec.multi_objective else set()
    heads = ["trial", "state", *spec.metrics, *(["front"] if spec.multi_objective else []),
             *(m.removeprefix("val_") for m in extra), "rule", "seconds", "params"]
    rows, notes = [], []
    for t in trials:
        values = list(t.values) if t.values is not None else [None] * len(spec.metrics)
        metrics = t.user_attrs.get("metrics") or {}
        promo = t.user_attrs.get("promotion")
        rule = "-" if not isinstance(promo, dict) else "no" if promo.get("failures") else "ok"
        if isinstance(promo, dict) and promo.get("failures"):
            notes.append(f"trial {t.number} does not meet the promotion rule: {'; '.join(promo['failures'])}")
        if t.state == TrialState.FAIL and t.user_attrs.get("fail_reason"):
            notes.append(f"trial {t.number} failed: {t.user_attrs['fail_reason']}")
        if t.state == TrialState.PRUNED:       # Optuna's value is the last report (the pruning metric, maybe negated)
            values = [None] * len(spec.metrics)
            if t.intermediate_values:
                step = max(t.intermediate_values)
                sign = 1.0 if spec.pruner.direction == spec.direction else -1.0
                notes.append(f"trial {t.number} pruned after epoch {step + 1}: {spec.pruner.metric} "
                             f"{sign * t.intermediate_values[step]:.4f} behind the earlier trials at that epoch")
        secs = "-" if t.duration is None else f"{t.duration.total_seconds():.1f}"
        rows.append([str(t.number), t.state.name, *map(_fmt, values),
                     *(["*" if t.number in on_front else ""] if spec.multi_objective else []),
                     *(_fmt(metrics.get(m)) for m in extra), rule, secs, _params(t)])
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads) - 1)]
    lines = ["  ".join(c.rjust(w) if i else c.rjust(5) for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[-1]
             for r in [heads, *rows]]
    if spec.multi_objective:
        best = front(study)
        lines.append(f"\nPareto front ({len(best)} trial{'s' if len(best) != 1 else ''}; "
                     f"{', '.join(f'{o.metric} {o.direction}' for o in spec.objectives)}):")
        lines += [f"  trial {t.number}: " + ", ".join(f"{m}={v:.4f}" for m, v in zip(spec.metrics, t.values))
                  + f"  [{_params(t)}]" for t in best] or ["  (no completed trial)"]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def summarise(study: optuna.Study, spec: StudySpec, tracking_uri: str, parent_run_id: str,
              status: str = "FINISHED") -> None:
    """Log best params/value (or the Pareto front), trial counts and Optuna's plots to the parent run, then set
    its status."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import time

    import matplotlib.pyplot as plt
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from mrigen.tracking import safety
    from mrigen.tune.pareto import log_front

    client = MlflowClient(tracking_uri)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    now = int(time.time() * 1000)
    metrics = [Metric(f"n_{s.name.lower()}", states.count(s), now, 0)
               for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    target: dict = {}
    if spec.multi_objective:
        n_front = log_front(client, parent_run_id, study, spec)
        metrics.append(Metric("n_pareto", n_front, now, 0))
        if completed:
            client.set_tag(parent_run_id, "pareto_trials", ",".join(str(t.number) for t in study.best_trials))
        target = {"target": lambda t: t.values[0], "target_name": spec.metric}
    elif completed:
        best = study.best_trial
        metrics.append(Metric("best_value", best.value, now, 0))
        metrics.append(Metric("best_trial", best.number, now, 0))
        client.set_tag(parent_run_id, "best_params", str(best.params))
        client.set_tag(parent_run_id, "best_trial_run_id", best.user_attrs.get("mlflow_run_id", ""))
    client.log_batch(parent_run_id, metrics=metrics)
    client.log_text(parent_run_id, summary_table(study, spec), "study_summary.txt")
    plots = {"optimization_history": optuna.visualization.matplotlib.plot_optimization_history}
    if len(completed) >= 2:
        plots["parallel_coordinate"] = optuna.visualization.matplotlib.plot_parallel_coordinate
        if len(completed[0].params) >= 2:
            plots["param_importances"] = optuna.visualization.matplotlib.plot_param_importances
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                ax = plot(study, **target)
            except (ValueError, RuntimeError) as exc:   # e.g. importances need varied params
                log.warning("study plot %s skipped: %s", name, exc)
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(9, 5)
        client.log_figure(parent_run_id, fig, f"study/{name}.png")
        plt.close(fig)
    safety.unregister_run(parent_run_id)
    client.set_terminated(parent_run_id, status=status)


# Targets the champion is read against (issue 10): the embedded demo (64 px, CPU) and the GPU benchmark (128 px).
DEMO_TARGETS = (("ssim", ">=", 0.75), ("fd_ratio", "<=", 3.0))
FULL_TARGETS = {"vae": (("ssim", ">=", 0.85),), "vqvae": (("ssim", ">=", 0.92),)}
FULL_SAMPLE_TARGETS = (("fd_ratio", "<=", 2.0), ("precision", ">=", 0.7), ("recall", ">=", 0.5),
                       ("memorised", "<=", 0.0))


def verdict(metrics: dict[str, float], targets: tuple[tuple[str, str, float], ...]) -> str:
    """`met` or `NOT met: ssim 0.62 < 0.75; ...` (a target whose metric was not recorded is not met)."""
    from mrigen.registry.rule import Condition, find_metric

    misses = []
    for name, op, threshold in targets:
        v = find_metric(metrics, name)
        if v is None:
            misses.append(f"{name} not recorded")
        elif not Condition(name, op, threshold).holds(v):
            misses.append(f"{name} {v:.3g} misses {op} {threshold:g}")
    return "met" if not misses else "NOT met: " + "; ".join(misses)


def _nets(count: float | None) -> str:
    """" (under N feature networks)" when the evaluation recorded how many it averaged (older runs did not)."""
    if count is None:
        return ""
    return f" (under {count:g} feature network{'s' if count != 1 else ''})"


def champion_report(name: str, tracking_uri: str, spec: StudySpec, demo: bool) -> str:
    """What the registry's champion measured (held-out recon SSIM/PSNR, fd_ratio, precision, recall, hf_ratio,
    memorised)
    and a one-line verdict against the demo targets (`demo`) or the 128 px GPU targets."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mrigen.registry import champion
    from mrigen.registry.core import METRIC_TAG, VALUE_TAG, recorded_metrics
    from mrigen.registry.rule import find_metric

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        champ = champion(client, name)
    except MlflowException as exc:                # a registry that cannot answer must not hide the study's summary
        return f"  champion: could not read models:/{name}@champion ({str(exc).splitlines()[0][:200]})"
    if champ is None:
        return f"  champion: none registered under {name}"
    tags, m = champ.tags or {}, recorded_metrics(champ)

    def show(key: str, fmt: str = ".3f") -> str:
        v = find_metric(m, key)
        return "n/a" if v is None else format(v, fmt)

    trial = tags.get("optuna.trial_number")
    origin = f"trial {trial} of study {tags.get('optuna.study', '?')}" if trial is not None else f"run {champ.run_id}"
    targets = DEMO_TARGETS if demo else (*FULL_TARGETS.get(spec.family, ()), *FULL_SAMPLE_TARGETS)
    label = "demo targets" if demo else "GPU targets (128 px)"
    wanted = ", ".join(f"{k} {op} {v:g}" for k, op, v in targets)
    return "\n".join([
        f"champion: models:/{name}@champion = v{champ.version} ({origin}); ranked on "
        f"{tags.get(METRIC_TAG, '?')} = {float(tags.get(VALUE_TAG, 'nan')):.4f}",
        f"  held-out recon: SSIM {show('ssim')}, PSNR {show('psnr', '.1f')} dB | samples: fd_ratio "
        f"{show('fd_ratio')}{_nets(find_metric(m, 'feature_nets'))}, precision {show('precision', '.2f')}, recall {show('recall', '.2f')}, "
        f"hf_ratio {show('hf_ratio', '.2f')} (real {show('hf_ratio_real', '.2f')}), memorised {show('memorised')}",
        f"  {label} ({wanted}): {verdict(m, targets)}"])
