"""How the sample metrics score real slices with a generator's failures, on one store: the yardstick for reading
a model's `fd_ratio` / precision on that store.

A fake model "samples" real slices of the store's test subjects (never in the baseline or the reference), clean
or with one of the feature network's pretext degradations (`mrigen.metrics.pretext.apply_degradation`), and
`mrigen.metrics.evaluate` scores them against the val subjects exactly as it scores a model.

    python bench/metric_sensitivity.py --store bench-work/demo-64/demo-T1-n120-seed0-v2/store-64
"""

from __future__ import annotations

import argparse
import sys

import torch

from mrigen.data.store import SliceStore
from mrigen.metrics import evaluate
from mrigen.metrics.pretext import DEGRADATIONS, apply_degradation


class _RealSlices(torch.nn.Module):
    """Samples = test-split slices drawn at random (seeded), optionally degraded; reconstruction = identity."""

    def __init__(self, test: torch.Tensor, kind: str) -> None:
        super().__init__()
        self.test, self.kind = test, kind
        self.anchor = torch.nn.Parameter(torch.zeros(1))        # evaluate reads the model's device from it

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        x = self.test[torch.randint(0, len(self.test), (n,), generator=g)]
        return x if self.kind == "clean" else apply_degradation(self.kind, x, g).clamp(0, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="slice store with train / val / test splits")
    p.add_argument("--samples", type=int, default=300, help="fake samples per degradation (default 300)")
    args = p.parse_args(argv)
    store = SliceStore.open(args.store)
    test = store.tensor("test", "cpu")
    print("| real test slices with | fd_ratio | precision | recall |")
    print("| --- | --- | --- | --- |")
    for kind in DEGRADATIONS:
        m = evaluate(_RealSlices(test, kind), store, "val", n_samples=args.samples, seed=0)
        print(f"| {kind} | {m['fd_ratio']:.2f} | {m['precision']:.2f} | {m['recall']:.2f} |", flush=True)
    print(f"(real baseline: precision_real {m['precision_real']:.2f}, recall_real {m['recall_real']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
