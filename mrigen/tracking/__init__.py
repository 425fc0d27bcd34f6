"""Tracking: the MLflow training hook, client helpers and the pyfunc (models-from-code) model.

    from mrigen.tracking import MlflowHook
    train(model_cfg, train_cfg, store, hooks=[MlflowHook(experiment="vae-kernels")])

`pyfunc_model.py` is not imported here: MLflow stores and runs that file when a logged model is loaded.
"""

from mrigen.tracking.client import (DEFAULT_TRACKING_URI, TrackingError, check_tracking_uri, error_line,
                                    get_or_create_experiment, git_commit, make_client, redact, redact_uri,
                                    resolve_tracking_uri, ui_runs_url, use_tracking_uri)
from mrigen.tracking.hook import MlflowHook
from mrigen.tracking.model_log import MODEL_NAME, PYFUNC_MODEL_PATH, log_pyfunc_model, model_signature

__all__ = ["DEFAULT_TRACKING_URI", "MODEL_NAME", "MlflowHook", "PYFUNC_MODEL_PATH", "TrackingError",
           "check_tracking_uri", "error_line", "get_or_create_experiment", "git_commit", "log_pyfunc_model",
           "make_client", "model_signature", "redact", "redact_uri", "resolve_tracking_uri", "ui_runs_url",
           "use_tracking_uri"]
