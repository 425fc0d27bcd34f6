"""The one entrypoint of the MLflow tracking server, used by the Docker image and by `python -m mrigen.stack`.

Standard library only (the image copies this single file next to MLflow; it imports nothing from mrigen).
Everything comes from the environment, so no secret is ever on a command line (process listings show those):

| variable | meaning |
| --- | --- |
| `MLFLOW_BACKEND_STORE_URI` | `postgresql+psycopg://USER@HOST:PORT/DB`, **without** a password (required) |
| `PGPASSWORD` | the database password (required; libpq reads it) |
| `MLFLOW_ARTIFACTS_DESTINATION` | `s3://BUCKET/PREFIX` (required): artifacts are proxied, clients need no keys |
| `MLFLOW_S3_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` | the S3 server and its keys (required) |
| `MLFLOW_HOST`, `MLFLOW_PORT`, `MLFLOW_WORKERS` | bind address (127.0.0.1), port (5000), uvicorn workers (2) |
| `MLFLOW_ALLOWED_HOSTS` | comma list of accepted Host headers (default `localhost:PORT,127.0.0.1:PORT`) |
| `MLFLOW_AUTH` | `off` (default) or `basic`: the basic-auth app |
| `MLFLOW_AUTH_ADMIN_USERNAME`, `MLFLOW_AUTH_ADMIN_PASSWORD` | admin account (password required with auth) |
| `MLFLOW_FLASK_SERVER_SECRET_KEY` | CSRF secret of the auth app (required with auth) |
| `MLFLOW_AUTH_DATABASE_URI` | user store of the auth app, no password (default: backend URI with DB `<DB>_auth`) |
| `MLFLOW_AUTH_CONFIG_DIR` | where the generated auth .ini is written (default: a private temp dir) |
| `MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX` | default: only `models:/`, `runs:/`, `mlflow-artifacts:/` and the artifact bucket |

Run: `python mlflow_entry.py` (or `python -m mrigen.stack.mlflow_entry`); it validates, then execs `mlflow server`.
A missing required setting stops it with one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = ["ConfigError", "build_server", "main"]


class ConfigError(ValueError):
    """A required setting of the MLflow server is missing or unsafe."""


def _require(env: Mapping[str, str], name: str, why: str) -> str:
    value = env.get(name, "")
    if not value.strip():
        raise ConfigError(f"{name} is not set: {why}; refusing to start without it")
    return value


def _check_db_uri(name: str, uri: str) -> None:
    parts = urlsplit(uri)
    if not parts.scheme.startswith("postgresql"):
        raise ConfigError(f"{name} must be a postgresql+psycopg:// URI, got scheme {parts.scheme!r}")
    if parts.password is not None:
        raise ConfigError(f"{name} must not contain a password (command lines are visible); put it in PGPASSWORD")


def _auth_db_uri(backend_uri: str) -> str:
    parts = urlsplit(backend_uri)
    db = parts.path.lstrip("/") or "mlflow"
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}_auth", parts.query, parts.fragment))


def build_server(env: Mapping[str, str]) -> tuple[list[str], dict[str, str], str | None]:
    """Validate the environment and build the `mlflow server` command.

    Args:
        env: the process environment.

    Returns:
        (argv after `python -m mlflow`, environment for the server, auth .ini text or None). The argv holds no
        secret; the returned environment holds them.

    Raises:
        ConfigError: naming the missing or unsafe variable.
    """
    backend = _require(env, "MLFLOW_BACKEND_STORE_URI", "the PostgreSQL metadata store")
    _check_db_uri("MLFLOW_BACKEND_STORE_URI", backend)
    _require(env, "PGPASSWORD", "the PostgreSQL password of the MLflow database user")
    destination = _require(env, "MLFLOW_ARTIFACTS_DESTINATION", "s3://BUCKET/PREFIX for proxied artifacts")
    if not destination.startswith("s3://") or len(destination) <= len("s3://"):
        raise ConfigError(f"MLFLOW_ARTIFACTS_DESTINATION must look like s3://BUCKET/PREFIX, got {destination!r}")
    _require(env, "MLFLOW_S3_ENDPOINT_URL", "the S3 server URL")
    _require(env, "AWS_ACCESS_KEY_ID", "the S3 access key of the server")
    _require(env, "AWS_SECRET_ACCESS_KEY", "the S3 secret key of the server")
    host = env.get("MLFLOW_HOST", "127.0.0.1")
    port = env.get("MLFLOW_PORT", "5000")
    workers = env.get("MLFLOW_WORKERS", "2")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"MLFLOW_PORT must be a port number 1-65535, got {port!r}")
    if not workers.isdigit() or int(workers) < 1:
        raise ConfigError(f"MLFLOW_WORKERS must be a positive integer, got {workers!r}")
    allowed = env.get("MLFLOW_ALLOWED_HOSTS") or f"localhost:{port},127.0.0.1:{port}"
    auth = env.get("MLFLOW_AUTH", "off")
    if auth not in ("off", "basic"):
        raise ConfigError(f"MLFLOW_AUTH must be 'off' or 'basic', got {auth!r}")

    server_env = dict(env)
    bucket = destination[len("s3://") :].split("/", 1)[0]
    server_env.setdefault(
        "MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX",
        rf"^(models:/|runs:/|mlflow-artifacts:/|s3://{re.escape(bucket)}/)",
    )
    # Job execution (GenAI scorers) starts extra consumer processes this project does not use.
    server_env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    argv = [
        "server",
        "--backend-store-uri", backend,
        "--artifacts-destination", destination,
        "--serve-artifacts",
        "--host", host,
        "--port", port,
        "--workers", workers,
        "--allowed-hosts", allowed,
    ]  # fmt: skip
    ini = None
    if auth == "basic":
        _require(server_env, "MLFLOW_AUTH_ADMIN_PASSWORD", "the admin password of the basic-auth app")
        _require(server_env, "MLFLOW_FLASK_SERVER_SECRET_KEY", "the CSRF secret of the basic-auth app")
        if importlib.util.find_spec("flask_wtf") is None:
            raise ConfigError("MLFLOW_AUTH=basic needs Flask-WTF: pip install 'mlflow[auth]'")
        auth_db = env.get("MLFLOW_AUTH_DATABASE_URI") or _auth_db_uri(backend)
        _check_db_uri("MLFLOW_AUTH_DATABASE_URI", auth_db)
        user = env.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
        server_env["MLFLOW_AUTH_ADMIN_USERNAME"] = user
        # No password here: MLflow reads MLFLOW_AUTH_ADMIN_PASSWORD, libpq reads PGPASSWORD.
        ini = (
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {auth_db}\n"
            f"admin_username = {user}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        argv += ["--app-name", "basic-auth"]
    return argv, server_env, ini


def main() -> None:
    """Validate the environment, write the auth config when needed, and exec `mlflow server`."""
    try:
        argv, env, ini = build_server(os.environ)
    except ConfigError as exc:
        print(f"mlflow-entry: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if ini is not None:
        conf_dir = os.environ.get("MLFLOW_AUTH_CONFIG_DIR") or tempfile.mkdtemp(prefix="mlflow-auth-")
        path = Path(conf_dir) / "basic_auth.ini"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(ini)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(path)
    print(f"mlflow-entry: starting mlflow server on {env.get('MLFLOW_HOST', '127.0.0.1')}:"
          f"{env.get('MLFLOW_PORT', '5000')} (auth {env.get('MLFLOW_AUTH', 'off')})", file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "mlflow", *argv], env)


if __name__ == "__main__":
    main()
