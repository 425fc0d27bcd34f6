"""Downstream tasks built from a store's per-slice labels, and how each is scored.

| task | kind | label | score | better |
| --- | --- | --- | --- | --- |
| `slice_pos` | regression | position in the axial band, [0, 1] | mean absolute error | lower |
| `site` | classification | acquisition site | accuracy | higher |
| `age` | regression | years | mean absolute error (years) | lower |
| `sex` | classification | F / M | accuracy | higher |
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from mrigen.metrics.probe import SEXES, label_info

__all__ = ["TASKS", "Task", "Labels", "get_task", "chance_score", "subject_floor"]


@dataclass(frozen=True)
class Task:
    """A downstream task: what to predict from a slice and how to score it."""

    name: str
    kind: str               # "regression" | "classification"
    metric: str             # "mae" | "acc"

    @property
    def greater_is_better(self) -> bool:
        return self.metric == "acc"

    def better(self, a: float, b: float) -> float:
        """How much better score `a` is than `b` (positive = better), whatever the direction."""
        return a - b if self.greater_is_better else b - a


TASKS = {t.name: t for t in (Task("slice_pos", "regression", "mae"), Task("site", "classification", "acc"),
                             Task("age", "regression", "mae"), Task("sex", "classification", "acc"))}


def get_task(name: str, train_rows: list[dict[str, Any]], store_name: str = "the store") -> Task:
    """The task `name`, checked against the labels the store carries.

    Raises:
        ValueError: unknown task, or the store does not carry its attribute (with two or more values).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (allowed: {', '.join(TASKS)})")
    present = label_info(train_rows)["attributes"]
    if name not in present:
        raise ValueError(f"task {name!r} needs the {name!r} attribute, which {store_name} does not carry with two or "
                         f"more values (it carries: {', '.join(present) or 'none'})")
    return TASKS[name]


@dataclass(frozen=True)
class Labels:
    """Encoding of one task's labels: class names, or the standardisation of a regression target."""

    task: Task
    classes: tuple[str, ...] = ()
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, task: Task, rows: list[dict[str, Any]]) -> "Labels":
        """From the full training split (fixed for every arm of a run)."""
        if task.kind == "classification":
            names = SEXES if task.name == "sex" else tuple(sorted({str(r[task.name]) for r in rows
                                                                  if r.get(task.name) is not None}))
            return cls(task, classes=tuple(names))
        vals = [float(r[task.name]) for r in rows if _known(r.get(task.name))]
        return cls(task, mean=statistics.fmean(vals), std=max(statistics.pstdev(vals), 1e-6))

    @property
    def n_out(self) -> int:
        return len(self.classes) if self.task.kind == "classification" else 1

    def encode(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets (N,), known (N,) bool): class indices (int64) or standardised values (float32)."""
        a = self.task.name
        if self.task.kind == "classification":
            idx = [self.classes.index(str(r[a])) if _known(r.get(a)) and str(r[a]) in self.classes else -1
                   for r in rows]
            t = torch.tensor(idx, dtype=torch.int64)
            return t.clamp_min(0), t >= 0
        vals = [(float(r[a]) - self.mean) / self.std if _known(r.get(a)) else math.nan for r in rows]
        t = torch.tensor(vals, dtype=torch.float32)
        return torch.nan_to_num(t), ~torch.isnan(t)

    def score(self, out: torch.Tensor, rows: list[dict[str, Any]]) -> float:
        """Accuracy of logits `(N, C)` or MAE (original units) of standardised predictions `(N,)` against rows."""
        target, known = self.encode(rows)
        out, target, known = out.cpu(), target, known
        if not bool(known.any()):
            raise ValueError(f"no test row has a {self.task.name!r} label")
        if self.task.kind == "classification":
            return float((out.argmax(1)[known] == target[known]).float().mean())
        return float(((out[known] - target[known]).abs() * self.std).mean())


def chance_score(labels: Labels, train_rows: list[dict[str, Any]], test_rows: list[dict[str, Any]]) -> float:
    """Score of a model that ignores the image: the training majority class, or the training median value."""
    a = labels.task.name
    known_test = [r for r in test_rows if _known(r.get(a))]
    if labels.task.kind == "classification":
        majority = Counter(str(r[a]) for r in train_rows if _known(r.get(a))).most_common(1)[0][0]
        return sum(str(r[a]) == majority for r in known_test) / len(known_test)
    median = statistics.median(float(r[a]) for r in train_rows if _known(r.get(a)))
    return statistics.fmean(abs(float(r[a]) - median) for r in known_test)


def subject_floor(labels: Labels, train_rows: list[dict[str, Any]], test_rows: list[dict[str, Any]]) -> float:
    """Standard error of the chance score over the test subjects (the test set's own sampling noise).

    Slices of one subject share their label, so the test set holds as many independent labels as subjects: a
    score within this of chance cannot be told from it, however small the seed spread.
    """
    a = labels.task.name
    per_subject: dict[str, list[float]] = {}
    if labels.task.kind == "classification":
        majority = Counter(str(r[a]) for r in train_rows if _known(r.get(a))).most_common(1)[0][0]
        for r in test_rows:
            if _known(r.get(a)):
                per_subject.setdefault(str(r.get("subject")), []).append(float(str(r[a]) == majority))
    else:
        median = statistics.median(float(r[a]) for r in train_rows if _known(r.get(a)))
        for r in test_rows:
            if _known(r.get(a)):
                per_subject.setdefault(str(r.get("subject")), []).append(abs(float(r[a]) - median))
    means = [statistics.fmean(v) for v in per_subject.values()]
    if len(means) < 2:
        return 0.0
    return statistics.stdev(means) / math.sqrt(len(means))


def _known(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))
