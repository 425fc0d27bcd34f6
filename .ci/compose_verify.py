"""Checks for .ci/compose_check.sh, run from the host against the compose stack's published ports.

    python .ci/compose_verify.py record STATE.json MODEL_NAME STUDY   # after the training: what must survive
    python .ci/compose_verify.py verify STATE.json                    # after the restart: is it all still there
    python .ci/compose_verify.py refuse                               # requests without credentials are refused

Settings come from the environment: MLFLOW_TRACKING_URI / MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
(the client's), CHECK_S3_ENDPOINT / CHECK_S3_ACCESS_KEY / CHECK_S3_SECRET_KEY / CHECK_S3_BUCKET (the admin's
direct view of the bucket), CHECK_PG_HOST / CHECK_PG_PORT / CHECK_PG_USER and PGPASSWORD. Each failed check
raises SystemExit with one line saying what was wrong; no secret is printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


# What mrigen.tracking.client sets for mrigen's own commands: artifacts stream through the tracking server
# instead of presigned URLs that name the server's internal S3 address (docs/STACK.md).
os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")


def fail(msg: str) -> None:
    raise SystemExit(f"compose-verify: {msg}")


def s3_client(access: str | None = None, secret: str | None = None):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=os.environ["CHECK_S3_ENDPOINT"], region_name="us-east-1",
                        aws_access_key_id=access or os.environ["CHECK_S3_ACCESS_KEY"],
                        aws_secret_access_key=secret or os.environ["CHECK_S3_SECRET_KEY"],
                        config=Config(retries={"max_attempts": 2}))


def s3_objects(ids: list[str]) -> dict[str, str]:
    """sha256 of every object in the bucket whose key holds one of `ids` (a run id, a logged model id)."""
    s3, bucket = s3_client(), os.environ["CHECK_S3_BUCKET"]
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            if any(i in obj["Key"] for i in ids):
                body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                out[obj["Key"]] = hashlib.sha256(body).hexdigest()
    return out


def pg_connect(dbname: str, password: str | None):
    import psycopg

    kwargs = dict(host=os.environ["CHECK_PG_HOST"], port=int(os.environ["CHECK_PG_PORT"]),
                  user=os.environ["CHECK_PG_USER"], dbname=dbname, connect_timeout=10)
    env_pw = os.environ.pop("PGPASSWORD", None)        # so that libpq cannot fall back on it
    try:
        return psycopg.connect(**kwargs, **({"password": password} if password is not None else {}))
    finally:
        if env_pw is not None:
            os.environ["PGPASSWORD"] = env_pw


def snapshot(name: str, study: str) -> dict:
    """What the stack holds for the champion of `name` and the Optuna study `study`."""
    import mlflow
    import optuna
    from mlflow import MlflowClient

    client = MlflowClient()
    mv = client.get_model_version_by_alias(name, "champion")
    run = client.get_run(mv.run_id)
    model_id = (mv.source or "").removeprefix("models:/")
    if not model_id.startswith("m-"):
        fail(f"model version {name}/{mv.version} has source {mv.source!r}, expected models:/m-...")
    objects = s3_objects([run.info.run_id, model_id])
    if not any(run.info.run_id in k for k in objects):
        fail(f"no object of run {run.info.run_id} in bucket {os.environ['CHECK_S3_BUCKET']}")
    if not any(model_id in k for k in objects):
        fail(f"no object of logged model {model_id} in bucket {os.environ['CHECK_S3_BUCKET']}")
    # one artifact read back through the tracking server's artifact proxy must equal the object in S3
    grid = sorted(a.path for a in client.list_artifacts(run.info.run_id) if not a.is_dir)   # loss_curves.png
    if not grid:
        fail(f"run {run.info.run_id} lists no artifact file")
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=grid[0])
    proxied = hashlib.sha256(Path(local).read_bytes()).hexdigest()
    in_s3 = [h for k, h in objects.items() if k.endswith(f"{run.info.run_id}/artifacts/{grid[0]}")]
    if in_s3 != [proxied]:
        fail(f"artifact {grid[0]} read through MLflow differs from the S3 object (or is missing there)")
    storage = (f"postgresql+psycopg://{os.environ['CHECK_PG_USER']}@{os.environ['CHECK_PG_HOST']}:"
               f"{os.environ['CHECK_PG_PORT']}/optuna")
    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    return {"name": name, "study": study, "version": mv.version, "run_id": run.info.run_id, "model_id": model_id,
            "run_status": run.info.status, "params": run.data.params, "metrics": run.data.metrics,
            "objects": objects, "proxied_artifact": [grid[0], proxied],
            "trials": [[t.number, t.state.name, t.value] for t in trials]}


def record(state_path: str, name: str, study: str) -> None:
    snap = snapshot(name, study)
    if snap["run_status"] != "FINISHED":
        fail(f"run {snap['run_id']} is {snap['run_status']}, expected FINISHED")
    if not any(state == "COMPLETE" for _, state, _ in snap["trials"]):
        fail(f"study {study} has no COMPLETE trial")
    Path(state_path).write_text(json.dumps(snap, indent=1, sort_keys=True))
    print(f"recorded: {name} v{snap['version']} (champion), run {snap['run_id']} FINISHED with "
          f"{len(snap['params'])} params / {len(snap['metrics'])} metrics, {len(snap['objects'])} S3 objects, "
          f"{len(snap['trials'])} Optuna trial(s)")


def verify(state_path: str) -> None:
    before = json.loads(Path(state_path).read_text())
    after = snapshot(before["name"], before["study"])
    for key in ("version", "run_id", "model_id", "run_status", "params", "metrics", "proxied_artifact", "trials"):
        if after[key] != before[key]:
            fail(f"after the restart {key} differs: {before[key]!r:.200} -> {after[key]!r:.200}")
    lost = sorted(set(before["objects"]) - set(after["objects"]))
    changed = sorted(k for k in before["objects"] if k in after["objects"] and after["objects"][k] != before["objects"][k])
    if lost or changed:
        fail(f"after the restart {len(lost)} S3 object(s) missing, {len(changed)} changed: {(lost + changed)[:3]}")
    print(f"verified after restart: {before['name']} v{after['version']} still champion, run {after['run_id']} with "
          f"the same params/metrics, {len(after['objects'])} S3 objects identical, artifact proxy reads them, "
          f"{len(after['trials'])} Optuna trial(s) kept")


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def refuse() -> None:
    import base64

    from botocore.exceptions import ClientError

    uri = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    user, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]

    def basic(u: str, p: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()}

    checks = [("MLflow API without credentials", http_status(api), 401),
              ("MLflow API with a wrong password", http_status(api, basic(user, password + "x")), 401),
              ("MLflow artifact proxy without credentials",
               http_status(f"{uri}/api/2.0/mlflow-artifacts/artifacts?path="), 401),
              ("MLflow API with the admin's credentials", http_status(api, basic(user, password)), 200)]
    bucket, endpoint = os.environ["CHECK_S3_BUCKET"], os.environ["CHECK_S3_ENDPOINT"].rstrip("/")
    checks.append(("S3 unsigned ListObjects", http_status(f"{endpoint}/{bucket}"), 403))
    checks.append(("S3 unsigned ListBuckets", http_status(f"{endpoint}/"), 403))
    try:
        s3_client(secret=os.environ["CHECK_S3_SECRET_KEY"] + "x").list_objects_v2(Bucket=bucket, MaxKeys=1)
        got = 200
    except ClientError as exc:
        got = int(exc.response["ResponseMetadata"]["HTTPStatusCode"])
    checks.append(("S3 ListObjects signed with a wrong secret", got, 403))
    for label, got, want in checks:
        if got != want:
            fail(f"{label}: HTTP {got}, expected {want}")
        print(f"ok: {label} -> {got}")
    for label, pw in (("without a password", None), ("with a wrong password", "wrong-" + os.urandom(4).hex())):
        try:
            pg_connect("mlflow", pw).close()
        except Exception as exc:                 # noqa: BLE001 - any refusal is the expected outcome
            if "password" not in str(exc).lower():
                fail(f"PostgreSQL {label}: refused for another reason: {str(exc).splitlines()[0]}")
            print(f"ok: PostgreSQL {label} -> refused (password authentication)")
        else:
            fail(f"PostgreSQL accepted a connection {label}")
    pg_connect("mlflow", os.environ["PGPASSWORD"]).close()
    print("ok: PostgreSQL with the password -> accepted")


def main(argv: list[str]) -> None:
    if argv[:1] == ["record"] and len(argv) == 4:
        record(*argv[1:])
    elif argv[:1] == ["verify"] and len(argv) == 2:
        verify(argv[1])
    elif argv == ["refuse"]:
        refuse()
    else:
        fail("usage: compose_verify.py record STATE.json MODEL_NAME STUDY | verify STATE.json | refuse")


if __name__ == "__main__":
    main(sys.argv[1:])
