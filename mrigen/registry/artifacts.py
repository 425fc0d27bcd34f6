"""Artifact checks for the registry: the logged model's files, their sha256, and what a model URI points at."""

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
_REQUIRED = ("MLmodel", "pyfunc_model.py")
_UNHASHED = ("registered_model_meta",)     # written by MLflow on download of models:/ URIs (name, version)


class RegistryError(TrackingError):
    """A registry problem (unknown model / version / alias, bad artifacts), with a one-line message."""


def _not_found(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(exc).lower()


def find_logged_model(client: MlflowClient, run_id: str, name: str = "model"):
    """The LoggedModel named `name` whose source is `run_id`.

    Raises:
        RegistryError: unknown run, or the run logged no such model.
    """
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if _not_found(exc):
            raise RegistryError(f"no run with id {run_id!r} on this tracking server") from None
        raise
    token = None
    while True:
        page = client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"name = '{name}'",
                                           page_token=token)
        for model in page:
            if model.source_run_id == run_id:
                return model
        token = page.token
        if not token:
            raise RegistryError(f"run {run_id} has no logged model named {name!r} (was it trained with "
                                f"MlflowHook(log_model=True) and finished?)")


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
        RegistryError: no such run / model, missing files, or pickle-format files.
    """
    import mlflow.artifacts

    logged = find_logged_model(client, run_id)
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
    return logged.model_id, files


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
            try:
                mv = client.get_model_version_by_alias(name, alias)
            except MlflowException as exc:
                if _not_found(exc) or exc.error_code == "INVALID_PARAMETER_VALUE":
                    raise RegistryError(f"model {name!r} has no alias {alias!r}") from None
                raise
        elif "/" in body:
            name, version = body.rsplit("/", 1)
            _registered(client, name)
            try:
                mv = client.get_model_version(name, version)
            except MlflowException as exc:
                if _not_found(exc) or exc.error_code == "INVALID_PARAMETER_VALUE":
                    raise RegistryError(f"model {name!r} has no version {version!r}") from None
                raise
        else:
            try:
                logged = client.get_logged_model(body)
            except MlflowException as exc:
                if _not_found(exc) or exc.error_code == "INVALID_PARAMETER_VALUE":
                    raise RegistryError(f"{spec}: no registered model name with @alias or /version, and no logged "
                                        f"model with id {body!r}") from None
                raise
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
