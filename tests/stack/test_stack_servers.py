"""Integration tests against the session stack: PostgreSQL + SeaweedFS S3 + MLflow on loopback."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import psycopg
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mrigen.stack import Stack
from mrigen.stack.__main__ import main as cli_main
from mrigen.stack.s3 import client as s3_client


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _secrets(stack) -> list[str]:
    creds = json.loads((Path(stack.directory) / "credentials.json").read_text())
    return [v for k, v in creds.items() if k not in ("postgres_user", "mlflow_admin_username")]


def test_status_reports_three_running_servers(stack, capsys: pytest.CaptureFixture) -> None:
    rows = {r.name: r for r in Stack(stack.directory).status()}
    assert {r.state for r in rows.values()} == {"running"}
    assert rows["mlflow"].address == stack.tracking_uri and rows["s3"].address == stack.s3_endpoint
    assert rows["postgres"].address == f"127.0.0.1:{stack.postgres_port}"
    assert cli_main(["status", "--dir", str(stack.directory)]) == 0
    out = capsys.readouterr().out
    assert stack.tracking_uri in out and "postgres.log" in out
    for secret in _secrets(stack):
        assert secret not in out
    assert (Path(stack.directory) / "credentials.json").stat().st_mode & 0o777 == 0o600


def test_up_is_idempotent(stack) -> None:
    again = Stack(stack.directory).up()
    assert again.tracking_uri == stack.tracking_uri and again.s3_endpoint == stack.s3_endpoint


def test_run_lands_in_postgres_and_artifact_in_bucket(stack, mlflow_env: str, tmp_path: Path) -> None:
    assert not any(k in os.environ for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"))
    artifact = tmp_path / "grid.txt"
    artifact.write_text("slices 0..15")
    mlflow.set_experiment("stack-smoke")
    with mlflow.start_run() as run:
        mlflow.log_param("latent_dim", 16)
        mlflow.log_metric("loss", 0.25, step=1)
        mlflow.log_artifact(str(artifact), artifact_path="grids")
    run_id = run.info.run_id
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: the client never sees S3
    assert MlflowClient().list_artifacts(run_id, "grids")[0].path == "grids/grid.txt"

    s3 = s3_client(stack.s3_endpoint, stack.s3_access_key, stack.s3_secret_key)
    listed = s3.list_objects_v2(Bucket=stack.bucket, Prefix=f"{stack.artifact_prefix}/")
    keys = [obj["Key"] for obj in listed.get("Contents", [])]
    key = next(k for k in keys if run_id in k and k.endswith("grids/grid.txt"))
    assert s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read() == b"slices 0..15"

    with psycopg.connect(stack.mlflow_db_url.replace("postgresql+psycopg", "postgresql")) as conn:
        status = conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
        param = conn.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'latent_dim'",
                             (run_id,)).fetchone()  # fmt: skip
    assert status == ("FINISHED",) and param == ("16",)


def test_foreign_host_header_is_refused(stack) -> None:
    url = f"{stack.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(url)[0] == 200
    code, _ = _get(url, headers={"Host": "attacker.example.com"})
    assert code in (400, 403)


@pytest.mark.parametrize(
    "path",
    ["/api/2.0/mlflow-artifacts/artifacts/..%2F..%2F..%2Fetc%2Fpasswd",
     "/api/2.0/mlflow-artifacts/artifacts/%2E%2E/%2E%2E/etc/passwd",
     "/get-artifact?path=../../../../etc/passwd&run_uuid=0"],
)  # fmt: skip
def test_artifact_path_traversal_is_refused(stack, path: str) -> None:
    code, body = _get(stack.tracking_uri + path)
    assert code in (400, 403, 404) and b"root:" not in body


def test_model_version_source_must_be_a_tracked_location(stack, mlflow_env: str) -> None:
    client = MlflowClient()
    client.create_registered_model("stack-source-check")
    for source in ("file:///etc", "/etc/passwd", "s3://another-bucket/model"):
        with pytest.raises(MlflowException, match="Invalid model version source"):
            client.create_model_version("stack-source-check", source)


def test_no_secret_in_server_logs(stack) -> None:
    logs = list(Path(stack.log_dir).glob("*.log"))
    assert {p.name for p in logs} == {"postgres.log", "s3.log", "mlflow.log"}
    for log in logs:
        text = log.read_text(errors="replace")
        for secret in _secrets(stack):
            assert secret not in text, f"a secret appears in {log}"
