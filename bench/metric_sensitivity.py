"""How the sample metrics score real slices with a generator's failures, on one store: the yardstick for reading
a model's `fd_ratio` / precision on that store.

A fake model "samples" real slices of the store's test subjects (never in the baseline or the reference), clean
or with one of the feature network's pretext degradations (`mrigen.metrics.pretext.apply_degradation`), and
`mrigen.metrics.evaluate` scores them against the val subjects exactly as it scores a model. With `--failures
test` the failures are instead the ones `tests/metrics/test_metrics_discrimination.py` implements independently
of the pretext code (the table in docs/METRICS.md, "What each metric sees").

    python bench/metric_sensitivity.py --store bench-work/demo-64/demo-T1-n120-seed0-v2/store-64
    python bench/metric_sensitivity.py --store STORE --failures test --seeds 3
    python bench/metric_sensitivity.py --store STORE --model MODEL_DIR --sampling 1.0,0 --sampling 0.7,8

`--model` adds rows for a saved VQ-VAE sampled at each `--sampling TEMPERATURE,TOP_K` (the model's own
settings when none is given): the same weights, scored the same way, beside the real-slice rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from mrigen.data.store import SliceStore
from mrigen.metrics import evaluate
from mrigen.metrics.pretext import DEGRADATIONS, apply_degradation
from mrigen.models.io import load_model


Failure = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
TEST_FAILURES = Path(__file__).resolve().parents[1] / "tests" / "metrics" / "test_metrics_discrimination.py"


class _RealSlices(torch.nn.Module):
    """Samples = test-split slices drawn at random (seeded), optionally degraded; reconstruction = identity."""

    def __init__(self, test: torch.Tensor, failure: Failure | None, seed: int) -> None:
        super().__init__()
        self.test, self.failure, self.seed = test, failure, seed
        self.anchor = torch.nn.Parameter(torch.zeros(1))        # evaluate reads the model's device from it

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        x = self.test[torch.randint(0, len(self.test), (n,), generator=g)]
        return x if self.failure is None else self.failure(x, g).clamp(0, 1)


def failures(kind: str) -> dict[str, Failure | None]:
    """name -> failure: the pretext degradations, or the discrimination test's independent implementations."""
    if kind == "pretext":
        return {name: None if name == "clean" else (lambda x, g, name=name: apply_degradation(name, x, g))
                for name in DEGRADATIONS}
    spec = importlib.util.spec_from_file_location("discrimination", TEST_FAILURES)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(TEST_FAILURES.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(TEST_FAILURES.parent))
    return {"clean": None, **module.FAILURES}


def _cell(values: list[float], digits: int = 2) -> str:
    """'mean' for one seed, 'mean +- half the range' for several."""
    mean, half = sum(values) / len(values), (max(values) - min(values)) / 2
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} +- {half:.{digits}f}"


def _row(runs: list[dict[str, float]]) -> str:
    """The table cells of one row: fd_ratio, precision, recall, diversity, hf_ratio."""
    return " | ".join(_cell([m[key] for m in runs], 3 if key == "diversity" else 2)
                      for key in ("fd_ratio", "precision", "recall", "diversity", "hf_ratio"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="slice store with train / val / test splits")
    p.add_argument("--samples", type=int, default=300, help="fake samples per degradation (default 300)")
    p.add_argument("--failures", choices=["pretext", "test"], default="pretext",
                   help="pretext: the feature network's own degradations; test: the independent ones of "
                        "tests/metrics/test_metrics_discrimination.py")
    p.add_argument("--seeds", type=int, default=1, help="seeds per row; several give mean +- half the range")
    p.add_argument("--model", help="a saved model directory whose samples get rows of their own")
    p.add_argument("--sampling", action="append", default=[], metavar="T,K",
                   help="VQ-VAE sampling temperature and top-k for --model (repeatable; default: the model's)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: must be >= 1")
    sampling = []
    for spec in args.sampling:
        try:
            temperature, top_k = spec.split(",")
            sampling.append((float(temperature), int(top_k)))
        except ValueError:
            p.error(f"--sampling {spec!r}: expected TEMPERATURE,TOP_K, e.g. 0.7,8")
    store = SliceStore.open(args.store)
    test = store.tensor("test", "cpu")
    print("| real test slices with | fd_ratio | precision | recall | diversity | hf_ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, failure in failures(args.failures).items():
        runs = [evaluate(_RealSlices(test, failure, seed), store, "val", n_samples=args.samples, seed=seed)
                for seed in range(args.seeds)]
        print(f"| {name} | {_row(runs)} |", flush=True)
    if args.model:
        model = load_model(args.model)
        for temperature, top_k in sampling or [(None, None)]:
            if temperature is not None:
                model.config = dataclasses.replace(model.config, sample_temperature=temperature, sample_top_k=top_k)
            runs = [evaluate(model, store, "val", n_samples=args.samples, seed=seed) for seed in range(args.seeds)]
            label = f"model samples, temperature {model.config.sample_temperature}, top-k {model.config.sample_top_k}"
            print(f"| {label} | {_row(runs)} |", flush=True)
    m = runs[-1]
    print(f"(real baseline: fd_real {m['fd_real']:.3f}, precision_real {m['precision_real']:.2f}, recall_real "
          f"{m['recall_real']:.2f}, diversity_real {m['diversity_real']:.3f}, hf_ratio_real {m['hf_ratio_real']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
