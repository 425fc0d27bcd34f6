"""MLflow client helpers: tracking URI resolution, secret redaction, reachability checks, experiments.

Every string that leaves this package (params, tags, log lines, error messages) goes through `redact` first:
`user:password@` is stripped from URIs and the values of known secret environment variables are masked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import threading
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

__all__ = ["DEFAULT_TRACKING_URI", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "TrackingError", "redact", "redact_uri",
           "resolve_tracking_uri", "make_client", "check_tracking_uri", "default_artifact_location",
           "get_or_create_experiment", "git_commit", "error_line", "ui_runs_url", "use_tracking_uri"]

log = logging.getLogger(__name__)

# Artifacts always stream through the tracking server. MLflow >= 3.17 clients otherwise ask a server with an S3
# destination for presigned URLs and download from S3 directly, at the S3 address the *server* uses
# (`http://seaweedfs:8333` in docker-compose.yml), which a client outside that network cannot resolve and which
# the proxied-artifact setup promises clients never need. Same for multipart uploads (files >= 500 MB).
_PROXIED_ARTIFACTS_ENV = ("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD")


def _prefer_proxied_artifacts() -> None:
    """Turn MLflow's presigned-URL artifact transfers off in this process and its children, unless the user set
    them (child processes inherit the environment)."""
    for name in _PROXIED_ARTIFACTS_ENV:
        os.environ.setdefault(name, "false")


_prefer_proxied_artifacts()

DEFAULT_WORK_DIR = "mrigen-work"   # `python -m mrigen.tune`'s default --work-dir, relative to the working directory
DEFAULT_TRACKING_URI = f"sqlite:///{DEFAULT_WORK_DIR}/mlflow.db"   # embedded default: where tune tracks by default
# The MLflow 3 UI opens an experiment without this tag on its GenAI overview (traces); this value opens the runs.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "PGPASSWORD", "POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD",
               "MRIGEN_S3_SECRET_KEY", "MRIGEN_S3_ACCESS_KEY", "MRIGEN_PG_PASSWORD")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]*)@")
_URI_LOCK = threading.RLock()
_QUERY_SECRET = re.compile(r"(?i)\b(password|passwd|pwd|secret|token|access_key|secret_key)=([^&\s'\"]+)")


class TrackingError(RuntimeError):
    """A tracking server problem, with a one-line, secret-free message."""


def redact(text: object) -> str:
    """Return `text` as a string with credentials removed.

    Strips `user:password@` from every URI in the text, masks `password=...`-style query values, and masks the
    value of any known secret environment variable (S3 keys, database / MLflow passwords) that appears.
    """
    out = _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", str(text))
    out = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}=***", out)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            out = out.replace(value, "***")
    return out


def redact_uri(uri: str) -> str:
    """A tracking / database URI without its credentials: `http://u:p@host/` -> `http://***@host/`."""
    return redact(uri)


def resolve_tracking_uri(uri: str | None = None, *, announce: bool = True, read_only: bool = False) -> str:
    """Pick the tracking URI: the argument, else `MLFLOW_TRACKING_URI`, else the embedded SQLite default, the
    store `python -m mrigen.tune` writes by default (`./mrigen-work/mlflow.db`), so every command finds it.

    Args:
        uri: explicit URI (e.g. from `--tracking-uri`); empty strings count as unset.
        announce: when falling back to the embedded default, print how to open the UI on it.
        read_only: the caller only reads (e.g. pulls a model): refuse a default store that does not exist instead
            of letting MLflow create an empty one.

    Returns:
        The URI to use (the embedded default is made absolute so that it survives `cd`).

    Raises:
        TrackingError: `read_only` and the default store does not exist.
    """
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        return chosen
    path = Path.cwd() / DEFAULT_WORK_DIR / "mlflow.db"
    if read_only and not path.is_file():
        raise TrackingError(f"no tracking store at {path} (the default that `python -m mrigen.tune` writes): run "
                            "a study first, or set MLFLOW_TRACKING_URI / --tracking-uri")
    chosen = f"sqlite:///{path}"
    if announce:
        print(f"mrigen: tracking to the local store {chosen} (set MLFLOW_TRACKING_URI or --tracking-uri to use a "
              f"server); open the UI with: mlflow ui --backend-store-uri {chosen}")
    return chosen


def error_line(exc: BaseException) -> str:
    """First meaningful line of an exception message, redacted (MLflow errors carry long bodies)."""
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0].strip()
    return redact(line[:300])


def check_tracking_uri(uri: str, timeout: float = 10.0) -> None:
    """Fail fast with one clear line when an HTTP tracking server is down, wrong or refuses our credentials.

    Non-HTTP URIs (sqlite, postgresql, file) are checked by their first use instead.

    Raises:
        TrackingError: server unreachable, not an MLflow server, or authentication failed.
    """
    if not uri.startswith(("http://", "https://")):
        scheme = uri.split(":", 1)[0]
        if "://" not in uri and not Path(uri).is_absolute():
            raise TrackingError(f"tracking URI {redact(uri)!r} is not a URI (use http://host:port, "
                                f"sqlite:///path.db or postgresql://...)")
        if scheme not in ("sqlite", "file", "postgresql", "mysql", "mssql", "databricks") and "+" not in scheme:
            raise TrackingError(f"tracking URI {redact(uri)!r}: unsupported scheme {scheme!r}")
        return
    import requests

    base = uri.rstrip("/")
    auth = None
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    try:
        resp = requests.get(f"{base}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                            auth=auth, timeout=timeout)
    except requests.RequestException as exc:
        raise TrackingError(f"cannot reach the MLflow tracking server at {redact(uri)} (is it running? "
                            f"{type(exc).__name__})") from None
    if resp.status_code in (401, 403):
        raise TrackingError(f"the MLflow tracking server at {redact(uri)} refused the credentials (HTTP "
                            f"{resp.status_code}); set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    if resp.status_code >= 400:
        raise TrackingError(f"{redact(uri)} does not answer like an MLflow tracking server (HTTP "
                            f"{resp.status_code} on the experiments API)")


def make_client(uri: str | None = None, *, check: bool = True, announce: bool = True,
                read_only: bool = False) -> tuple[MlflowClient, str]:
    """Resolve the URI (see `resolve_tracking_uri`), check it, and build an `MlflowClient` for tracking and the
    registry.

    Returns:
        (client, resolved URI).

    Raises:
        TrackingError: see `check_tracking_uri`.
    """
    resolved = resolve_tracking_uri(uri, announce=announce, read_only=read_only)
    if check:
        check_tracking_uri(resolved)
    try:
        return MlflowClient(tracking_uri=resolved, registry_uri=resolved), resolved
    except MlflowException as exc:
        raise TrackingError(f"tracking URI {redact(resolved)!r}: {error_line(exc)}") from None


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a SQLite store: `<db dir>/mlruns/<experiment>-<hash>`, beside the database rather than under the
    working directory (MLflow's default). None for servers, which choose their own artifact root."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    import hashlib

    db = Path(tracking_uri[len("sqlite:///"):])
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)[:60]
    return (db.parent / "mlruns" / f"{safe}-{hashlib.sha1(experiment.encode()).hexdigest()[:8]}").resolve().as_uri()


def get_or_create_experiment(client: MlflowClient, name: str, attempts: int = 5) -> str:
    """Experiment id for `name`, creating it if needed; safe when many processes race to create it.

    A loser of the creation race gets RESOURCE_ALREADY_EXISTS and re-reads the winner's id, so no run ever falls
    back to the default experiment (which `mlflow.set_experiment` races can cause). The experiment is tagged as a
    model-training one (`EXPERIMENT_KIND_TAG`) so the MLflow UI opens on its runs; an existing experiment without
    that tag (made by an older mrigen) gets it.

    Raises:
        TrackingError: the experiment exists but is deleted, or it could not be created.
    """
    if not name:
        raise ValueError("experiment name must be a non-empty string")
    last: Exception | None = None
    for _ in range(attempts):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise TrackingError(f"experiment {name!r} is deleted; restore it (mlflow experiments restore "
                                    f"--experiment-id {exp.experiment_id}) or choose another name")
            if EXPERIMENT_KIND_TAG not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=default_artifact_location(client.tracking_uri,
                                                                                              name),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as exc:
            # The other creator won; anything else (or a database-level unique violation) is re-read too.
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "INVALID_STATE", "INTERNAL_ERROR"):
                raise
            last = exc
    raise TrackingError(f"could not create or find experiment {name!r}: {error_line(last)}")


def ui_runs_url(tracking_uri: str, experiment_id: str) -> str:
    """The MLflow UI page listing an experiment's runs (no credentials in it).

    MLflow 3.17's UI opens every experiment on its GenAI overview (traces, tokens) unless the URL carries
    `workflowType=machine_learning` or the browser remembers its "Model training" switch; the experiment tag
    (`EXPERIMENT_KIND_TAG`) is not enough there. A local (SQLite) store is shown by `mlflow ui` at its default
    address, http://127.0.0.1:5000.
    """
    remote = tracking_uri.startswith(("http://", "https://"))
    base = redact(_USERINFO.sub(r"\g<scheme>", tracking_uri)).rstrip("/") if remote else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def git_commit(path: Path | None = None) -> str | None:
    """Commit hash of the git checkout holding `path` (default: this package), or None outside one."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


@contextlib.contextmanager
def use_tracking_uri(uri: str):
    """Set MLflow's process-wide tracking and registry URI for the block, then restore them exactly.

    Needed around MLflow's fluent model logging, artifact downloads and model-version creation: in MLflow 3.17,
    `models:/` and `runs:/` resolution ignores an explicit `tracking_uri` and reads the process-wide one. The
    previous state is restored as it was -- unset stays unset, and the MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI
    environment variables (which `mlflow.set_tracking_uri` rewrites) are put back.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    with _URI_LOCK:
        previous = getattr(tracking_utils, "_tracking_uri", None)
        previous_registry = getattr(registry_utils, "_registry_uri", None)
        env = {name: os.environ.get(name) for name in names}
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)
            mlflow.set_registry_uri(previous_registry)
            for name, value in env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
