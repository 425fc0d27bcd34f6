"""What the copy detector (`memorised`) flags on one store, and how the VAE's fitted latent prior changes it.

Part 1, the store alone: the memorised share of real slices transformed the ways a generator could reproduce or
miss them: slices of the unseen test subjects (clean, blurred, flipped), and training slices (exact, with noise,
blurred, flipped left-right, shifted by whole pixels). A detector that works flags the copies and none of the unseen
ones.

Part 2, per `--model` (a saved VAE with `latent_prior: fitted`): its mixture prior refitted to the training slices'
posterior means with plain k-means (every cluster a component, as before 2026-11-28) and with the pooled one (each
component >= 50 slices of >= 3 subjects, `mrigen.models.latent_prior.pooled_kmeans`), for each k-means seed; then
the memorised share of `--samples` draws and `fd_ratio` / precision / recall from `evaluate` (3 seeds x 1,000).

    python bench/copy_detector.py --store bench-work/demo-64/demo-T1-n120-seed0-v2/store-64
    python bench/copy_detector.py --store STORE --model MODEL_DIR --samples 10000 --kmeans-seeds 0,1,2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from mrigen.data.store import SliceStore
from mrigen.metrics import evaluate, memorisation
from mrigen.metrics.pretext import gaussian_blur
from mrigen.models.io import load_model

CLUSTERINGS = {"plain k-means": {"min_rows": 1, "min_subjects": 1}, "pooled (>= 50 slices, >= 3 subjects)": {}}


def subject_ids(store: SliceStore) -> torch.Tensor:
    """`(N,)` int64 subject index of each training slice."""
    names = [str(row["subject"]) for row in store.slices("train")]
    lookup = {name: i for i, name in enumerate(sorted(set(names)))}
    return torch.tensor([lookup[name] for name in names])


def detector_rows(store: SliceStore, n: int = 500) -> list[tuple[str, float]]:
    """(what, memorised share) for transformed real slices."""
    train, val, test = (store.tensor(split, "cpu").float() for split in ("train", "val", "test"))
    groups = subject_ids(store)
    gen = torch.Generator().manual_seed(0)
    copies = train[torch.randperm(len(train), generator=gen)[:n]]

    def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return gaussian_blur(x, torch.full((len(x),), sigma))

    cases = {"unseen test slices": test}
    cases.update({f"unseen test slices, blurred {s} px": blur(test, s) for s in (0.7, 1.0, 1.5)})
    cases["unseen test slices, flipped left-right"] = test.flip(-1)
    cases["training slices (exact copies)"] = copies
    cases.update({f"training slices + noise std {s}":
                  (copies + s * torch.randn(copies.shape, generator=gen)).clamp(0, 1) for s in (0.02, 0.05)})
    cases["training slices, blurred 1.0 px"] = blur(copies, 1.0)
    cases["training slices, flipped left-right"] = copies.flip(-1)
    cases.update({f"training slices, shifted {s} px": torch.roll(copies, s, -1) for s in (1, 2)})
    return [(name, memorisation(x, train, val, train_groups=groups)["memorised"]) for name, x in cases.items()]


@torch.no_grad()
def prior_rows(model_dir: Path, store: SliceStore, samples: int, seeds: list[int]) -> list[str]:
    """One line per (clustering, k-means seed) for a saved VAE with a fitted prior."""
    model = load_model(model_dir)
    if getattr(model, "latent_prior", None) is None:
        raise SystemExit(f"error: {model_dir} is not a VAE with model.latent_prior: fitted")
    model.eval()
    train, val = store.tensor("train", "cpu").float(), store.tensor("val", "cpu").float()
    groups = subject_ids(store)
    means = torch.cat([model.encode(train[i:i + 256])[0] for i in range(0, len(train), 256)]).flatten(1)
    lines = []
    for name, limits in CLUSTERINGS.items():
        for seed in seeds:
            k = model.latent_prior.fit(means, seed=seed, groups=groups, **limits)
            sizes = (model.latent_prior.weights * len(train)).round()
            gen = torch.Generator().manual_seed(123)
            draws = torch.cat([model.sample(min(500, samples - i), generator=gen) for i in range(0, samples, 500)])
            mem = memorisation(draws.float(), train, val, train_groups=groups)["memorised"]
            runs = [evaluate(model, store, "val", seed=s, n_samples=1000) for s in (0, 1, 2)]
            fd = [r["fd_ratio"] for r in runs]
            each = ", ".join(f"{v:.2f}" for v in fd)
            lines.append(f"| {name} | {seed} | {k} | {int(sizes[sizes > 0].min())} "
                         f"| {mem:.4f} ({round(mem * samples)}) | {statistics.mean(fd):.2f} ({each}) "
                         f"| {statistics.mean(r['precision'] for r in runs):.3f} "
                         f"| {statistics.mean(r['recall'] for r in runs):.3f} |")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True, help="a slice store (e.g. the demo store of bench/quality.py)")
    p.add_argument("--model", type=Path, action="append", default=[],
                   help="a saved VAE with a fitted latent prior (repeatable): adds part 2")
    p.add_argument("--samples", type=int, default=10_000, help="draws per prior for the memorised share")
    p.add_argument("--kmeans-seeds", default="0", help="comma-separated k-means seeds (default 0)")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error(f"--samples {args.samples} must be >= 1")
    try:
        seeds = [int(s) for s in args.kmeans_seeds.split(",")]
    except ValueError:
        p.error(f"--kmeans-seeds {args.kmeans_seeds!r} must be comma-separated integers")
    store = SliceStore.open(args.store)
    print("| real slices | memorised |\n| --- | --- |")
    for name, share in detector_rows(store):
        print(f"| {name} | {share:.3f} |", flush=True)
    for model_dir in args.model:
        print(f"\n{model_dir}: {args.samples} draws per prior\n"
              "| clustering | k-means seed | components | smallest | memorised | fd_ratio (3 x 1,000) | precision "
              "| recall |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
        prior_rows(model_dir, store, args.samples, seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
