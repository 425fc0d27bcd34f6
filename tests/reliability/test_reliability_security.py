"""Reliability scenario 8: security of the deployed MLflow server (the `mlflow_server/` entrypoint) and of clients.

Already covered elsewhere (not repeated here): foreign Host header on a GET (tests/stack/test_stack_servers.py::
test_foreign_host_header_is_refused), `..` through both artifact GET routes (::test_artifact_path_traversal_is_refused),
model-version sources outside the allowed schemes (::test_model_version_source_must_be_a_tracked_location), no
secret in server logs (::test_no_secret_in_server_logs), 401 without / with wrong credentials when auth is on
(tests/stack/test_stack_lifecycle.py::test_auth_stack_lifecycle), entrypoint refusing auth without a password
(tests/stack/test_stack_config.py). This file adds: foreign Host on a write and look-alike hosts; traversal through
the artifact upload, list and model-version routes; a credential scan of everything a tracked training run and a
tracked tune trial record; no unpickling when a registered model is pulled; no unsafe deserialisation call in mrigen/.
Counts go to ``tests/reliability/.results/security.json``.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1800)]   # bounds a hang; generous under load

RESULTS = Path(__file__).parent / ".results"
PACKAGE = Path(__file__).resolve().parents[2] / "mrigen"
_COUNTS: dict[str, object] = {}


def _save() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "security.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **_COUNTS}, indent=2) + "\n")


def _request(url: str, method: str = "GET", headers: dict | None = None, data: bytes | None = None):
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _secrets(stack) -> dict[str, str]:
    found = {"S3 secret key": stack.s3_secret_key, "S3 access key": stack.s3_access_key,
             "Optuna DB password": urlsplit(stack.postgres_url).password or "",
             "MLflow DB password": urlsplit(stack.mlflow_db_url.replace("+psycopg", "")).password or "",
             "MLflow admin password": stack.admin_password}
    return {k: v for k, v in found.items() if v and len(v) >= 6}


def test_foreign_host_on_writes_and_look_alike_hosts_is_refused(stack) -> None:
    base, port = stack.tracking_uri, urlsplit(stack.tracking_uri).port
    name = f"rebinding-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"name": name}).encode()
    refused = 0
    for host in ("attacker.example.com", f"127.0.0.1.attacker.example.com:{port}", f"localhost:{port + 1}",
                 f"attacker.example.com:{port}"):
        code, _ = _request(f"{base}/api/2.0/mlflow/experiments/create", "POST",
                           {"Host": host, "Content-Type": "application/json"}, body)
        assert code in (400, 403), (host, code)
        code, _ = _request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
        assert code in (400, 403), (host, code)
        refused += 2
    assert MlflowClient(base).get_experiment_by_name(name) is None          # the write never happened
    code, _ = _request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": f"localhost:{port}"})
    assert code == 200
    _COUNTS["foreign_host_requests_refused"] = refused
    _save()


def test_artifact_traversal_on_upload_list_and_model_routes_is_refused(stack, mlflow_env: str) -> None:
    from mrigen.stack.s3 import client as s3_client

    base = stack.tracking_uri
    client = MlflowClient()
    exp = client.create_experiment(f"traversal-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(exp).info.run_id
    marker = f"escaped-{uuid.uuid4().hex[:8]}"
    attempts = [
        ("PUT", f"/api/2.0/mlflow-artifacts/artifacts/..%2F..%2F{marker}.txt"),
        ("PUT", f"/api/2.0/mlflow-artifacts/artifacts/x/%2E%2E/%2E%2E/%2E%2E/{marker}.txt"),
        ("GET", "/api/2.0/mlflow-artifacts/artifacts?path=..%2F..%2F.."),
        ("GET", f"/get-artifact?path=..%2F..%2F..%2F..%2Fetc%2Fpasswd&run_uuid={run_id}"),
        ("GET", f"/ajax-api/2.0/mlflow/get-artifact?path=../../../../etc/passwd&run_uuid={run_id}"),
        ("GET", "/model-versions/get-artifact?path=../../../../etc/passwd&name=x&version=1"),
        ("GET", f"/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=../../.."),
    ]
    refused = 0
    for method, path in attempts:
        code, body = _request(base + path, method, data=b"pwned" if method == "PUT" else None)
        assert code in (400, 403, 404), (method, path, code, body[:200])
        assert b"root:" not in body
        refused += 1
    s3 = s3_client(stack.s3_endpoint, stack.s3_access_key, stack.s3_secret_key)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket)
            for o in page.get("Contents", [])]
    assert not [k for k in keys if marker in k]                             # nothing written anywhere
    _COUNTS["artifact_traversal_requests_refused"] = refused
    _save()


_TUNE_STUDY = """
description: security scan study
family: vae
base: {model: {blocks: 3}, train: {batch_size: 16, grid_every: 1}}
search_space: {train.lr: {type: float, low: 5.0e-4, high: 3.0e-3, log: true}}
objective: {metric: val_ssim, direction: maximize}
pruner: {type: none}
demo_budget: {trials: 1, epochs: 1, image_size: 32}
"""


def _texts_of_runs(client: MlflowClient, experiment_ids: list[str], dst: Path) -> tuple[list[str], dict]:
    """Params, tags, metric keys and every artifact file (as text) of the experiments' runs and logged models."""
    texts, counts = [], {"runs": 0, "params": 0, "tags": 0, "metric_keys": 0, "artifact_files": 0}
    for run in client.search_runs(experiment_ids):
        counts["runs"] += 1
        texts += [f"{k}={v}" for k, v in run.data.params.items()] + [f"{k}={v}" for k, v in run.data.tags.items()]
        texts += list(run.data.metrics)
        counts["params"] += len(run.data.params)
        counts["tags"] += len(run.data.tags)
        counts["metric_keys"] += len(run.data.metrics)
        local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(dst / run.info.run_id)))
        for f in (p for p in local.rglob("*") if p.is_file()):
            texts.append(f.read_bytes().decode("latin-1"))
            counts["artifact_files"] += 1
    for model in client.search_logged_models(experiment_ids=experiment_ids):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model.model_id}",
                                                         dst_path=str(dst / model.model_id)))
        texts += [json.dumps(model.params), json.dumps(model.tags)]
        for f in (p for p in local.rglob("*") if p.is_file()):
            texts.append(f.read_bytes().decode("latin-1"))
            counts["artifact_files"] += 1
    return texts, counts


