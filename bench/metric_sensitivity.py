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

`--model` adds rows for a saved model (repeatable; `NAME=DIR` labels it), a VQ-VAE sampled at each `--sampling
TEMPERATURE,TOP_K` (the model's own settings when none is given): the same weights, scored the same way, beside
the real-slice rows.

`--feature-seeds 0,1,2` scores every row under feature networks trained with each seed (in this process, not
cached; the store's cached network is left as it is) instead of the store's network: each cell is then the mean
+- half the range over those networks (and sampling `--seeds`), and a last line says whether every failure scored
a higher `fd_ratio` than the clean slices, and every model kept its rank, under each network. How far the
networks' own training moves the numbers (docs/METRICS.md, "Three networks, averaged"); `--feature-nets 1` scores
under single networks instead of the default ensembles of three:

    python bench/metric_sensitivity.py --store STORE --feature-seeds 0,1,2 --model champion=DIR
    python bench/metric_sensitivity.py --store STORE --feature-seeds 0,1,2 --feature-nets 1 --model champion=DIR
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
from mrigen.metrics import FeatureNet, evaluate, get_feature_net
from mrigen.metrics.features import default_config, train_feature_net
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


def _row(runs: list[dict[str, float]], n_nets: int = 1) -> str:
    """The table cells of one row: fd_ratio, precision, recall, diversity, hf_ratio; with several feature networks
    (`runs` network-major) a last cell with each network's fd_ratio (mean over the sampling seeds)."""
    cells = [_cell([m[key] for m in runs], 3 if key == "diversity" else 2)
             for key in ("fd_ratio", "precision", "recall", "diversity", "hf_ratio")]
    if n_nets > 1:
        cells.append(" / ".join(f"{v:.2f}" for v in _per_net([m["fd_ratio"] for m in runs], n_nets)))
    return " | ".join(cells)


def _per_net(values: list[float], n_nets: int) -> list[float]:
    """Network-major values -> one mean per network."""
    per = len(values) // n_nets
    return [sum(values[i * per:(i + 1) * per]) / per for i in range(n_nets)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="slice store with train / val / test splits")
    p.add_argument("--samples", type=int, default=300, help="fake samples per degradation (default 300)")
    p.add_argument("--failures", choices=["pretext", "test"], default="pretext",
                   help="pretext: the feature network's own degradations; test: the independent ones of "
                        "tests/metrics/test_metrics_discrimination.py")
    p.add_argument("--seeds", type=int, default=1, help="seeds per row; several give mean +- half the range")
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]DIR",
                   help="a saved model directory whose samples get rows of their own (repeatable)")
    p.add_argument("--feature-seeds", type=_seeds, metavar="S,S,...",
                   help="score every row under feature networks trained with these seeds (not cached) instead of "
                        "the store's own network")
    p.add_argument("--feature-nets", type=int, default=None, metavar="K",
                   help="networks per feature ensemble (default: MRIGEN_FEATURE_NET_MEMBERS, else 3)")
    p.add_argument("--sampling", action="append", default=[], metavar="T,K",
                   help="VQ-VAE sampling temperature and top-k for --model (repeatable; default: the model's)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: must be >= 1")
    if args.feature_nets is not None and args.feature_nets < 1:
        p.error(f"--feature-nets {args.feature_nets}: must be >= 1")
    sampling = []
    for spec in args.sampling:
        try:
            temperature, top_k = spec.split(",")
            sampling.append((float(temperature), int(top_k)))
        except ValueError:
            p.error(f"--sampling {spec!r}: expected TEMPERATURE,TOP_K, e.g. 0.7,8")
    models = []
    for spec in args.model:
        name, _, path = spec.rpartition("=")
        if not Path(path).is_dir():
            p.error(f"--model {spec!r}: {path} is not a directory")
        models.append((name or path, path))
    store = SliceStore.open(args.store)
    cfg = default_config(args.feature_nets)
    if args.feature_seeds:
        nets = {}
        for seed in args.feature_seeds:
            print(f"training a feature network ({cfg.members} member(s)) with seed {seed}...", file=sys.stderr,
                  flush=True)
            nets[seed] = train_feature_net(store, dataclasses.replace(cfg, seed=seed), progress=False)[0]
        print(f"(each cell: mean +- half the range over feature networks of {cfg.members} member(s) with seeds "
              f"{args.feature_seeds}" + (f" x {args.seeds} sampling seeds)" if args.seeds > 1 else ")"))
    else:
        nets = {None: get_feature_net(store, members=cfg.members)}
    test = store.tensor("test", "cpu")
    extra = (" fd_ratio per network |", " --- |") if len(nets) > 1 else ("", "")
    print("| real test slices with | fd_ratio | precision | recall | diversity | hf_ratio |" + extra[0])
    print("| --- | --- | --- | --- | --- | --- |" + extra[1])
    rows: dict[str, list[dict[str, float]]] = {}
    for name, failure in failures(args.failures).items():
        rows[name] = _score(lambda seed, failure=failure: _RealSlices(test, failure, seed), store, nets, args)
        print(f"| {name} | {_row(rows[name], len(nets))} |", flush=True)
    model_rows = []
    for name, path in models:
        model = load_model(path)
        for temperature, top_k in sampling or [(None, None)]:
            label = name
            if temperature is not None:
                model.config = dataclasses.replace(model.config, sample_temperature=temperature, sample_top_k=top_k)
                label = f"{name}, temperature {temperature}, top-k {top_k}"
            rows[label] = _score(lambda seed, model=model: model, store, nets, args)
            model_rows.append(label)
            print(f"| {label} | {_row(rows[label], len(nets))} |", flush=True)
    m = rows[next(iter(rows))][-1]
    print(f"(real baseline: fd_real {_cell([r['fd_real'] for r in rows['clean']], 3)}, precision_real "
          f"{_cell([r['precision_real'] for r in rows['clean']])}, recall_real "
          f"{_cell([r['recall_real'] for r in rows['clean']])}, diversity_real {m['diversity_real']:.3f}, "
          f"hf_ratio_real {m['hf_ratio_real']:.2f})")
    if args.feature_seeds:
        print(_order_line(rows, model_rows, len(nets)))
    return 0


