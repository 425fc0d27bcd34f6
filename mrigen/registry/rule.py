"""Promotion rules: which metric ranks registered versions, and which conditions a version must meet first.

    rule = PromotionRule.parse({"metric": "val_fd_ratio", "direction": "minimize",
                                "require": {"val_ssim": ">= 0.6", "val_memorised": "<= 0.05"}})
    value, failures = rule.evaluate({"fd_ratio": 1.8, "ssim": 0.71, "memorised": 0.0})   # -> 1.8, []

Metric names are the study names (`val_<metric>`). Values are looked up under the names the trainer and the
registry record them by: the final evaluation's `fd_ratio`, a per-epoch `val_ssim`, a run's `final_fd_ratio`
(see `find_metric`). Sample metrics (`fd_ratio`, `precision`, ...) come from the final evaluation only; their
real-vs-real baselines (`*_real`) describe the data, not the model, and cannot rank or gate a model.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["SAMPLE_METRICS", "FINAL_ONLY_METRICS", "KNOWN_DIRECTIONS", "Condition", "PromotionRule",
           "MissingMetricError", "RuleError", "DEFAULT_RULE", "find_metric", "short_name", "is_sample_metric", "is_baseline",
           "is_utility_metric", "known_direction"]

# Metrics of generated samples (the final evaluation computes them; no per-epoch value exists).
SAMPLE_METRICS = ("fd", "fd_ratio", "precision", "recall", "diversity", "hf_ratio", "memorised")
# Only the final evaluation produces these (sample metrics, MS-SSIM and the reconstructions' fine detail);
# everything else `val_*` is per-epoch too.
FINAL_ONLY_METRICS = (*SAMPLE_METRICS, "ms_ssim", "recon_hf_ratio")
# Which way is better, where it is unambiguous (diversity and hf_ratio are read against their real baselines, ~1
# for hf_ratio: no direction).
KNOWN_DIRECTIONS = {"ssim": "maximize", "psnr": "maximize", "ms_ssim": "maximize", "loss": "minimize",
                    "recon": "minimize", "fd": "minimize", "fd_ratio": "minimize", "memorised": "minimize",
                    "precision": "maximize", "recall": "maximize"}
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


class RuleError(ValueError):
    """An invalid promotion rule; `key` names the offending entry (`metric`, `require.val_ssim`, ...)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


class MissingMetricError(KeyError):
    """A metric a study or rule needs was not produced; the message names it and what was there."""

    def __str__(self) -> str:              # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def short_name(metric: str) -> str:
    """`val_fd_ratio` / `final_fd_ratio` / `final_val_ssim` -> `fd_ratio` / `ssim`."""
    name = metric.removeprefix("final_")
    return name.removeprefix("val_")


def is_utility_metric(metric: str) -> bool:
    """True for the augmentation-utility metrics a study's `utility` run adds (`val_utility_site_gain`, ...)."""
    return short_name(metric).startswith("utility_")


def is_sample_metric(metric: str) -> bool:
    """True for metrics of generated samples (`val_fd_ratio`, `val_precision`, ..., and the augmentation utility of
    the samples, `val_utility_<task>_gain`), baselines excluded."""
    return short_name(metric) in SAMPLE_METRICS or is_utility_metric(metric)


def is_baseline(metric: str) -> bool:
    """True for real-vs-real baselines (`val_fd_real`, `val_precision_real`, ...)."""
    return short_name(metric).endswith("_real")


def known_direction(metric: str) -> str | None:
    """'maximize' / 'minimize' where the metric has an unambiguous better direction, else None."""
    if is_utility_metric(metric) and short_name(metric).endswith(("_gain", "_tstr_ratio")):
        return "maximize"                  # gain is signed so that positive = better, whatever the task's metric
    return KNOWN_DIRECTIONS.get(short_name(metric))


def find_metric(metrics: Mapping[str, Any], name: str) -> float | None:
    """The value of study metric `name` in `metrics`, under any name the trainer or registry records it by.

    Tries `name`, then the short name (`fd_ratio`), then the `final_` forms a run logs. Returns None if absent.
    """
    short = short_name(name)
    for key in (name, short, f"val_{short}", f"final_{short}", f"final_val_{short}"):
        value = metrics.get(key)
        if value is not None:
            return float(value)
    return None


