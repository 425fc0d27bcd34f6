"""Create or join an Optuna study, run its workers (one process per GPU slot, or in-process on CPU), summarise.

Every worker, on this machine or another, joins the same study through the same storage; the study's trial
budget is a total over all workers (`MaxTrialsCallback` counts finished trials), so workers can come and go.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mrigen.tune.objective import TrialRunner
from mrigen.tune.study import Budget, StudySpec

__all__ = ["TuneOptions", "StaleTrialCallback", "make_storage", "open_study", "check_objectives", "run_worker", "run_study", "FINISHED"]

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class TuneOptions:
    """Resolved command-line options of `python -m mrigen.tune`."""

    study: str                               # study name in experiments/ or a path to a study file
    storage: str                             # Optuna storage URL (secrets inside stay out of logs)
    tracking_uri: str | None                 # MLflow tracking URI; None = no tracking (--no-tracking)
    work_dir: Path                           # demo data, trial outputs, embedded databases
    data: Path | None = None                 # slice store; None = generated demo cohort
    n_trials: int | None = None              # override of the budget's trial count
    epochs: int | None = None                # override of the budget's epochs per trial
    timeout: float | None = None             # seconds after which this worker starts no new trial
    gpus: tuple[int, ...] = ()               # GPU ids to use; () = CPU or the single default device
    trials_per_gpu: int = 1                  # concurrent trial processes per GPU
    seed: int = 0                            # sampler seed (each worker adds its index)
    heartbeat: int = 10                      # seconds between trial heartbeats (stale trials are retried)
    register_name: str | None = None         # registered model name; default "mrigen-<study>"
    resume: bool = False                     # the study must already exist
    full_budget: bool = False                # use the study's full budget (GPU + real data) vs demo_budget
    worker: str = "w0"                       # this worker's name (set for spawned workers)


class StaleTrialCallback:
    """Called by Optuna when a worker finds a trial whose heartbeat stopped (its worker died): the trial is
    re-enqueued with the same params (up to `max_retry` times) and its MLflow run, which nobody else will end,
    is marked FAILED with the reason."""

    def __init__(self, tracking_uri: str | None, grace_s: int, max_retry: int = 2) -> None:
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.tracking_uri, self.grace_s = tracking_uri, grace_s

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.retry(study, trial)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and self.tracking_uri:
            from mlflow import MlflowClient

            client = MlflowClient(self.tracking_uri)
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "mrigen.stop_reason",
                               f"worker lost: no heartbeat for {self.grace_s} s; trial {trial.number} retried")
                client.set_terminated(run_id, status="FAILED")
        log.warning("trial %d lost its worker (no heartbeat for %d s): marked FAIL, re-queued with the same params",
                    trial.number, self.grace_s)


def make_storage(url: str, heartbeat: int, tracking_uri: str | None = None) -> RDBStorage:
    """RDB storage with heartbeats (stale trials -> FAIL and retried with the same params) and pre-ping."""
    # SQLite: wait for the file lock rather than fail when several local workers write at once.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():          # heartbeats are "experimental" in Optuna; we rely on them knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                          heartbeat_stale_trial_callback=StaleTrialCallback(tracking_uri, 3 * heartbeat),
                          engine_kwargs=engine_kwargs)


def _pruner(spec: StudySpec, budget: Budget) -> optuna.pruners.BasePruner:
    """The study's pruner with the run's budget's `pruner` options (none for a multi-objective study)."""
    if spec.pruner.type == "none" or spec.multi_objective:
        return optuna.pruners.NopPruner()
    return spec.pruner.build(budget.pruner)


OBJECTIVES_ATTR = "mrigen.objectives"       # study user attribute: the objective metrics it was created for