def test_no_credential_in_anything_a_training_run_and_a_tune_trial_record(stack, mlflow_env: str, tmp_path: Path,
                                                                            caplog, capfd) -> None:
    from mrigen.data import build_demo_store
    from mrigen.models import ModelConfig
    from mrigen.registry import promote_if_better, register
    from mrigen.tracking import MlflowHook
    from mrigen.train import TrainConfig, train

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.WARNING, logger="botocore")
    secrets = _secrets(stack)
    store = build_demo_store(tmp_path / "store", subjects=6, size=32, seed=0, progress=False)
    tag = uuid.uuid4().hex[:8]
    experiment, model_name = f"secscan-{tag}", f"secscan-model-{tag}"
    hook = MlflowHook(tracking_uri=mlflow_env, experiment=experiment, system_metrics=False)
    train_cfg = TrainConfig(epochs=1, batch_size=16, device="cpu", grid_every=1, final_eval=False)
    result = train(ModelConfig(image_size=32, blocks=3, channels=(8, 16, 32), latent_dim=16), train_cfg, store,
                   hooks=[hook], progress=False)
    version = register(hook.run_id, model_name, metric="val_ssim", value=result.history[-1]["val_ssim"],
                       greater_is_better=True, tracking_uri=mlflow_env)
    promote_if_better(model_name, version, tracking_uri=mlflow_env)

    study = tmp_path / f"secscan-{tag}.yaml"
    study.write_text(textwrap.dedent(_TUNE_STUDY))
    # A worker box that holds every secret in its environment: none may reach MLflow or the output.
    env = {**os.environ, "MLFLOW_TRACKING_URI": stack.tracking_uri, "PGPASSWORD": secrets["Optuna DB password"],
           "AWS_ACCESS_KEY_ID": stack.s3_access_key, "AWS_SECRET_ACCESS_KEY": stack.s3_secret_key,
           "MLFLOW_AUTH_ADMIN_PASSWORD": stack.admin_password}
    tune = subprocess.run([sys.executable, "-m", "mrigen.tune", "--study", str(study), "--data", str(store.path),
                           "--storage", stack.postgres_url, "--work-dir", str(tmp_path / "work")],
                          env=env, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert tune.returncode == 0, tune.stdout[-2000:] + tune.stderr[-3000:]

    client = MlflowClient(mlflow_env, registry_uri=mlflow_env)
    exp_ids = [client.get_experiment_by_name(n).experiment_id for n in (experiment, f"mrigen-secscan-{tag}")]
    texts, counts = _texts_of_runs(client, exp_ids, tmp_path / "downloads")
    for name in (model_name, f"mrigen-secscan-{tag}"):
        for mv in client.search_model_versions(f"name = '{name}'"):
            texts += [json.dumps(mv.tags), mv.description or ""]
            counts["model_versions"] = counts.get("model_versions", 0) + 1
    logs = [caplog.text, *capfd.readouterr(), tune.stdout, tune.stderr]
    counts["log_lines"] = sum(t.count("\n") for t in logs)
    leaks = {name: sum(secret in t for t in texts + logs) for name, secret in secrets.items()}
    _COUNTS.update({"credential_scan": {**counts, "secrets_checked": len(secrets), "leaks": sum(leaks.values())}})
    _save()
    assert counts["runs"] >= 3 and counts["artifact_files"] > 10               # run, study parent, trial
    assert not any(leaks.values()), {k: v for k, v in leaks.items() if v}


def test_pulling_a_registered_model_never_unpickles(mlflow_env: str, tmp_path: Path, monkeypatch) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracking"))
    from mlflow_testlib import log_untrained_model

    from mrigen.registry import PICKLE_SUFFIXES, register

    name = f"nopickle-{uuid.uuid4().hex[:8]}"
    run_id = log_untrained_model(mlflow_env, f"nopickle-{uuid.uuid4().hex[:8]}", seed=0)
    version = register(run_id, name, metric="val_ssim", value=0.5, greater_is_better=True, tracking_uri=mlflow_env)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp_path)))
    files = [p for p in local.rglob("*") if p.is_file()]
    pickled = [p.name for p in files if p.suffix.lower() in PICKLE_SUFFIXES
               or p.read_bytes()[:1] == b"\x80" or p.read_bytes()[:2] == b"PK"]      # pickle / torch zip magic
    assert not pickled and any(p.name == "model.safetensors" for p in files)

    calls: list[str] = []

    def spy(label, real):
        def wrapper(*args, **kwargs):
            calls.append(f"{label}: {getattr(args[0], 'name', type(args[0]).__name__) if args else ''}")
            return real(*args, **kwargs)
        return wrapper

    class SpyUnpickler(pickle.Unpickler):
        def __init__(self, file, *args, **kwargs):
            calls.append(f"Unpickler: {getattr(file, 'name', type(file).__name__)}")
            super().__init__(file, *args, **kwargs)

    import torch

    monkeypatch.setattr(pickle, "load", spy("pickle.load", pickle.load))
    monkeypatch.setattr(pickle, "loads", spy("pickle.loads", pickle.loads))
    monkeypatch.setattr(pickle, "Unpickler", SpyUnpickler)
    monkeypatch.setattr(torch, "load", spy("torch.load", torch.load))
    try:
        import cloudpickle

        monkeypatch.setattr(cloudpickle, "load", spy("cloudpickle.load", cloudpickle.load))
        monkeypatch.setattr(cloudpickle, "loads", spy("cloudpickle.loads", cloudpickle.loads))
    except ImportError:
        pass
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    monkeypatch.undo()
    assert model.predict({"n": 2, "seed": 0}).shape == (2, 32, 32)
    _COUNTS["pull_model_files"] = len(files)
    _COUNTS["pickle_files_in_pulled_model"] = len(pickled)
    _COUNTS["unpickle_calls_during_load"] = len(calls)
    _save()
    assert calls == [], calls


