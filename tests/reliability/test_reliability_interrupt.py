"""Reliability scenario 7: Ctrl-C (SIGINT) during `mrigen.generate` and during a study, then `--resume`.

- generate: a real `python -m mrigen.generate` process (file writes slowed down by a wrapper so the signal lands
  mid-set) is interrupted twice, then resumed to the end. Nothing appears under --out until the set is complete,
  every file kept in OUT.partial/ is whole (its sha256 matches its completion record), no temp file is left, and
  the final set is byte-identical to an uninterrupted in-process run.
- study: `python -m mrigen.tune` on the session stack (Optuna on PostgreSQL, MLflow server) is interrupted while a
  trial runs, then rerun with `--resume`. Trials finished before the signal keep their state, value and MLflow run
  (no second run), the interrupted trial and its run are closed (not RUNNING), no scratch folder is left, and the
  study reaches its trial count with the champion on its best trial.

Counts go to ``tests/reliability/.results/interrupt-*.json`` (read by docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from mrigen.generate import DONE_FILE, generate, partial_dir, resolve_model
from mrigen.models import ModelConfig, build_model, save_model

# Deadlines only bound a hang: they are generous so that a machine kept busy by other work still passes.
pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1800)]

RESULTS = Path(__file__).parent / ".results"
N_SLICES, BATCH = 48, 4
_SLOW_GENERATE = textwrap.dedent("""
    import sys, time
    import mrigen.generate as g
    real = g._write_one
    def slow(path, image, fmt):
        time.sleep(0.05)
        real(path, image, fmt)
    g._write_one = slow
    sys.exit(g.main(sys.argv[1:]))
""")
STUDY = """
description: interrupt/resume study for the reliability tests
family: vae
base:
  model: {blocks: 3}
  train: {batch_size: 16, grid_every: 1}
search_space:
  train.lr: {type: float, low: 5.0e-4, high: 3.0e-3, log: true}
  model.kernel_size: {type: categorical, choices: [3, 4]}
