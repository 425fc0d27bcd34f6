"""The MLflow tracking server of the local stack, started through the same entrypoint as the Docker image.

The launcher only builds the entrypoint's environment (`mrigen.stack.mlflow_entry` documents it): database
password, S3 keys and the admin password travel in the server's environment, never on its command line and
never in the client's environment.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from mrigen.stack.procs import ProcessRecord, spawn

__all__ = ["server_env", "start_server", "probe"]

# Client-side variables of the caller that must not leak into the server (it gets its own).
_DROP = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
         "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_ALLOWED_HOSTS", "MLFLOW_ARTIFACTS_DESTINATION")  # fmt: skip


def server_env(
    *,
    backend_uri: str,
    db_password: str,
    auth_db_uri: str,
    artifacts_destination: str,
    s3_endpoint: str,
    s3_access_key: str,
    s3_secret_key: str,
    port: int,
    workers: int,
    auth: bool,
    admin_username: str,
    admin_password: str,
    flask_secret: str,
    auth_config_dir: Path,
) -> dict[str, str]:
    """Return the environment for `mlflow_entry` (the caller's environment minus AWS_*/PG*/client settings).

    Args:
        backend_uri: metadata store URI without password.
        db_password: the database password (becomes PGPASSWORD).
        auth_db_uri: user store of the auth app, without password.
        artifacts_destination: `s3://BUCKET/PREFIX`.
        s3_endpoint, s3_access_key, s3_secret_key: the S3 server and its keys.
        port: port to listen on (127.0.0.1).
        workers: uvicorn workers.
        auth: run the basic-auth app.
        admin_username, admin_password, flask_secret: auth settings (used only when `auth`).
        auth_config_dir: where the entrypoint writes the auth .ini (holds no secret).
    """
    env = {k: v for k, v in os.environ.items() if not (k.startswith(("AWS_", "PG")) or k in _DROP)}
    env.update(
        MLFLOW_BACKEND_STORE_URI=backend_uri,
        PGPASSWORD=db_password,
        MLFLOW_ARTIFACTS_DESTINATION=artifacts_destination,
        MLFLOW_S3_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID=s3_access_key,
        AWS_SECRET_ACCESS_KEY=s3_secret_key,
        AWS_DEFAULT_REGION="us-east-1",
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS=str(workers),
        MLFLOW_ALLOWED_HOSTS=f"127.0.0.1:{port},localhost:{port}",
        MLFLOW_AUTH="basic" if auth else "off",
        PYTHONUNBUFFERED="1",
    )
    if auth:
        env.update(
            MLFLOW_AUTH_ADMIN_USERNAME=admin_username,
            MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=flask_secret,
            MLFLOW_AUTH_DATABASE_URI=auth_db_uri,
            MLFLOW_AUTH_CONFIG_DIR=str(auth_config_dir),
        )
    else:
        for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
            env.pop(key, None)
    return env


def start_server(env: dict[str, str], *, log: Path, pid_file: Path, cwd: Path) -> tuple[subprocess.Popen, ProcessRecord]:
    """Run the shared entrypoint (`python -m mrigen.stack.mlflow_entry`) detached with `env`."""
    argv = [sys.executable, "-m", "mrigen.stack.mlflow_entry"]
    return spawn("mlflow", argv, log=log, pid_file=pid_file, env=env, cwd=cwd)


def probe(tracking_uri: str, username: str | None = None, password: str | None = None) -> bool:
    """Return True when `GET /health` answers 200 (raises `OSError` while the server is not up)."""
    request = urllib.request.Request(f"{tracking_uri}/health")
    if username is not None and password is not None:
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=3) as response:  # noqa: S310 - loopback URL built here
        return response.status == 200