def _seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (distinct integers)."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integer seeds, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is repeated")
    return seeds


def _score(make: Callable[[int], torch.nn.Module], store: SliceStore, nets: dict[int | None, FeatureNet],
           args: argparse.Namespace) -> list[dict[str, float]]:
    """One evaluation per (feature network, sampling seed), network-major."""
    return [evaluate(make(seed), store, "val", n_samples=args.samples, seed=seed, feature_net=net)
            for net in nets.values() for seed in range(args.seeds)]


def _order_line(rows: dict[str, list[dict[str, float]]], model_rows: list[str], n_nets: int) -> str:
    """Whether, under every feature network, each failure scored a higher fd_ratio than clean slices, and the
    models kept the order of their mean fd_ratio."""
    def per_net(name: str) -> list[float]:
        return _per_net([r["fd_ratio"] for r in rows[name]], n_nets)

    clean = per_net("clean")
    failures_ = [name for name in rows if name != "clean" and name not in model_rows]
    below = sorted({name for name in failures_ for f, c in zip(per_net(name), clean) if f <= c})
    line = ("every failure scored a higher fd_ratio than clean slices under every network" if not below else
            f"under some network these failures scored no higher fd_ratio than clean slices: {', '.join(below)}")
    if len(model_rows) > 1:
        orders = {tuple(sorted(model_rows, key=lambda name: per_net(name)[i])) for i in range(n_nets)}
        line += ("; the models kept their fd_ratio order under every network" if len(orders) == 1 else
                 f"; the models' fd_ratio order changed between networks: {sorted(orders)}")
    return line


if __name__ == "__main__":
    sys.exit(main())
