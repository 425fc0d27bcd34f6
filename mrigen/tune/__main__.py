"""`python -m mrigen.tune --study NAME`: run (or join) an Optuna study of VAE / VQ-VAE trials tracked in MLflow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mrigen import logs

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mrigen.tune",
        description="Run an Optuna study defined in experiments/NAME.yaml. Every trial trains a model, logs it as a "
                    "child run of the study's MLflow parent run, and the best model is registered and promoted to "
                    "the 'champion' alias. More workers join the same study by using the same --storage. "
                    "With no storage, tracking server or data configured, it generates the demo cohort, uses "
                    "SQLite + local files under --work-dir, and runs the study's small demo budget.",
        epilog="examples:\n  python -m mrigen.tune --study vae-kernels\n"
               "  python -m mrigen.tune --study vae-kernels --data /data/ixi-store --storage "
               "postgresql+psycopg://USER@HOST/optuna --tracking-uri http://mlflow:5000 --gpus 0,1 --trials-per-gpu 4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="study name in experiments/ (e.g. vae-kernels) or a YAML path")
    p.add_argument("--n-trials", type=int, help="total finished trials the study should reach (default: budget)")
    p.add_argument("--timeout", type=float, help="seconds after which this worker starts no new trial")
    p.add_argument("--storage", help="Optuna storage URL (default $OPTUNA_STORAGE, else SQLite in --work-dir)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else SQLite in "
                                          "--work-dir)")
    p.add_argument("--no-tracking", action="store_true",
                   help="run trials without MLflow (nothing logged or registered; for benchmarks and dry runs)")
    p.add_argument("--data", type=Path, help="slice store from `python -m mrigen.data ingest` (default: demo cohort)")
    p.add_argument("--gpus", help="comma-separated GPU ids, one worker process per GPU (default: all visible)")
    p.add_argument("--trials-per-gpu", type=int, default=1, help="concurrent trial processes per GPU (default 1)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the budget's)")
    p.add_argument("--resume", action="store_true", help="continue an existing study (error if it does not exist)")
    p.add_argument("--full-budget", action="store_true",
                   help="use the study's full budget even without a GPU or real data")
    p.add_argument("--heartbeat", type=int, default=10,
                   help="seconds between trial heartbeats; a trial silent for 3x this is marked FAIL and retried "
                        "with the same params (default 10)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed; worker i uses seed+i (default 0)")
    p.add_argument("--work-dir", type=Path, default=Path("mrigen-work"),
                   help="demo data, trial outputs and embedded databases (default ./mrigen-work)")
    p.add_argument("--register-name", help="registered model name (default mrigen-STUDY)")
    p.add_argument("--worker-name", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    logs.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    import optuna  # noqa: F401  (imported before logs.setup: Optuna resets its log level on import)

    # One line per trial epoch and the summary table say it; each trial's tracking and evaluation lines (run id,
    # model upload, the feature net, the long evaluation line) are details, shown with -v. Warnings still show.
    logs.setup(args, quiet=("mrigen.tracking", "mrigen.metrics"))
    from mrigen.data import StoreError
    from mrigen.tune.cli import finish, prepare

    try:
        ctx = prepare(args)
    except (ValueError, OSError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        study = ctx.run(argv)
    except KeyboardInterrupt:
        ctx.interrupted()
        print("interrupted: running trials were marked failed and their MLflow runs KILLED; "
              "rerun the same command (or with --resume) to continue the study", file=sys.stderr)
        return 130
    if args.worker_name is None and not finish(ctx, study):
        return 1                                 # every trial failed (or was pruned): the summary says why
    return 0


if __name__ == "__main__":
    sys.exit(main())
