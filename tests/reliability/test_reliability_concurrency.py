"""Reliability scenario 5: 8 processes log runs and register versions of one model at the same moment.

Against the session stack (PostgreSQL + S3 + MLflow on loopback). Each process waits at a barrier, then creates
the experiment if missing (the creation race), logs a run with params, a metric and a tiny untrained model, registers
it under one shared model name with its own distinct metric value and runs `promote_if_better`. It must hold that
every run lands in the one experiment, version numbers are unique (1..8, one per run), every version points at its
own run with its own value, no run is left RUNNING, and `champion` ends on the best value. Counts go to
``tests/reliability/.results/concurrency.json`` (read by docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1800)]   # bounds a hang; generous under load

RESULTS = Path(__file__).parent / ".results"
PROCESSES = 8
TESTLIB = Path(__file__).resolve().parents[1] / "tracking"

_CHILD = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {testlib!r})
    from mlflow import MlflowClient
    from mlflow_testlib import log_untrained_model
    from mrigen.registry import promote_if_better, register
    uri, experiment, model, go, index, value = sys.argv[1:7]
    value = float(value)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    run_id = log_untrained_model(uri, experiment, seed=int(index), metrics={{"val_ssim": value}})
    MlflowClient(uri).log_param(run_id, "worker", index)
    version = register(run_id, model, metric="val_ssim", value=value, greater_is_better=True, tracking_uri=uri)
    won = promote_if_better(model, version, tracking_uri=uri)
    print(json.dumps({{"index": int(index), "run_id": run_id, "version": version, "value": value, "won": won}}),
          flush=True)
""")


def _save(name: str, body: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(body, indent=2) + "\n")


def test_eight_processes_log_and_register_at_once(mlflow_env: str, tmp_path: Path) -> None:
    uri = mlflow_env
    tag = uuid.uuid4().hex[:8]
    experiment, model = f"concurrency-{tag}", f"concurrency-model-{tag}"
    values = [round(0.30 + 0.05 * i, 4) for i in range(PROCESSES)]
    random.Random(0).shuffle(values)                        # the best is not simply the last process started
    script, go = tmp_path / "child.py", tmp_path / "go"
    script.write_text(_CHILD.format(testlib=str(TESTLIB)))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    procs = [subprocess.Popen([sys.executable, str(script), uri, experiment, model, str(go), str(i), str(v)],
                              env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i, v in enumerate(values)]
    try:
        for p in procs:
            line = p.stdout.readline().strip()
            assert line == "ready", p.stderr.read()[-3000:]
        go.write_text("go")                                 # all eight start logging at the same moment
        outcomes, failures = [], []
        for p in procs:
            out, err = p.communicate(timeout=1200)
            if p.returncode != 0:
                failures.append(err[-2000:])
            else:
                outcomes.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    client = MlflowClient(uri, registry_uri=uri)
    exps = [e for e in client.search_experiments(filter_string=f"name = '{experiment}'")]
    exp_id = exps[0].experiment_id if len(exps) == 1 else None
    runs = client.search_runs([exp_id]) if exp_id else []
    run_ids = {o["run_id"] for o in outcomes}
    in_right_experiment = sum(client.get_run(r).info.experiment_id == exp_id for r in run_ids)
    left_running = sum(client.get_run(r).info.status == "RUNNING" for r in run_ids)
    versions = client.search_model_versions(f"name = '{model}'")
    by_version = {str(v.version): v for v in versions}
    consistent = sum(1 for o in outcomes if o["version"] in by_version
                     and by_version[o["version"]].run_id == o["run_id"]
                     and float(by_version[o["version"]].tags["mrigen.metric_value"]) == o["value"])
    champion = client.get_model_version_by_alias(model, "champion") if versions else None
    best = max(outcomes, key=lambda o: o["value"]) if outcomes else None
    _save("concurrency", {
        "processes": PROCESSES, "process_failures": len(failures), "runs_logged": len(run_ids),
        "experiments_named": len(exps), "runs_in_experiment": len(runs),
        "runs_in_right_experiment": in_right_experiment,
        "runs_left_running": left_running, "versions_registered": len(versions),
        "unique_version_numbers": len({str(v.version) for v in versions}),
        "versions_matching_their_run_and_value": consistent,
        "champion_is_best": bool(champion and best and str(champion.version) == best["version"]),
        "best_process_reported_champion": bool(best and best["won"])})

    assert not failures, failures[0]
    assert len(exps) == 1 and {r.info.run_id for r in runs} == run_ids and len(run_ids) == PROCESSES
    assert in_right_experiment == PROCESSES and left_running == 0
    assert sorted(by_version, key=int) == [str(i) for i in range(1, PROCESSES + 1)]   # unique, no gap, no extra
    assert consistent == PROCESSES
    assert str(champion.version) == best["version"] and best["won"] is True
    assert all(v.tags.get("mrigen.candidate") == "true" for v in versions)
