"""Log a trained model as an MLflow pyfunc "model from code" (no pickle in the load path).

The logged model holds `pyfunc_model.py` (this package's code file), the `model_dir` artifact written by
`mrigen.models.save_model` (model.safetensors + config.json), a signature and an input example. It is an MLflow 3
LoggedModel named "model" created in the run's own experiment, so `runs:/<run_id>/model` and
`models:/<name>@<alias>` both resolve to it.

Upload is all-or-nothing as far as the registry is concerned: the sha256 of every file of `model_dir` is
recorded on the LoggedModel (tag `mrigen.model_files_sha256`) before the upload, and the LoggedModel is
finalized READY only after every file is uploaded; an upload that fails (S3 down mid-upload) leaves it FAILED.
`mrigen.registry.register` accepts only READY models whose downloaded files match the recorded hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

import mrigen
from mrigen.tracking.client import error_line, use_tracking_uri

__all__ = ["PYFUNC_MODEL_PATH", "MODEL_NAME", "FILES_SHA_TAG", "model_signature", "log_pyfunc_model",
           "pip_requirements", "files_sha256"]

log = logging.getLogger(__name__)
FILES_SHA_TAG = "mrigen.model_files_sha256"     # LoggedModel tag: JSON {file name in model_dir: sha256}

PYFUNC_MODEL_PATH = Path(__file__).with_name("pyfunc_model.py")
MODEL_NAME = "model"                       # artifact name: runs:/<run_id>/model


def model_signature(image_size: int) -> ModelSignature:
    """Signature: input columns n (required), seed (optional); output float32 (n, H, W); param batch_size."""
    inputs = Schema([ColSpec("long", "n"), ColSpec("long", "seed", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, image_size, image_size))])
    params = ParamSchema([ParamSpec("batch_size", "long", 64)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def pip_requirements() -> list[str]:
    """What an environment needs to load the model (given explicitly: MLflow's inference is slow)."""
    import torch

    base = torch.__version__.split("+")[0]
    return [f"mrigen=={mrigen.__version__}", f"mlflow>={mlflow.__version__.split('.dev')[0]}", f"torch>={base}",
            "safetensors>=0.4", "numpy>=1.26", "pandas>=2.0"]


def files_sha256(model_dir: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every file under `model_dir`."""
    out = {}
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        out[path.relative_to(model_dir).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def log_pyfunc_model(client: MlflowClient, tracking_uri: str, run_id: str, model_dir: Path, image_size: int,
                     *, step: int = 0) -> str:
    """Log `model_dir` as the run's pyfunc model; return its `models:/<model_id>` URI.

    Args:
        client: client on `tracking_uri`.
        tracking_uri: the run's tracking URI.
        run_id: the (open) run the model belongs to.
        model_dir: folder written by `mrigen.models.save_model`.
        image_size: H = W of the generated slices (for the signature).
        step: training step (epoch) the model corresponds to.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "model.safetensors").is_file() or not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a saved mrigen model (needs model.safetensors and config.json)")
    run = client.get_run(run_id)
    # Created explicitly in the run's experiment: MLflow would otherwise put it in the process's active one.
    logged = client.create_logged_model(experiment_id=run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                        model_type="mrigen-generator",
                                        tags={FILES_SHA_TAG: json.dumps(files_sha256(model_dir), sort_keys=True)})
    try:
        with use_tracking_uri(tracking_uri):
            mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(PYFUNC_MODEL_PATH),
                artifacts={"model_dir": str(model_dir)},
                signature=model_signature(image_size),
                input_example={"n": 2, "seed": 0},
                pip_requirements=pip_requirements(),
                model_id=logged.model_id,
            )
        client.log_outputs(run_id, models=[LoggedModelOutput(logged.model_id, step=step)])
        client.finalize_logged_model(logged.model_id, "READY")
    except BaseException:
        try:
            client.finalize_logged_model(logged.model_id, "FAILED")
        except Exception as exc:      # the server may be the thing that failed; the model stays PENDING (not READY)
            log.error("mrigen.tracking: could not mark logged model %s FAILED: %s", logged.model_id, error_line(exc))
        raise
    return f"models:/{logged.model_id}"