objective: {metric: val_ssim, direction: maximize}
pruner: {type: none}
demo_budget: {trials: 2, epochs: 1, image_size: 32}
"""


def _sigint_default() -> None:
    """preexec_fn: the child gets SIGINT's default action even when this test runs as a background job of a
    non-interactive shell (nohup, `cmd &` in a script), which starts it with SIGINT ignored; a Ctrl-C from a
    terminal is never ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt in this process, as in a process started from a terminal, also when pytest
    inherited SIGINT ignored (a background job). The ignored disposition is not put back afterwards: safety's
    handler, installed once per process on top of it, must stay in place for the next test."""
    from mrigen.tracking import safety

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.MonkeyPatch.context() as mp:
        if safety._PREVIOUS.get(signal.SIGINT) == signal.SIG_IGN:         # safety would chain to "ignore"
            mp.setitem(safety._PREVIOUS, signal.SIGINT, signal.default_int_handler)
        yield


def _save(name: str, body: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(body, indent=2) + "\n")


def _wait(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll `predicate` until true; fail (with the process's output) if the process ends or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _done_lines(out: Path) -> int:
    path = partial_dir(out) / DONE_FILE
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_generate_interrupted_twice_then_resumed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model_dir = save_model(build_model(ModelConfig(image_size=32, blocks=3, channels=(8, 16, 32), latent_dim=16)),
                           tmp_path / "model")
    reference = tmp_path / "reference"
    generate(resolve_model(str(model_dir), device="cpu"), N_SLICES, reference, seed=3, batch_size=BATCH,
             progress=False)
    wrapper = tmp_path / "slow_generate.py"
    wrapper.write_text(_SLOW_GENERATE)
    out = tmp_path / "synth"
    args = ["--model", str(model_dir), "-n", str(N_SLICES), "--batch-size", str(BATCH), "--seed", "3",
            "--out", str(out), "--device", "cpu", "--no-progress"]
    interrupts, kept, whole, resumed_from = 0, [], 0, []
    for stop_after in (6, 25):                          # first run, then a resumed run, each Ctrl-C'd mid-set
        extra = ["--resume"] if interrupts else []
        proc = subprocess.Popen([sys.executable, str(wrapper), *args, *extra], text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=_sigint_default)
        _wait(lambda: _done_lines(out) >= stop_after, proc, 900, f"{stop_after} slices")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=600)
        interrupts += 1
        assert proc.returncode == 130, err[-3000:]
        assert "rerun with --resume" in err and not out.exists()
        partial = partial_dir(out)
        records = [json.loads(line) for line in (partial / DONE_FILE).read_text().splitlines()]
        slices = sorted(p.name for p in partial.glob("slice_*"))
        assert not list(partial.glob(".tmp-*"))                                  # no half-written file
        assert sorted(r["file"] for r in records) == slices                     # every file recorded, nothing else
        ref = _tree(reference)
        whole += sum(ref[name] == (partial / name).read_bytes() for name in slices)
        assert all(ref[name] == (partial / name).read_bytes() for name in slices)
        kept.append(len(slices))
        if interrupts > 1:
            resumed_from.append(int(err.split("resuming")[1].split(":")[1].split("/")[0]))
    assert kept[0] >= 6 and kept[1] >= 25 and resumed_from == [kept[0]]
    proc = subprocess.run([sys.executable, "-m", "mrigen.generate", *args, "--resume"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming {partial_dir(out)}: {kept[1]}/{N_SLICES}" in proc.stderr
    identical = _tree(out) == _tree(reference)
    _save("interrupt-generate", {"slices": N_SLICES, "batch_size": BATCH, "sigint_sent": interrupts,
                                 "slices_kept_at_each_interrupt": kept, "kept_files_whole_and_correct": whole,
                                 "half_written_files": 0, "out_written_before_completion": False,
                                 "regenerated_after_last_resume": N_SLICES - kept[1],
                                 "final_set_identical_to_uninterrupted_run": identical})
    assert identical and not partial_dir(out).exists()


def _tune(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mrigen.tune", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_sigint_default)


def test_study_interrupted_then_resumed(stack, mlflow_env: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from mrigen.data import build_demo_store

    store = build_demo_store(tmp_path / "store", subjects=6, size=32, seed=0, progress=False)
    name = f"intr-{uuid.uuid4().hex[:8]}"
    study_file = tmp_path / f"{name}.yaml"
    study_file.write_text(textwrap.dedent(STUDY))
    work = tmp_path / "work"
    env = {**os.environ, "MLFLOW_TRACKING_URI": stack.tracking_uri, "OPTUNA_STORAGE": stack.postgres_url}
    args = ["--study", str(study_file), "--data", str(store.path), "--work-dir", str(work), "--n-trials", "2"]
    storage = optuna.storages.RDBStorage(stack.postgres_url)

    def trials():
        try:
            return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        except KeyError:                                        # not created yet
            return []

    client = MlflowClient(stack.tracking_uri)

    def training_now() -> bool:
        """A trial finished, and the running trial's MLflow run exists (the signal lands mid-training)."""
        ts = trials()
        running = [t.number for t in ts if t.state == TrialState.RUNNING]
        if not running or not any(t.state == TrialState.COMPLETE for t in ts):
            return False
        exp = client.get_experiment_by_name(f"mrigen-{name}")
        return exp is not None and bool(client.search_runs(
            [exp.experiment_id], f"tags.`optuna.trial_number` = '{running[0]}' and attributes.status = 'RUNNING'"))

    proc = _tune(args, tmp_path, env)
    _wait(training_now, proc, 1200, "one finished trial and a running trial with its MLflow run")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "interrupt-study-sigint.log").write_text(out + "\n---- stderr ----\n" + err)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    before = {t.number: t for t in trials()}
    finished_before = {n: t for n, t in before.items() if t.state == TrialState.COMPLETE}
    left_running = [n for n, t in before.items() if t.state == TrialState.RUNNING]
    exp = client.get_experiment_by_name(f"mrigen-{name}")
    runs_after_interrupt = client.search_runs([exp.experiment_id])
    open_runs = [r.info.run_name for r in runs_after_interrupt if r.info.status == "RUNNING"]
    scratch_left = list((work / "trials").glob("*")) if (work / "trials").exists() else []

    resumed = _tune([*args, "--resume"], tmp_path, env)
    rout, rerr = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, rout[-2000:] + rerr[-3000:]
    after = {t.number: t for t in trials()}
    complete = [t for t in after.values() if t.state == TrialState.COMPLETE]
    runs = client.search_runs([exp.experiment_id])
    trial_runs: dict[str, list] = {}
    for r in runs:
        if "optuna.trial_number" in r.data.tags:
            trial_runs.setdefault(r.data.tags["optuna.trial_number"], []).append(r)
    unchanged = sum(after[n].state == TrialState.COMPLETE and after[n].value == t.value
                    and after[n].user_attrs.get("mlflow_run_id") == t.user_attrs.get("mlflow_run_id")
                    for n, t in finished_before.items())
    redone = sum(len(trial_runs.get(str(n), [])) - 1 for n in finished_before)
    champion = client.get_model_version_by_alias(f"mrigen-{name}", "champion")
    # the champion is the study's promotion-rule pick: the trial that meets `require` and ranks first on its metric
    sign = 1.0 if champion.tags["mrigen.greater_is_better"] == "True" else -1.0
    eligible = [t for t in complete if not t.user_attrs["promotion"]["failures"]]
    best = min(eligible, key=lambda t: (-sign * t.user_attrs["promotion"]["value"], t.number))
    interrupted = [t for n, t in before.items() if t.state == TrialState.FAIL]
    interrupted_run_status = [client.get_run(t.user_attrs["mlflow_run_id"]).info.status if "mlflow_run_id" in
                              t.user_attrs else next((r.info.status for r in trial_runs.get(str(t.number), [])), None)
                              for t in interrupted]
    _save("interrupt-study", {
        "sigint_sent": 1, "trials_target": 2, "finished_before_interrupt": len(finished_before),
        "trials_left_running_after_interrupt": len(left_running), "interrupted_trials_failed": len(interrupted),
        "interrupted_trial_run_status": interrupted_run_status, "mlflow_runs_left_running": len(open_runs),
        "scratch_dirs_left": len(scratch_left), "finished_trials_unchanged_after_resume": unchanged,
        "finished_trials_redone": redone, "complete_after_resume": len(complete),
        "trials_total": len(after), "champion_is_best_trial": champion.run_id == best.user_attrs["mlflow_run_id"],
        "runs_running_at_end": sum(r.info.status == "RUNNING" for r in runs),
        "interrupted_trial_requeued_same_params": sum(t.user_attrs.get("requeued_from") == i.number
                                                      and t.params == i.params
                                                      for t in after.values() for i in interrupted)})

    assert finished_before and not left_running and len(interrupted) == 1
    assert not open_runs and interrupted_run_status == ["KILLED"]
    assert scratch_left == []
    assert unchanged == len(finished_before) and redone == 0
    assert len(complete) == 2 and len(after) == 3                 # 2 finished + the one interrupted
    assert champion.run_id == best.user_attrs["mlflow_run_id"]
    assert all(r.info.status != "RUNNING" for r in runs)
    requeued = [t for t in after.values() if t.user_attrs.get("requeued_from") == interrupted[0].number]
    assert len(requeued) == 1 and requeued[0].params == interrupted[0].params       # same params, run again
    assert requeued[0].state == TrialState.COMPLETE