# Calls that deserialise with pickle (arbitrary code execution on load).
_UNSAFE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cloudpickle", "load"),
                 ("cloudpickle", "loads"), ("dill", "load"), ("dill", "loads"), ("joblib", "load"),
                 ("pd", "read_pickle"), ("pandas", "read_pickle"), ("shelve", "open"), ("marshal", "loads"),
                 ("marshal", "load")}
_UNSAFE_IMPORTS = {"pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal", "_pickle"}


def _findings(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    """Unsafe deserialisation in one source file, as `file:line: what` (found with the AST, not a regex)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else \
                [(node.module or "").split(".")[0]]
            found += [f"{where}: imports {m}" for m in mods if m in _UNSAFE_IMPORTS]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = (func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None,
                func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None))
        kw = {k.arg: k.value for k in node.keywords}
        if name in _UNSAFE_CALLS:
            found.append(f"{where}: {name[0]}.{name[1]}(...)")
        if name[1] == "load" and name[0] == "torch":
            safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not safe:
                found.append(f"{where}: torch.load without weights_only=True")
        if name[1] == "load" and name[0] in ("np", "numpy"):
            if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is not False:
                found.append(f"{where}: np.load(allow_pickle=True)")
        if name[1] == "load" and name[0] == "yaml":                       # yaml.load can build Python objects
            found.append(f"{where}: yaml.load (use yaml.safe_load)")
    return found


def test_no_unsafe_deserialisation_in_mrigen() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    findings = [f for path in sources for f in _findings(path)]
    _COUNTS["python_files_scanned"] = len(sources)
    _COUNTS["unsafe_deserialisation_calls"] = len(findings)
    _save()
    assert len(sources) > 30 and not findings, findings


def test_the_scanner_catches_unsafe_calls(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import pickle\nimport torch, yaml, numpy as np\ntorch.load('m.pt')\n"
                     "torch.load('m.pt', weights_only=False)\ntorch.load('m.pt', weights_only=True)\n"
                     "np.load('a.npy', allow_pickle=True)\nnp.load('a.npy')\npickle.loads(b'')\nyaml.load('x')\n")
    found = _findings(probe, root=tmp_path)
    assert [f.split(": ", 1)[1] for f in found] == [
        "imports pickle", "torch.load without weights_only=True", "torch.load without weights_only=True",
        "np.load(allow_pickle=True)", "pickle.loads(...)", "yaml.load (use yaml.safe_load)"], found
