"""`python -m mrigen.utility --model models:/NAME@champion --task TASK`: what are a generator's slices worth?"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import UtilityConfig
from .tasks import TASKS, get_task

__all__ = ["main"]

_EPILOG = """\
protocol (all scored on the store's real test split: held-out subjects only; mean +- std over --seeds):
  real            a fraction F of the training subjects (a data-poor user)
  real+synthetic  the same real slices + N generated ones, for each N in --synthetic
  synthetic       the largest synthetic set alone ("train on synthetic, test on real")
  real+classic    the same real slices with flips, small affines and intensity changes
Synthetic labels: the requested conditions if the model is conditioned on the task's attribute (drawn from the
real subset, so they follow its label distribution), else read back by the store's probes (the report says which).
A task whose real-only arms do not beat chance by more than the seed / test-subject spread is reported as not
learnable from the images.

Results: a table on stdout; with a models:/ or runs:/ model, an MLflow run nested under the model's training
run (table, JSON, plot of score vs synthetic count) and, for models:/, tags on the registered version that
`python -m mrigen.registry show NAME` prints.

examples:
  python -m mrigen.utility --model models:/mrigen-vqvae@champion --task site --task slice_pos
  python -m mrigen.utility --model models:/mrigen-vqvae/3 --task slice_pos --real-fraction 0.1 --seeds 5 \\
      --synthetic 250,1000,4000 --data mrigen-work/ixi-store
  python -m mrigen.utility --model out/model --task age --data STORE --out utility/   # a local model dir
"""


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(sorted({int(c) for c in text.split(",") if c.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--synthetic {text!r}: expected counts like 1000 or 250,1000") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--synthetic {text!r}: counts must be >= 1")
    return counts


def _parser() -> argparse.ArgumentParser:
    d = UtilityConfig()
    p = argparse.ArgumentParser(prog="python -m mrigen.utility", description="What are a generator's slices worth downstream? Train one "
                                "small CNN per arm on real, real + synthetic, synthetic-only and classically augmented "
                                "data, and score each on held-out real subjects.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or a local model directory")
    p.add_argument("--task", required=True, action="append",
                   help=f"what the downstream CNN predicts: {', '.join(TASKS)} (age / sex only where the store "
                        f"carries them); repeat for several tasks, run in turn on the same synthetic model")
    p.add_argument("--data", type=Path, help="slice store the model was trained on (default: the demo cohort at "
                                             "the model's image size under --work-dir)")
    p.add_argument("--real-fraction", type=float, default=d.real_fraction,
                   help=f"share F of the training subjects in the real arms, 0 < F <= 1 (default {d.real_fraction})")
    p.add_argument("--seeds", type=int, default=d.seeds, help=f"repeats for mean and spread (default {d.seeds})")
    p.add_argument("--synthetic", type=_counts, default=d.synthetic, metavar="N[,N...]",
                   help=f"synthetic slices added to the real set; the largest also trains the synthetic-only arm "
                        f"(default {','.join(map(str, d.synthetic))})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps of every downstream CNN "
                                                              f"(default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--workers", type=int, help="processes the downstream CNNs train in, one thread each (default: "
                                               "one per CPU core up to 4 for a model on the CPU, else 1); the scores "
                                               "do not depend on it")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, else "
                                          "./mrigen-work/mlflow.db)")
    p.add_argument("--work-dir", type=Path, default=Path("mrigen-work"), help="where the demo store is cached")
    p.add_argument("--out", type=Path, help="also write the table (.md), result (.json) and plot (.png) here")
    p.add_argument("--no-log", action="store_true", help="do not log to MLflow or tag the model version")
    p.add_argument("--quiet", action="store_true", help="no per-training progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; errors are one line on stderr with exit status 1 (2 for bad arguments)."""
    from mrigen.tracking.client import TrackingError, error_line

    p = _parser()
    args = p.parse_args(argv)
    tasks = list(dict.fromkeys(args.task))          # in order, once each
    for task in tasks:
        if task not in TASKS:
            p.error(f"unknown task {task!r} (allowed: {', '.join(TASKS)})")
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers {args.workers}: must be >= 1")
    try:
        cfgs = [UtilityConfig(task=task, real_fraction=args.real_fraction, seeds=args.seeds,
                              synthetic=args.synthetic, steps=args.steps, seed=args.seed) for task in tasks]
    except ValueError as exc:
        p.error(str(exc))
    try:
        return _run(args, cfgs)
    except (TrackingError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"mrigen.utility: error: {error_line(exc)}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, cfgs: list[UtilityConfig]) -> int:
    from mrigen.data import SliceStore, StoreError, build_demo_store
    from mrigen.generate import resolve_model

    if args.data is not None:
        try:
            store = SliceStore.open(args.data)
        except StoreError as exc:
            raise ValueError(str(exc)) from None
    resolved = resolve_model(args.model, tracking_uri=args.tracking_uri, device=args.device)
    model = resolved.model
    if args.data is None:
        size = int(getattr(getattr(model, "cfg", None) or getattr(model, "config", None), "image_size"))
        store = build_demo_store(args.work_dir / f"demo-{size}", size=size, progress=not args.quiet)
        print(f"data: the demo cohort at {size} px ({store.path}); pass --data STORE for another", file=sys.stderr)
    for cfg in cfgs:                                # a task the store cannot serve fails before any training
        get_task(cfg.task, store.slices("train"), f"store {store.path}")
    device = next(model.parameters()).device
    where = f"{resolved.name} v{resolved.version}" if resolved.name else resolved.uri
    cache: dict = {}                                # the tasks share one synthetic set (same model, store, seed)
    for i, cfg in enumerate(cfgs):
        if i:
            print()
        _task(args, cfg, model, store, device, resolved, where, cache)
    return 0


def _task(args: argparse.Namespace, cfg: UtilityConfig, model, store, device, resolved, where: str,
          cache: dict) -> None:
    """One task: run the protocol, print its table, write --out files, log to MLflow unless --no-log; `cache`
    carries the synthetic slices from one task to the next (`run_utility`'s synthetic_cache)."""
    from .report import plot, summary, table
    from .runner import run_utility
    from .tracking import log_utility

    from .pool import default_workers

    workers = args.workers or default_workers(device)
    result = run_utility(model, store, cfg, device=device, progress=not args.quiet, synthetic_cache=cache,
                         workers=workers)
    print(table(result, where))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"utility_{cfg.task}.md").write_text(table(result, where) + "\n")
        (args.out / f"utility_{cfg.task}.json").write_text(json.dumps(result.to_dict(), indent=1))
        plot(result, args.out / f"utility_{cfg.task}.png")
    if args.no_log:
        return
    if resolved.run_id is None:
        print("not logged to MLflow: a local model directory has no training run to nest under", file=sys.stderr)
        return
    rid = log_utility(result, parent_run_id=resolved.run_id, model_name=resolved.name,
                      model_version=resolved.version, tracking_uri=args.tracking_uri, model_uri=resolved.uri)
    s = summary(result)
    print(f"logged run {rid} (nested under {resolved.run_id})"
          + (f"; tagged {resolved.name} v{resolved.version}: utility.{cfg.task} verdict={s['verdict']}"
             if resolved.name else ""))


if __name__ == "__main__":
    sys.exit(main())