def _sigint_tripped(delivery: str) -> None:
    """Send a real SIGINT and return once its C-level handler has run (read from a wakeup pipe), so the window
    under test is exercised on every run, however loaded the machine is.

    "process": os.kill on this process; the kernel hands it to any thread not blocking it.
    "other thread": to a live thread that does not block it: what the kernel does with a Ctrl-C while the main
    thread blocks SIGINT, and how issue 12's run was left RUNNING (the handler then runs in the main thread at
    once, whatever the main thread's mask)."""
    import select
    import threading

    r, w = os.pipe()
    os.set_blocking(w, False)
    old_fd = signal.set_wakeup_fd(w)
    ready, stop = threading.Event(), threading.Event()

    def other_thread() -> None:           # like MLflow's and torch's threads, started before the window
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        ready.set()
        stop.wait()

    helper = threading.Thread(target=other_thread, daemon=True)
    helper.start()
    ready.wait()
    try:
        if delivery == "other thread":
            signal.pthread_kill(helper.ident, signal.SIGINT)
        else:
            os.kill(os.getpid(), signal.SIGINT)
        # held by the main thread's mask: it stays pending until the mask is lifted, nothing to wait for
        pending = signal.SIGINT in signal.sigpending()
        if not pending:
            assert select.select([r], [], [], 120)[0], "SIGINT not delivered within 120 s"
    finally:
        stop.set()
        signal.set_wakeup_fd(old_fd)
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("delivery", ["process", "other thread"])
def test_ctrl_c_right_after_the_run_is_created_leaves_no_running_run(mlflow_env: str, monkeypatch,
                                                                      delivery: str, sigint_raises) -> None:
    from mlflow import MlflowClient

    from mrigen.tracking import MlflowHook
    from mrigen.train.hooks import TrainContext

    cfg = ModelConfig(image_size=32, blocks=3, channels=(8, 16, 32), latent_dim=16)
    from mrigen.train import TrainConfig

    ctx = TrainContext(model=build_model(cfg), model_cfg=cfg, train_cfg=TrainConfig(epochs=1, device="cpu"),
                       device=torch.device("cpu"), data_digest="0" * 64, data_path="/tmp/x", out_dir=None,
                       n_train=1, n_val=1)
    experiment, created = f"ctrl-c-{uuid.uuid4().hex[:8]}", []
    real = MlflowClient.create_run

    def create_then_interrupt(self, *args, **kwargs):
        run = real(self, *args, **kwargs)
        created.append(run.info.run_id)
        _sigint_tripped(delivery)                    # a real Ctrl-C, arriving as the server's answer comes back
        return run

    monkeypatch.setattr(MlflowClient, "create_run", create_then_interrupt)
    hook = MlflowHook(tracking_uri=mlflow_env, experiment=experiment, system_metrics=False)
    with pytest.raises(KeyboardInterrupt):
        hook.on_start(ctx)
    monkeypatch.undo()
    client = MlflowClient(mlflow_env)
    runs = [client.get_run(r) for r in created]
    slug = delivery.replace(" ", "-")
    _save(f"interrupt-create-run-window-{slug}", {
        "delivery": delivery, "sigint_sent": 1, "runs_created": len(created),
        "runs_left_running": sum(r.info.status == "RUNNING" for r in runs),
        "statuses": [r.info.status for r in runs]})
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    assert runs[0].data.tags.get("mrigen.end_reason") == "received SIGINT"