def check_objectives(study: optuna.Study, spec: StudySpec, storage: str) -> None:
    """Refuse to add trials to a stored study created for other objectives (its values would not compare).

    Raises:
        ValueError: one line naming the study, what it was created for, the study file and the way out.
    """
    from mrigen.tracking import redact_uri

    stored = study.user_attrs.get(OBJECTIVES_ATTR)
    directions = [d.name.lower() for d in study.directions]
    if (stored is not None and list(stored) != list(spec.metrics)) or directions != spec.directions:
        was = ", ".join(f"{m} ({d})" for m, d in zip(stored or ["?"] * len(directions), directions))
        now = ", ".join(f"{o.metric} ({o.direction})" for o in spec.objectives)
        raise ValueError(f"study {spec.name!r} in {redact_uri(storage)} was created to optimise {was}, but "
                         f"{spec.path} now optimises {now}; use a new --storage (or --work-dir) for the new "
                         f"objective")
    if stored is None:
        study.set_user_attr(OBJECTIVES_ATTR, list(spec.metrics))


def open_study(spec: StudySpec, opts: TuneOptions, worker_index: int = 0, attempts: int = 5) -> optuna.Study:
    """Create the study once, or join it (every worker calls this with the same storage).

    Workers starting together race to create the storage's tables; a loser retries after a short backoff.
    """
    import random
    import time

    from sqlalchemy.exc import SQLAlchemyError

    from mrigen.tracking import redact_uri

    for attempt in range(attempts):
        try:
            storage = make_storage(opts.storage, opts.heartbeat, opts.tracking_uri)
            if opts.resume and spec.name not in optuna.get_all_study_names(storage):
                raise ValueError(f"--resume: no study named {spec.name!r} in the storage; start it without --resume")
            sampler = optuna.samplers.TPESampler(seed=opts.seed + worker_index)
            study = optuna.create_study(study_name=spec.name, storage=storage, sampler=sampler,
                                        pruner=_pruner(spec, budget_of(spec, opts)), directions=spec.directions,
                                        load_if_exists=True)
            check_objectives(study, spec, opts.storage)
            return study
        except (SQLAlchemyError, ImportError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            if attempt + 1 == attempts or isinstance(exc, ImportError) or "connect" in reason.lower():
                raise ValueError(f"cannot open Optuna storage {redact_uri(opts.storage)}: {reason}") from exc
            log.info("storage busy (%s); retrying", reason)
            time.sleep(0.5 + random.random() * (attempt + 1))
    raise AssertionError("unreachable")


def budget_of(spec: StudySpec, opts: TuneOptions) -> Budget:
    """The budget this run uses: the study's full or demo budget, with --n-trials / --epochs applied."""
    b = spec.budget if opts.full_budget else spec.demo_budget
    return replace(b, trials=opts.n_trials or b.trials, epochs=opts.epochs or b.epochs)


class _StopAfterFailures:
    """Stops the study when failures outnumber its trial budget (a broken config must not loop forever)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        if failed > self.limit:
            log.error("study %s: %d trials failed (limit %d); stopping", study.study_name, failed, self.limit)
            study.stop()


def run_worker(spec: StudySpec, opts: TuneOptions, store, parent_run_id: str | None,
               worker_index: int = 0) -> optuna.Study:
    """Run trials in this process until the study has its budget of finished trials (or the timeout)."""
    budget = budget_of(spec, opts)
    study = open_study(spec, opts, worker_index)
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    if done >= budget.trials:
        print(f"[{opts.worker}] study {spec.name} already has {done}/{budget.trials} finished trials; "
              f"nothing to do (raise --n-trials to add more)")
        return study
    if opts.resume:
        _requeue_interrupted(study, opts.worker)
    _enqueue_first(study, budget, "budget" if opts.full_budget else "demo_budget", opts.worker)
    runner = TrialRunner(spec=spec, store=store, budget=budget, tracking_uri=opts.tracking_uri,
                         experiment=f"mrigen-{spec.name}", parent_run_id=parent_run_id,
                         registered_name=opts.register_name or f"mrigen-{spec.name}", work_dir=opts.work_dir,
                         worker=opts.worker)
    background = _feature_net_in_background(spec, budget, store, runner.device)
    # A failing trial (bad region of the space, out of memory...) is logged by Optuna with its traceback and
    # marked FAIL; the study goes on, and _StopAfterFailures ends it if failures outnumber the budget.
    try:
        study.optimize(runner, n_trials=None, timeout=opts.timeout, gc_after_trial=True, catch=(Exception,),
                       callbacks=[optuna.study.MaxTrialsCallback(budget.trials, states=FINISHED),
                                  _StopAfterFailures(budget.trials)])
    finally:
        if background is not None:
            background.close()
    return study


def _feature_net_in_background(spec: StudySpec, budget: Budget, store, device: str):
    """On a CPU, the store's feature network (needed by the first final evaluation, trained once per store) trains
    in a child process on one core while the first trial trains on the others (mrigen.metrics.background); None
    when it is cached, on a GPU, or when the trials do not evaluate samples."""
    from mrigen.device import pick_device
    from mrigen.metrics.background import start_feature_net
    from mrigen.train.configs import build_configs

    _, train_cfg = build_configs(spec.family, spec.base, budget.layer())
    if not train_cfg.final_eval:
        return None
    return start_feature_net(store, pick_device(device), train_cfg.eval_feature_nets or None)


def _enqueue_first(study: optuna.Study, budget: Budget, key: str, worker: str) -> None:
    """A new study's first trial takes the budget's `first` values (the sampler draws any parameter it leaves
    out, and every later trial). A study that already has trials is left alone, and a second worker starting at
    the same moment finds the point queued (`skip_if_exists`), so the start is tried once."""
    if not budget.first or study.get_trials(deepcopy=False):
        return
    first = dict(budget.first)
    study.enqueue_trial(first, user_attrs={"start": f"{key}.first"}, skip_if_exists=True)
    print(f"[{worker}] first trial starts from " + ", ".join(f"{k}={v}" for k, v in first.items())
          + f" (the study's {key}.first); the sampler draws the rest", flush=True)


def _requeue_interrupted(study: optuna.Study, worker: str) -> None:
    """--resume: trials that failed (Ctrl-C, a crash) and were not retried yet run again with the same params."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} | {t.user_attrs.get("requeued_from")
                                                                       for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL and t.number not in retried and t.params:
            study.enqueue_trial(t.params, user_attrs={"requeued_from": t.number})
            print(f"[{worker}] --resume: trial {t.number} failed before finishing; re-queued with the same params",
                  flush=True)


def spawn_workers(opts: TuneOptions, argv: list[str]) -> int:
    """One worker process per (GPU, slot); returns the worst exit code. Ctrl-C is forwarded to all."""
    procs: list[subprocess.Popen] = []
    for gpu in opts.gpus:
        for slot in range(opts.trials_per_gpu):
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
            cmd = [sys.executable, "-m", "mrigen.tune", *argv, "--worker-name", f"gpu{gpu}.{slot}",
                   "--worker-index", str(len(procs))]
            procs.append(subprocess.Popen(cmd, env=env))
    print(f"started {len(procs)} worker processes on GPUs {list(opts.gpus)} "
          f"({opts.trials_per_gpu} per GPU)", flush=True)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        codes = [p.wait() for p in procs]
        raise
    return max(codes, default=0)


def run_study(spec: StudySpec, opts: TuneOptions, store, parent_run_id: str | None,
              argv: list[str] | None = None) -> optuna.Study:
    """Run the study here (CPU or one device) or through spawned GPU workers; return the loaded study."""
    if opts.gpus and argv is not None and (len(opts.gpus) > 1 or opts.trials_per_gpu > 1):
        code = spawn_workers(opts, argv)
        if code != 0:
            log.warning("a worker exited with code %d", code)
        return open_study(spec, opts)
    return run_worker(spec, opts, store, parent_run_id)
