"""Reading a `UtilityResult`: learnability, verdicts, a markdown table, a plot, and a flat summary for tags.

- **Learnable**: a real-data-only arm (real, or real + classic augmentation) beats chance (a model that ignores
  the image) by more than twice the larger of its seed spread (std over seeds) and the test set's own noise (standard error of the chance score over
  the test subjects: slices of one subject share a label). Otherwise the task is reported as not learnable
  from these images, and no gain or loss is claimed.
- **Gain / loss**: an arm's mean differs from real-only by more than the seed spread (the larger std of the
  two arms) in the better / worse direction; anything smaller is "no clear change".
- **Per seed (paired)**: the arms of one seed share its real subset, the CNN's initial weights and its batches,
  so each seed's difference from real-only isolates what the arm adds; the table shows their mean +- std and in
  how many seeds the arm did better. It is context for the verdict, which stays the unpaired rule above (a
  small gain in every seed can still be "no clear change" when the real subsets differ in difficulty by more).
- **TSTR ratio**: synthetic-only against real-only, 1 = as good: accuracy ratio, or real MAE / synthetic MAE.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runner import ArmResult, UtilityResult

__all__ = ["Paired", "learnable", "paired", "verdict", "tstr_ratio", "summary", "table", "plot"]

_METRIC = {"acc": "accuracy", "mae": "MAE"}


def _better(result: UtilityResult, a: float, b: float) -> float:
    return a - b if result.greater_is_better else b - a


def learnable(result: UtilityResult) -> bool:
    """Whether a real-data-only arm (real, or real + classic augmentation) beats chance by more than twice
    max(its seed spread, the test-subject standard error)."""
    return any(_better(result, a.mean, result.chance) > 2 * max(a.std, result.floor)
               for a in (result.arm("real"), result.arm("real+classic")))


def verdict(result: UtilityResult, arm: ArmResult) -> str:
    """"gain", "loss" or "no clear change" against real-only; "not learnable" when the task is not."""
    if not learnable(result):
        return "not learnable"
    real = result.arm("real")
    d, spread = _better(result, arm.mean, real.mean), max(arm.std, real.std)
    return "gain" if d > spread else "loss" if d < -spread else "no clear change"


@dataclass(frozen=True)
class Paired:
    """An arm against real-only, seed by seed (positive = better, in the task metric's units)."""

    mean: float       # mean of the per-seed differences
    std: float        # their std over seeds (0 for one seed)
    wins: int         # seeds in which the arm did better than real-only
    seeds: int        # seeds compared

    def __str__(self) -> str:
        return f"{self.mean:+.4f} +- {self.std:.4f}, better in {self.wins}/{self.seeds}"


def paired(result: UtilityResult, arm: ArmResult) -> Paired:
    """Per-seed differences of `arm` from real-only: both were trained with seed i's real subset, initial weights
    and batches, so the difference isolates what the arm adds (scores are in seed order).

    Raises:
        ValueError: the arm and real-only hold different numbers of seeds.
    """
    real = result.arm("real")
    if len(arm.scores) != len(real.scores):
        raise ValueError(f"arm {arm.arm!r} has {len(arm.scores)} seed scores, real-only {len(real.scores)}: "
                         f"cannot pair them")
    d = [_better(result, a, r) for a, r in zip(arm.scores, real.scores)]
    return Paired(mean=statistics.fmean(d), std=statistics.stdev(d) if len(d) > 1 else 0.0,
                  wins=sum(x > 0 for x in d), seeds=len(d))


def tstr_ratio(result: UtilityResult) -> float:
    """Synthetic-only relative to real-only (1 = as good)."""
    real, synth = result.arm("real").mean, result.arm("synthetic").mean
    if result.greater_is_better:
        return synth / real if real else 0.0
    return real / synth if synth else 0.0


def summary(result: UtilityResult) -> dict[str, Any]:
    """Flat numbers and words for MLflow metrics and registry tags (the largest synthetic count)."""
    n = max(a.synthetic for a in result.arms if a.arm == "real+synthetic")
    real, rs = result.arm("real"), result.arm("real+synthetic", n)
    synth, classic = result.arm("synthetic"), result.arm("real+classic")
    pair = paired(result, rs)
    return {"task": result.task, "metric": result.metric, "real": real.mean, "real_std": real.std,
            "real_synthetic": rs.mean, "real_synthetic_std": rs.std, "n_synthetic": n,
            "synthetic": synth.mean, "synthetic_std": synth.std, "classic": classic.mean, "classic_std": classic.std,
            "chance": result.chance, "gain": _better(result, rs.mean, real.mean), "gain_paired_std": pair.std,
            "seeds_better": pair.wins, "learnable": learnable(result),
            "verdict": verdict(result, rs), "classic_verdict": verdict(result, classic),
            "tstr_ratio": tstr_ratio(result), "label_source": result.label_source,
            "real_fraction": result.config["real_fraction"], "seeds": result.config["seeds"]}


def table(result: UtilityResult, title: str = "") -> str:
    """Markdown: one row per arm (mean +- std over seeds, difference from real-only, verdict) and the notes."""
    metric = _METRIC[result.metric] + (" (higher is better)" if result.greater_is_better else " (lower is better)")
    real = result.arm("real")
    lines = [f"### Utility: task `{result.task}`{f' - {title}' if title else ''}", "",
             f"Test: {result.n_test_slices} real slices of {result.n_test_subjects} held-out subjects. Real "
             f"training set: {result.n_real_slices} slices of {result.n_real_subjects} subjects "
             f"(F = {result.config['real_fraction']:g} of the training subjects). {result.config['seeds']} seeds; "
             f"score = {metric}, mean +- std over seeds.", "",
             "| arm | synthetic | score | vs real only | verdict | per seed vs real only (paired) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for a in result.arms:
        diff = "" if a.arm == "real" else f"{_better(result, a.mean, real.mean):+.4f}"
        v = "" if a.arm == "real" else verdict(result, a)
        pair = "" if a.arm == "real" else str(paired(result, a))
        lines.append(f"| {a.arm} | {a.synthetic or '-'} | {a.mean:.4f} +- {a.std:.4f} | {diff} | {v} | {pair} |")
    lines.append(f"| chance (ignores the image) | - | {result.chance:.4f} | "
                 f"{_better(result, result.chance, real.mean):+.4f} | test-subject s.e. {result.floor:.4f} | |")
    s = summary(result)
    lines += ["", f"- Learnable from the images: **{'yes' if s['learnable'] else 'NO'}** (real-only arms vs chance, "
                  f"margin 2 x max(seed spread, test-subject s.e. {result.floor:.4f}))."]
    if not s["learnable"]:
        lines.append(f"- `{result.task}` is not learnable from these images at this data size: the arms' "
                     f"differences are noise, and no gain or loss is claimed.")
    lines += ["- Verdict: the mean gain against the seed spread (the larger std of the two arms); the paired column "
              "is each seed's difference (same real subset, weights and batches), for context.",
              f"- TSTR ratio (synthetic only / real only): {s['tstr_ratio']:.3f}.",
              "- Synthetic labels: " + ("the requested conditions (the model is conditioned on "
                                        f"`{result.task}`)." if result.label_source == "requested" else
                                        "read back by the store's probes (the model is not conditioned on "
                                        f"`{result.task}`); probe held-out (val) scores: "
                                        + ", ".join(f"{k} {v:.3f}" for k, v in result.probe_val_scores.items())
                                        + ".")]
    return "\n".join(lines)


def plot(result: UtilityResult, path: Path | str) -> Path:
    """PNG: score vs synthetic count (0 = real only), with real+classic, synthetic-only and chance as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    real = result.arm("real")
    rs = [a for a in result.arms if a.arm == "real+synthetic"]
    xs = [0] + [a.synthetic for a in rs]
    ys = [real.mean] + [a.mean for a in rs]
    es = [real.std] + [a.std for a in rs]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label="real + synthetic")
    for a, style, name in ((result.arm("real+classic"), "--", "real + classic aug."),
                           (result.arm("synthetic"), ":", f"synthetic only (N={result.arm('synthetic').synthetic})")):
        ax.axhline(a.mean, linestyle=style, color="grey" if style == "--" else "tab:orange", label=name)
    ax.axhline(result.chance, linestyle="-.", color="tab:red", linewidth=0.8, label="chance")
    ax.set_xlabel("synthetic slices added")
    ax.set_ylabel(f"{_METRIC[result.metric]} on held-out subjects")
    ax.set_title(f"{result.task}: F={result.config['real_fraction']:g}, {result.config['seeds']} seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