def test_ctrl_c_right_after_the_study_parent_run_is_created_leaves_it_killed(tmp_path: Path, monkeypatch,
                                                                            sigint_raises) -> None:
    """The study's parent run has the same window (local SQLite tracking store; no server needed)."""
    from mlflow import MlflowClient

    from mrigen.tracking import safety
    from mrigen.tune.report import ensure_parent_run
    from mrigen.tune.study import load_study

    study_file = tmp_path / "parent-window.yaml"
    study_file.write_text(textwrap.dedent(STUDY))
    spec = load_study(str(study_file))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    created = []
    real = MlflowClient.create_run

    def create_then_interrupt(self, *args, **kwargs):
        run = real(self, *args, **kwargs)
        created.append(run.info.run_id)
        _sigint_tripped("other thread")
        return run

    monkeypatch.setattr(MlflowClient, "create_run", create_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        ensure_parent_run(optuna.create_study(study_name=spec.name), spec, uri, "parent-window")
    monkeypatch.undo()
    run = MlflowClient(uri).get_run(created[0])
    _save("interrupt-parent-run-window", {"sigint_sent": 1, "runs_created": len(created),
                                          "runs_left_running": int(run.info.status == "RUNNING")})
    assert len(created) == 1 and run.info.status == "KILLED" and created[0] not in safety.open_runs()
    assert run.data.tags.get("mrigen.end_reason") == "received SIGINT"
