"""Applying a study's promotion rule to its trials: which trial may become `champion`, registering it, promoting it.

A completed trial stores its outcome under the user attribute `promotion` ({metric, value, failures}). Only a
trial with no failures competes; the registry's compare-and-set (`mrigen.registry.promote_if_better`) then decides
against the current champion, which may come from an earlier study run or another worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mrigen.registry.rule import PromotionRule
from mrigen.tune.study import StudySpec

__all__ = ["Outcome", "eligible", "best_eligible", "is_best", "best_text", "register_and_promote",
           "ensure_champion"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """A trial's standing under the promotion rule."""

    metric: str                            # the rule's ranking metric
    value: float                           # the trial's value of it
    failures: tuple[str, ...] = ()         # unmet `require` conditions; empty = may compete for champion

    @classmethod
    def of(cls, rule: PromotionRule, metrics: dict[str, float]) -> "Outcome":
        """Evaluate `rule` on a trial's metrics (raises MissingMetricError naming an absent metric)."""
        value, failures = rule.evaluate(metrics)
        return cls(rule.metric, value, tuple(failures))

    def as_attr(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "failures": list(self.failures)}


def _outcome(trial: FrozenTrial) -> Outcome | None:
    raw = trial.user_attrs.get("promotion")
    if not isinstance(raw, dict) or "value" not in raw:
        return None
    return Outcome(raw["metric"], float(raw["value"]), tuple(raw.get("failures") or ()))


def eligible(study: optuna.Study, spec: StudySpec) -> list[tuple[FrozenTrial, float]]:
    """Completed trials that meet the rule's requirements, with their ranking value (trials of an older rule,
    ranked on another metric, are left out)."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        o = _outcome(t)
        if o is not None and not o.failures and o.metric == spec.promotion.metric:
            out.append((t, o.value))
    return out


def best_eligible(study: optuna.Study, spec: StudySpec) -> FrozenTrial | None:
    """The completed trial the rule ranks first (ties: the lower trial number), or None."""
    sign = 1.0 if spec.promotion.greater_is_better else -1.0
    ranked = sorted(eligible(study, spec), key=lambda tv: (-sign * tv[1], tv[0].number))
    return ranked[0][0] if ranked else None


def is_best(study: optuna.Study, spec: StudySpec, outcome: Outcome) -> bool:
    """True if `outcome` beats every eligible completed trial of the study (the registry decides the rest)."""
    best = best_eligible(study, spec)
    if best is None:
        return True
    theirs = _outcome(best).value
    return outcome.value > theirs if spec.promotion.greater_is_better else outcome.value < theirs


def best_text(study: optuna.Study, spec: StudySpec) -> str:
    """The study's best so far, for progress lines: `val_ssim=0.7123`, or the Pareto front's size."""
    if spec.multi_objective:
        n = len(study.best_trials) if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else 0
        return f"Pareto front of {n}" if n else "-"
    try:
        return f"{spec.metric}={study.best_value:.4f}"
    except ValueError:                     # no completed trial yet
        return "-"


def register_and_promote(run_id: str, name: str, spec: StudySpec, outcome: Outcome, trial_number: int,
                         tracking_uri: str) -> tuple[str, bool]:
    """Register the trial's model under `name` (unless already registered) and offer it for `champion`.

    Returns:
        (version, promoted). A promotion the registry refuses (e.g. the champion was ranked on another metric and
        recorded no value of this one) is logged, not raised: the version stays registered.
    """
    from mlflow import MlflowClient

    from mrigen.registry import RegistryError, promote_if_better, register

    rule = spec.promotion
    existing = MlflowClient(tracking_uri, registry_uri=tracking_uri).search_model_versions(
        f"name = '{name}' and run_id = '{run_id}'")
    version = str(existing[0].version) if existing else register(
        run_id, name, metric=rule.metric, value=outcome.value, greater_is_better=rule.greater_is_better,
        require=rule.require, tracking_uri=tracking_uri,
        tags={"optuna.study": spec.name, "optuna.trial_number": str(trial_number),
              "mrigen.promotion_rule": rule.to_json()})
    try:
        promoted = promote_if_better(name, version, metric=rule.metric, greater_is_better=rule.greater_is_better,
                                     require=rule.require, tracking_uri=tracking_uri)
    except RegistryError as exc:
        log.warning("registered %s version %s but did not promote it: %s", name, version, exc)
        return version, False
    # the end-of-study offer of a version registered during the study repeats nothing at INFO
    log.log(logging.DEBUG if existing else logging.INFO, "registered %s version %s (%s=%.4f)%s", name, version,
            rule.metric, outcome.value, "; now champion" if promoted else "")
    return version, promoted


def ensure_champion(study: optuna.Study, spec: StudySpec, name: str, tracking_uri: str) -> FrozenTrial | None:
    """At the end of a study: make sure the trial the rule ranks first is registered and offered for champion
    (its worker may have died between training and registering). Returns that trial, or None if none qualifies."""
    best = best_eligible(study, spec)
    run_id = best.user_attrs.get("mlflow_run_id") if best is not None else None
    if run_id:
        register_and_promote(run_id, name, spec, _outcome(best), best.number, tracking_uri)
    return best
