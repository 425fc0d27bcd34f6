"""Artifact checks for the registry: the logged model's files, their sha256, and what a model URI points at.

A model is registered only when its LoggedModel is READY (every file uploaded: an upload cut short by an S3
outage leaves it FAILED or PENDING) and the downloaded copy of the trained model's files has the sha256 the
trainer recorded before uploading (`mrigen.model_files_sha256`), so a missing or partial file is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mrigen.tracking.client import TrackingError, error_line, use_tracking_uri

__all__ = ["RegistryError", "PICKLE_SUFFIXES", "find_logged_model", "hash_tree", "verify_model_artifacts",
           "verify_downloaded", "describe_model_uri", "SHA_TAG"]

PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".ckpt")   # formats that unpickle on load
SHA_TAG = "mrigen.artifact_sha256"        # model-version tag: JSON {relative path: sha256}
FILES_SHA_TAG = "mrigen.model_files_sha256"  # LoggedModel tag set by mrigen.tracking.model_log before upload
_REQUIRED = ("MLmodel", "pyfunc_model.py")
_UNHASHED = ("registered_model_meta",)     # written by MLflow on download of models:/ URIs (name, version)


class RegistryError(TrackingError):
    """A registry problem (unknown model / version / alias, bad artifacts), with a one-line message."""


def _not_found(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(exc).lower()


def find_logged_model(client: MlflowClient, run_id: str, name: str = "model"):
    """The LoggedModel named `name` whose source is `run_id`: the newest READY one, else the newest of any status.

    A run whose first upload failed (status FAILED) and whose retry succeeded has two; the READY one wins.

    Raises:
        RegistryError: unknown run, or the run logged no such model.
    """
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if _not_found(exc):
            raise RegistryError(f"no run with id {run_id!r} on this tracking server") from None
        raise
    token, found = None, []
    while True:
        page = client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"name = '{name}'",
                                           page_token=token)
        found += [m for m in page if m.source_run_id == run_id]
        token = page.token
        if not token:
            break
    if not found:
        raise RegistryError(f"run {run_id} has no logged model named {name!r} (was it trained with "
                            f"MlflowHook(log_model=True) and finished?)")
    ready = [m for m in found if _status(m) == "READY"]
    return max(ready or found, key=lambda m: m.creation_timestamp or 0)


def _status(model) -> str:
    status = getattr(model, "status", None)
    return str(getattr(status, "name", status) or "").upper().removeprefix("LOGGEDMODELSTATUS.")


def hash_tree(root: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every file under `root` (MLflow's registered_model_meta excepted)."""
    out = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        if path.relative_to(root).as_posix() in _UNHASHED:
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[path.relative_to(root).as_posix()] = h.hexdigest()
    return out


def _check_tree(files: dict[str, str], where: str) -> None:
    missing = [f for f in _REQUIRED if f not in files]
    if not any(f.endswith("/model.safetensors") for f in files) or not any(f.endswith("/config.json") for f in files):
        missing.append("artifacts/<model_dir>/{model.safetensors,config.json}")
    if missing:
        raise RegistryError(f"{where}: logged model is incomplete, missing {missing}")
    pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise RegistryError(f"{where}: logged model contains pickle-format files {pickles} (refusing to register)")


def verify_model_artifacts(run_id: str, *, client: MlflowClient, tracking_uri: str) -> tuple[str, dict[str, str]]:
    """Download the run's logged model, check it is complete and pickle-free, and hash every file.

    Returns:
        (model_id, {relative path: sha256}).

    Raises:
        RegistryError: no such run / model, model not READY (upload failed or cut short), missing files, files
            that differ from the sha256 recorded before upload, or pickle-format files.
    """
    import mlflow.artifacts

    logged = find_logged_model(client, run_id)
    if _status(logged) != "READY":
        raise RegistryError(f"run {run_id}: logged model {logged.model_id} is {_status(logged) or 'not READY'} "
                            f"(its upload failed or did not finish); refusing to register it")
    dst = Path(tempfile.mkdtemp(prefix="mrigen-verify-"))
    try:
        try:
            with use_tracking_uri(tracking_uri):
                local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{logged.model_id}",
                                                            dst_path=str(dst), tracking_uri=tracking_uri)
        except Exception as exc:
            raise RegistryError(f"could not download the model of run {run_id}: {error_line(exc)}") from None
        files = hash_tree(Path(local))
    finally:
        shutil.rmtree(dst, ignore_errors=True)
    _check_tree(files, f"run {run_id}")
    _check_recorded(files, (logged.tags or {}).get(FILES_SHA_TAG), f"run {run_id}")
    return logged.model_id, files


