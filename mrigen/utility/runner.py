"""The protocol: four arms, several seeds, all scored on the real test split (held-out subjects only).

(a) `real`: a fraction F of the training subjects; (b) `real+synthetic` for each synthetic count N: the same
real slices plus N generated ones; (c) `synthetic`: the largest synthetic set alone ("train on synthetic, test
on real"); (d) `real+classic`: the same real slices with flips, small affines and intensity changes. Seed i
draws the real subset, the CNN's initial weights and its batches; every arm of seed i shares them.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .arms import classic_augment, model_conditions, real_subset, synthetic_set
from .cnn import fit_and_predict
from .config import UtilityConfig
from .tasks import Labels, chance_score, get_task, subject_floor

__all__ = ["ArmResult", "UtilityResult", "run_utility"]

log = logging.getLogger(__name__)


@dataclass
class ArmResult:
    """Scores of one arm over the seeds."""

    arm: str                      # "real", "real+synthetic", "synthetic", "real+classic"
    synthetic: int                # synthetic slices in its training set (0 for real / real+classic)
    scores: list[float]           # one per seed, same order as the seeds

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0


@dataclass
class UtilityResult:
    """Everything a report needs: the config, the arms, the chance level and where the labels came from."""

    config: dict[str, Any]
    task: str
    metric: str                   # "acc" or "mae"
    greater_is_better: bool
    chance: float                 # score of a model that ignores the image
    floor: float                  # standard error of the chance score over the test subjects
    arms: list[ArmResult]
    label_source: str             # "requested" or "probe"
    model_conditions: list[str]
    n_real_subjects: int
    n_real_slices: int
    n_test_subjects: int
    n_test_slices: int
    image_size: int
    probe_val_scores: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0

    def arm(self, name: str, synthetic: int | None = None) -> ArmResult:
        for a in self.arms:
            if a.arm == name and (synthetic is None or a.synthetic == synthetic):
                return a
        raise KeyError(f"no arm {name!r} with {synthetic} synthetic slices")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for a, src in zip(d["arms"], self.arms):
            a.update(mean=src.mean, std=src.std)
        return d


def run_utility(model: torch.nn.Module, store, cfg: UtilityConfig, *, probes=None,
                device: torch.device | str = "cpu", progress: bool = True) -> UtilityResult:
    """Run the protocol for `cfg.task` on `store` with synthetic slices from `model`.

    Args:
        model: the generator under test (unconditional, or conditioned via `model.cfg.conditions`).
        store: slice store with train and test splits (test subjects disjoint from train).
        cfg: protocol settings.
        probes: labels unconditioned synthetic slices; default `get_probes(store)` (trained once, cached).
        device: where the downstream CNNs train.
        progress: print one line per trained CNN to stderr.

    Raises:
        ValueError: unknown task, a task attribute the store lacks, a test subject that is also a training
            subject, a model whose image size differs from the store's.
    """
    import sys

    t0 = time.perf_counter()
    device = torch.device(device)
    train_rows, test_rows = store.slices("train"), store.slices(cfg.eval_split)
    task = get_task(cfg.task, train_rows, f"store {store.path}")
    overlap = {r["subject"] for r in train_rows} & {r["subject"] for r in test_rows}
    if overlap:
        raise ValueError(f"store {store.path}: {cfg.eval_split} subjects also in the train split "
                         f"({sorted(overlap)[:3]}): the benchmark scores held-out subjects only")
    labels = Labels.fit(task, train_rows)
    size = cfg.input_size

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.float().to(device)
        return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                           align_corners=False)

    train_x, test_x = prep(store.tensor("train")), prep(store.tensor(cfg.eval_split))
    if probes is None:
        from mrigen.metrics.probe import get_probes

        probes = get_probes(store, device=device)
    model_size = getattr(getattr(model, "cfg", None), "image_size", None) or \
        getattr(getattr(model, "config", None), "image_size", None)
    if model_size is not None and int(model_size) != store.image_size:
        raise ValueError(f"the model makes {model_size} px slices but store {store.path} holds "
                         f"{store.image_size} px ones")
    # The synthetic set is drawn once per run, with conditions from the first seed's real subset (a conditional
    # model) or freely: every seed's real+synthetic arm adds the same slices.
    first_idx, _ = real_subset(train_rows, cfg.real_fraction, cfg.seed)
    synth = synthetic_set(model, cfg.max_synthetic, task=task.name, pool=[train_rows[i] for i in first_idx.tolist()],
                          probes=probes, seed=cfg.seed, batch_size=cfg.sample_batch, device=device)
    synth_x = prep(synth.images)
    synth_t, synth_k = labels.encode(synth.rows)
    train_t, train_k = labels.encode(train_rows)
    classification = task.kind == "classification"
    results: dict[tuple[str, int], list[float]] = {}
    n_real = 0
    real_subjects = 0

    def fit(x, t, k, seed, augment=None) -> float:
        out = fit_and_predict(x, t.to(device), k.to(device), test_x, n_out=labels.n_out,
                              classification=classification, cfg=cfg, seed=seed, augment=augment)
        return labels.score(out, test_rows)

    for i in range(cfg.seeds):
        seed = cfg.seed + i
        idx, subjects = real_subset(train_rows, cfg.real_fraction, seed)
        n_real, real_subjects = len(idx), len(subjects)
        rx, rt, rk = train_x[idx.to(device)], train_t[idx], train_k[idx]
        jobs = [("real", 0, lambda: fit(rx, rt, rk, seed)),
                ("real+classic", 0, lambda: fit(rx, rt, rk, seed, classic_augment))]
        for n in cfg.synthetic:
            jobs.append(("real+synthetic", n, lambda n=n: fit(torch.cat([rx, synth_x[:n]]),
                                                              torch.cat([rt, synth_t[:n]]),
                                                              torch.cat([rk, synth_k[:n]]), seed)))
        jobs.append(("synthetic", cfg.max_synthetic, lambda: fit(synth_x, synth_t, synth_k, seed)))
        for arm, n, job in jobs:
            t1 = time.perf_counter()
            results.setdefault((arm, n), []).append(job())
            if progress:
                print(f"utility {task.name} seed {seed}: {arm}{f' N={n}' if n else ''} {task.metric}="
                      f"{results[(arm, n)][-1]:.4f} ({time.perf_counter() - t1:.1f} s)", file=sys.stderr, flush=True)
    arms = [ArmResult(arm, n, scores) for (arm, n), scores in results.items()]
    order = {"real": 0, "real+classic": 1, "real+synthetic": 2, "synthetic": 3}
    arms.sort(key=lambda a: (order[a.arm], a.synthetic))
    return UtilityResult(
        config=asdict(cfg), task=task.name, metric=task.metric, greater_is_better=task.greater_is_better,
        chance=chance_score(labels, train_rows, test_rows), floor=subject_floor(labels, train_rows, test_rows),
        arms=arms, label_source=synth.label_source, model_conditions=list(model_conditions(model)),
        n_real_subjects=real_subjects, n_real_slices=n_real,
        n_test_subjects=len({r["subject"] for r in test_rows}), n_test_slices=len(test_rows),
        image_size=store.image_size, probe_val_scores=dict(probes.val_scores),
        wall_s=time.perf_counter() - t0)