@dataclass(frozen=True)
class Condition:
    """One `require` entry: `metric op threshold`, e.g. `val_ssim >= 0.6`."""

    metric: str                            # study metric name, e.g. val_ssim
    op: str                                # one of >=, <=, >, <
    threshold: float

    @classmethod
    def parse(cls, metric: str, text: Any) -> "Condition":
        """Parse `">= 0.6"`; raises ValueError naming the metric and the accepted form."""
        raw = str(text).strip()
        for op in sorted(_OPS, key=len, reverse=True):
            if raw.startswith(op):
                try:
                    threshold = float(raw[len(op):])
                except ValueError:
                    break
                if math.isfinite(threshold):
                    return cls(metric, op, threshold)
                break
        raise ValueError(f"{metric}: {text!r} must be a comparison such as '>= 0.6' or '<= 0.05' "
                         f"(operators {', '.join(_OPS)})")

    @classmethod
    def parse_expr(cls, text: str) -> "Condition":
        """Parse `"val_ssim>=0.6"` (the registry CLI's --require); raises ValueError naming the accepted form."""
        for op in sorted(_OPS, key=len, reverse=True):
            metric, sep, rest = text.partition(op)
            if sep and metric.strip().startswith("val_"):
                return cls.parse(metric.strip(), f"{op} {rest.strip()}")
        raise ValueError(f"--require {text!r}: expected METRIC OP VALUE such as 'val_ssim>=0.6'")

    def holds(self, value: float) -> bool:
        return math.isfinite(value) and _OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


@dataclass(frozen=True)
class PromotionRule:
    """Rank versions on `metric` in `direction`; only versions meeting every `require` condition compete."""

    metric: str = "val_fd_ratio"
    direction: str = "minimize"
    require: tuple[Condition, ...] = field(default_factory=tuple)

    @property
    def greater_is_better(self) -> bool:
        return self.direction == "maximize"

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric the rule reads: the ranking metric, then the required ones."""
        return (self.metric, *(c.metric for c in self.require))

    @property
    def looks_at_samples(self) -> bool:
        return any(is_sample_metric(m) for m in self.metrics)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> "PromotionRule":
        """From `{metric, direction, require: {metric: "op value"}}`; raises RuleError naming the bad key."""
        extra = set(raw) - {"metric", "direction", "require"}
        if extra:
            raise RuleError(",".join(sorted(map(str, extra))), "unknown key(s); allowed: metric, direction, require")
        metric = raw.get("metric", cls.metric)
        if not isinstance(metric, str) or not metric.startswith("val_") or is_baseline(metric):
            raise RuleError("metric", f"{metric!r} must be a validation metric val_* of the model (not a *_real "
                                      f"baseline)")
        direction = raw.get("direction") or known_direction(metric)
        if direction is None:
            raise RuleError("direction", f"{metric} has no better way that mrigen knows (it is read against its real "
                                         "baseline); state direction: maximize or minimize")
        if direction not in ("maximize", "minimize"):
            raise RuleError("direction", f"{direction!r} must be maximize or minimize")
        if known_direction(metric) not in (None, direction):
            raise RuleError("direction", f"{direction!r} is the wrong way for {metric} "
                                         f"(better is {known_direction(metric)})")
        require = raw.get("require") or {}
        if not isinstance(require, Mapping):
            raise RuleError("require", "expected a mapping such as {val_ssim: '>= 0.6'}")
        conditions = []
        for name, text in require.items():
            if not isinstance(name, str) or not name.startswith("val_") or is_baseline(name):
                raise RuleError(f"require.{name}", "must be a validation metric val_* of the model "
                                                   "(not a *_real baseline)")
            try:
                conditions.append(Condition.parse(name, text))
            except ValueError:
                raise RuleError(f"require.{name}", f"{text!r} must be a comparison such as '>= 0.6' or '<= 0.05' "
                                                   f"(operators {', '.join(_OPS)})") from None
        return cls(metric=metric, direction=direction, require=tuple(conditions))

    def evaluate(self, metrics: Mapping[str, Any]) -> tuple[float, list[str]]:
        """The rule's ranking value and the failed conditions (empty: the model may compete for champion).

        Raises:
            MissingMetricError: a metric the rule reads is not in `metrics` (names it and lists what is there).
        """
        found = {m: find_metric(metrics, m) for m in self.metrics}
        missing = [m for m, v in found.items() if v is None]
        if missing:
            raise MissingMetricError(
                f"promotion rule needs {', '.join(missing)}, which this model's evaluation did not produce "
                f"(have: {', '.join(sorted(metrics)) or 'nothing'}); sample metrics need train.final_eval and a "
                f"model that can sample")
        failures = [f"{c.metric}={found[c.metric]:.4g} fails {c.op} {c.threshold:g}"
                    for c in self.require if not c.holds(found[c.metric])]
        value = found[self.metric]
        if not math.isfinite(value):
            failures.append(f"{self.metric}={value} is not finite")
        return value, failures

    def to_json(self) -> str:
        return json.dumps({"metric": self.metric, "direction": self.direction,
                           "require": {c.metric: f"{c.op} {c.threshold!r}" for c in self.require}})

    @classmethod
    def from_json(cls, text: str) -> "PromotionRule":
        return cls.parse(json.loads(text))

    def __str__(self) -> str:
        req = f" requiring {', '.join(map(str, self.require))}" if self.require else ""
        return f"{self.direction} {self.metric}{req}"


DEFAULT_RULE = PromotionRule()             # minimise val_fd_ratio, no further conditions