def _check_recorded(files: dict[str, str], recorded: str | None, where: str) -> None:
    """Compare the downloaded `artifacts/<model_dir>/...` files with the sha256 recorded before the upload."""
    if not recorded:
        return                                   # logged by an older mrigen: completeness is all we can check
    expected = json.loads(recorded)
    prefixes = {f.rsplit("/", 1)[0] for f in files if f.startswith("artifacts/") and f.endswith("/config.json")}
    bad = []
    for rel, sha in sorted(expected.items()):
        got = [files.get(f"{prefix}/{rel}") for prefix in prefixes]
        if sha not in got:
            bad.append(rel)
    if bad or not prefixes:
        raise RegistryError(f"{where}: uploaded model files are missing or differ from the trained model "
                            f"(sha256 recorded before upload): {bad[:5] or ['artifacts/<model_dir>']}")


def verify_downloaded(local: Path, tags: dict[str, str], spec: str) -> None:
    """Check downloaded model files against the sha256 recorded at registration (when recorded).

    Raises:
        RegistryError: a file is missing, extra or differs.
    """
    if SHA_TAG not in tags:
        return
    expected = json.loads(tags[SHA_TAG])
    actual = hash_tree(Path(local))
    bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
    if bad:
        raise RegistryError(f"{spec}: downloaded files do not match the sha256 recorded at registration: {bad[:5]}")


def lookup(fetch, missing: str):
    """`fetch()`, turning MLflow's not-found answer into `RegistryError(missing)`; other errors pass through."""
    try:
        return fetch()
    except MlflowException as exc:
        if _not_found(exc) or exc.error_code == "INVALID_PARAMETER_VALUE":
            raise RegistryError(missing) from None
        raise


def describe_model_uri(client: MlflowClient, spec: str) -> dict:
    """Resolve `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/<model_id>` or `runs:/ID/PATH`.

    Returns:
        dict with name, version, run_id, tags (version tags) and download_uri (pinned to the version, so an
        alias moving meanwhile cannot change what is downloaded).

    Raises:
        RegistryError: unknown model, version, alias or run.
    """
    try:
        if spec.startswith("runs:/"):
            run_id, _, path = spec[len("runs:/"):].partition("/")
            # Resolved here to the LoggedModel: MLflow's runs:/ lookup ignores an explicit tracking URI.
            logged = find_logged_model(client, run_id, path.strip("/") or "model")
            return {"name": None, "version": None, "run_id": run_id, "tags": {},
                    "download_uri": f"models:/{logged.model_id}"}
        if not spec.startswith("models:/"):
            raise RegistryError(f"{spec!r} is not a models:/ or runs:/ URI")
        body = spec[len("models:/"):].strip("/")
        if "@" in body:
            name, alias = body.split("@", 1)
            _registered(client, name)
            mv = lookup(lambda: client.get_model_version_by_alias(name, alias),
                        f"model {name!r} has no alias {alias!r}")
        elif "/" in body:
            name, version = body.rsplit("/", 1)
            _registered(client, name)
            mv = lookup(lambda: client.get_model_version(name, version),
                        f"model {name!r} has no version {version!r}")
        else:
            logged = lookup(lambda: client.get_logged_model(body),
                            f"{spec}: no registered model name with @alias or /version, and no logged "
                            f"model with id {body!r}")
            return {"name": None, "version": None, "run_id": logged.source_run_id, "tags": {}, "download_uri": spec}
    except MlflowException as exc:
        raise RegistryError(f"{spec}: {error_line(exc)}") from None
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "tags": dict(mv.tags or {}),
            "download_uri": f"models:/{mv.name}/{mv.version}"}


def _registered(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            raise RegistryError(f"no registered model named {name!r}") from None
        raise
