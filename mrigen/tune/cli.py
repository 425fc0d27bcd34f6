"""Resolving `python -m mrigen.tune` options (embedded defaults included) and the end-of-study report."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from mrigen import logs
from mrigen.locks import file_lock
from mrigen.tune.report import ensure_parent_run, summarise, summary_table
from mrigen.tune.runner import TuneOptions, budget_of, open_study, run_study
from mrigen.tune.study import StudySpec, load_study

__all__ = ["TuneContext", "prepare", "finish", "parse_gpus"]

log = logging.getLogger(__name__)


@dataclass
class TuneContext:
    """Everything a tune run resolved before starting trials."""

    spec: StudySpec
    opts: TuneOptions
    store: object
    parent_run_id: str | None
    is_launcher: bool

    def run(self, argv: list[str]) -> optuna.Study:
        return run_study(self.spec, self.opts, self.store, self.parent_run_id,
                         argv=argv if self.is_launcher else None)

    def interrupted(self) -> None:
        """Ctrl-C: mark the parent run KILLED (the trial runs are ended by the tracking hook's handlers)."""
        if self.is_launcher and self.parent_run_id and self.opts.tracking_uri:
            from mlflow import MlflowClient

            MlflowClient(self.opts.tracking_uri).set_terminated(self.parent_run_id, status="KILLED")


def parse_gpus(arg: str | None) -> tuple[int, ...]:
    import torch

    if arg is None:
        return tuple(range(torch.cuda.device_count()))
    try:
        ids = tuple(int(g) for g in arg.split(",") if g.strip())
    except ValueError:
        raise ValueError(f"--gpus {arg!r}: expected comma-separated integers such as 0,1") from None
    if ids and not torch.cuda.is_available():
        raise ValueError(f"--gpus {arg}: no CUDA device is available on this machine")
    return ids


def _sqlite(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


def prepare(args: argparse.Namespace) -> TuneContext:
    """Load the study, pick budget/device/data/storage/tracking (saying which), open the study + parent run."""
    from mrigen.tracking import redact_uri

    spec = load_study(args.study)
    gpus = parse_gpus(args.gpus)
    for flag, value in (("--trials-per-gpu", args.trials_per_gpu), ("--n-trials", args.n_trials),
                        ("--epochs", args.epochs), ("--heartbeat", args.heartbeat)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1")
    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"--timeout {args.timeout}: must be > 0 seconds")
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    storage = args.storage or os.environ.get("OPTUNA_STORAGE") or _sqlite(work_dir / "optuna.db")
    tracking = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _sqlite(work_dir / "mlflow.db")
    if args.no_tracking:
        tracking = None
    opts = TuneOptions(study=args.study, storage=storage, tracking_uri=tracking, work_dir=work_dir, data=args.data,
                       n_trials=args.n_trials, epochs=args.epochs, timeout=args.timeout, gpus=gpus,
                       trials_per_gpu=args.trials_per_gpu, seed=args.seed + args.worker_index,
                       register_name=args.register_name, resume=args.resume, heartbeat=args.heartbeat,
                       full_budget=args.full_budget or (bool(gpus) and args.data is not None),
                       worker=args.worker_name or "w0")
    budget = budget_of(spec, opts)
    is_launcher = args.worker_name is None
    if is_launcher:
        which = "full" if opts.full_budget else "demo"
        device = f"GPUs {list(gpus)}" if gpus else "CPU (no CUDA device found: running trials on the CPU)"
        print(f"study {spec.name}: {which} budget, {budget.describe()} on {device}\n"
              f"  storage:  {redact_uri(storage)}\n"
              f"  tracking: {redact_uri(tracking) if tracking else 'off (--no-tracking)'}", flush=True)
    store = _store(args.data, work_dir, budget.image_size, announce=is_launcher)
    if store.image_size != budget.image_size:
        raise ValueError(f"--data {args.data}: store holds {store.image_size}px slices but the study budget "
                         f"trains at {budget.image_size}px (re-ingest with --size {budget.image_size})")
    # Local SQLite stores: the first process creates (migrates) each schema while the others wait for it.
    local = storage.startswith("sqlite") or (tracking or "").startswith("sqlite")
    with file_lock(work_dir / ".stores.lock") if local else contextlib.nullcontext():
        study = open_study(spec, opts)                  # creates the study once; workers join it
        parent = None
        if tracking is not None:
            parent = (ensure_parent_run(study, spec, tracking, f"mrigen-{spec.name}", store) if is_launcher
                      else study.user_attrs.get("mlflow_parent_run_id"))
    return TuneContext(spec=spec, opts=opts, store=store, parent_run_id=parent, is_launcher=is_launcher)


def _store(data: Path | None, work_dir: Path, size: int, announce: bool):
    from mrigen.data import SliceStore, build_demo_store

    if data is not None:
        return SliceStore.open(data)
    store = build_demo_store(work_dir / f"demo-{size}", size=size, progress=announce and logs.progress())
    if announce:
        print(f"  data:     generated demo cohort -> {store.path} (pass --data STORE for IXI)", flush=True)
    return store


def finish(ctx: TuneContext, study: optuna.Study) -> bool:
    """Summarise to the parent run, make sure the rule's best trial was offered for champion, print the champion's
    measured quality against the targets, and where to look. Returns whether any trial of the study completed."""
    from mrigen.tune.promotion import ensure_champion
    from mrigen.tune.report import champion_report

    opts, spec = ctx.opts, ctx.spec
    if ctx.parent_run_id:
        summarise(study, spec, opts.tracking_uri, ctx.parent_run_id)
    print("\n" + summary_table(study, spec))
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if opts.tracking_uri is None:
        return bool(completed)
    name = opts.register_name or f"mrigen-{spec.name}"
    if not completed:
        print(f"\nno trial completed; see the log above. Nothing was registered under {name}.")
        return False
    best = ensure_champion(study, spec, name, opts.tracking_uri)
    from mlflow import MlflowClient

    from mrigen.tracking import redact_uri, ui_runs_url

    uri = redact_uri(opts.tracking_uri)
    runs_page = ui_runs_url(opts.tracking_uri,
                            MlflowClient(opts.tracking_uri).get_experiment_by_name(f"mrigen-{spec.name}").experiment_id)
    ui = (f"mlflow ui --backend-store-uri {uri}, then open {runs_page}" if uri.startswith("sqlite")
          else f"open {runs_page}")
    rule = (f"trial {best.number} ranks first under the promotion rule ({spec.promotion})" if best is not None else
            f"no trial meets the promotion rule ({spec.promotion}); nothing new was offered for champion")
    print(f"\n{rule}\n" + champion_report(name, opts.tracking_uri, spec, demo=not opts.full_budget) +
          f"\n  compare trials:  {ui}\n"
          f"  generate slices: MLFLOW_TRACKING_URI={uri} python -m mrigen.generate "
          f"--model models:/{name}@champion -n 16 --out synthetic/")
    return True
