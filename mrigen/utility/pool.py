"""The protocol's downstream trainings, one after another or in worker processes on the CPU.

Every training of a run is independent (its own seed, its own training set drawn from the same tensors), so on
a CPU they can run side by side: `run_fits(..., workers=N)` starts N spawned processes with one thread each,
hands them the run's tensors once (shared memory, not copies) and each training as a `FitJob` of a few numbers.
A training's result depends only on its job and the thread count, so the scores are the same with any number of
workers (one thread each) as one after another with one thread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import torch

from .arms import classic_augment
from .cnn import fit_and_predict
from .config import UtilityConfig

__all__ = ["FitData", "FitJob", "default_workers", "run_fits"]


@dataclass(frozen=True)
class FitData:
    """The tensors every training of one run draws from, all on one device.

    real_x `(N, 1, s, s)`, real_t `(N,)`, real_k `(N,)` bool: the store's training split, its targets and which
    rows have a label; synth_x / synth_t / synth_k the same for the synthetic set `(M, ...)`; test_x `(T, 1, s, s)`.
    """

    real_x: torch.Tensor
    real_t: torch.Tensor
    real_k: torch.Tensor
    synth_x: torch.Tensor
    synth_t: torch.Tensor
    synth_k: torch.Tensor
    test_x: torch.Tensor
    n_out: int
    classification: bool
    cfg: UtilityConfig


@dataclass(frozen=True)
class FitJob:
    """One downstream training: real rows `real_idx` (int64, may be empty) + the first `n_synthetic` synthetic
    slices, weights / batches seeded by `seed`, classic augmentation of every batch if `classic`."""

    real_idx: torch.Tensor
    n_synthetic: int
    seed: int
    classic: bool = False


def run_fit(data: FitData, job: FitJob) -> torch.Tensor:
    """Train one CNN for `job`; its outputs on `data.test_x` (`fit_and_predict`'s, on the CPU)."""
    idx = job.real_idx.to(data.real_x.device)
    n = int(job.n_synthetic)
    x = torch.cat([data.real_x[idx], data.synth_x[:n]])
    t = torch.cat([data.real_t[job.real_idx], data.synth_t[:n]]).to(data.real_x.device)
    k = torch.cat([data.real_k[job.real_idx], data.synth_k[:n]]).to(data.real_x.device)
    return fit_and_predict(x, t, k, data.test_x, n_out=data.n_out, classification=data.classification,
                           cfg=data.cfg, seed=job.seed, augment=classic_augment if job.classic else None)


def default_workers(device: torch.device | str) -> int:
    """Worker processes for a run on `device`: one per available CPU core up to 4 on the CPU, else 1."""
    if torch.device(device).type != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


_DATA: FitData | None = None            # a worker process's copy of the run's tensors (set by `_init`)


def _init(data: FitData) -> None:
    global _DATA
    torch.set_num_threads(1)
    _DATA = data


def _work(job: FitJob) -> tuple[torch.Tensor, float]:
    assert _DATA is not None, "worker used before its initializer ran"
    t0 = time.perf_counter()
    return run_fit(_DATA, job), time.perf_counter() - t0


def run_fits(data: FitData, jobs: Sequence[FitJob], *, workers: int = 1,
             on_done: Callable[[int, torch.Tensor, float], None] | None = None) -> list[torch.Tensor]:
    """Run `jobs`; their outputs in the same order.

    Args:
        data: the run's tensors.
        jobs: the trainings.
        workers: processes to train in (CPU tensors only; 1 trains here, with this process's threads).
        on_done: called as each training finishes with its index, outputs and seconds (in finishing order).

    Raises:
        ValueError: workers < 1, or workers > 1 with tensors on a GPU.
        RuntimeError: a worker process died (killed, out of memory); a training's own error is re-raised as is.
    """
    if int(workers) < 1:
        raise ValueError(f"workers={workers!r} must be >= 1")
    outputs: list[torch.Tensor | None] = [None] * len(jobs)
    if workers == 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            t0 = time.perf_counter()
            outputs[i] = run_fit(data, job)
            if on_done is not None:
                on_done(i, outputs[i], time.perf_counter() - t0)
        return outputs  # type: ignore[return-value]
    if data.real_x.device.type != "cpu":
        raise ValueError(f"workers={workers}: worker processes train on the CPU only; the run's tensors are on "
                         f"{data.real_x.device} (use workers=1)")
    ctx = torch.multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=min(int(workers), len(jobs)), mp_context=ctx, initializer=_init,
                                 initargs=(data,)) as pool:
            futures = {pool.submit(_work, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                i = futures[future]
                outputs[i], seconds = future.result()
                if on_done is not None:
                    on_done(i, outputs[i], seconds)
    except BrokenProcessPool as exc:
        raise RuntimeError(f"a downstream-training worker process died ({exc}); run with workers=1 to see why, "
                           f"or with fewer workers if memory is short") from exc
    return outputs  # type: ignore[return-value]
