"""The MLflow pyfunc model of a trained mrigen generator, logged as "models from code".

MLflow stores this file (not a pickle) with the model and runs it on load: `load_context` rebuilds the network with
`mrigen.models.load_model` from the logged `model_dir` artifact (safetensors weights + config.json), so loading
never unpickles anything. The environment that loads it needs `mrigen` installed.

    model = mlflow.pyfunc.load_model("models:/mrigen-vae@champion")
    slices = model.predict({"n": 16, "seed": 0})            # float32 (16, H, W) in [0, 1]
    slices = model.predict({"n": 16, "seed": 0}, params={"batch_size": 8})

Rows of a DataFrame input are separate requests; their outputs are concatenated in row order. The device is
chosen at load time (`MRIGEN_DEVICE`, default "auto": CUDA when present).
"""

from __future__ import annotations

import os

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

__all__ = ["MrigenSampler", "parse_requests"]

DEFAULT_BATCH_SIZE = 64     # images decoded per forward pass when the caller gives no `batch_size` param


def parse_requests(model_input) -> list[tuple[int, int]]:
    """Turn a request (dict, list of dicts or DataFrame with columns n[, seed]) into [(n, seed), ...].

    Raises:
        ValueError: missing `n`, or n < 1, or a non-integer value.
    """
    import pandas as pd

    if isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        rows = model_input
    else:
        raise ValueError(f"request must be a dict like {{'n': 16, 'seed': 0}} or a DataFrame with columns n, seed; "
                         f"got {type(model_input).__name__}")
    out = []
    for row in rows:
        if "n" not in row:
            raise ValueError(f"request {row!r} has no 'n' (number of slices to generate)")
        n = _as_int(row["n"], "n")
        seed = row.get("seed", 0)
        seed = 0 if seed is None or (isinstance(seed, float) and np.isnan(seed)) else _as_int(seed, "seed")
        if n < 1:
            raise ValueError(f"request n={n} must be >= 1")
        out.append((n, seed))
    return out


def _as_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or float(value) != int(value):
        raise ValueError(f"request {name}={value!r} must be an integer")
    return int(value)


class MrigenSampler(PythonModel):
    """Generates synthetic slices: `predict({"n": N, "seed": S}) -> float32 (N, H, W) in [0, 1]`."""

    # The logged signature (n, seed -> float32 (n, H, W)) validates inputs; MLflow's type-hint validation is off.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        """Rebuild the network from the `model_dir` artifact (safetensors, no pickle)."""
        from mrigen.device import pick_device
        from mrigen.models import load_model

        self.device = pick_device(os.environ.get("MRIGEN_DEVICE", "auto"))
        self.model = load_model(context.artifacts["model_dir"], device=self.device)

    def predict(self, context, model_input, params=None):
        """Generate slices for each request row; see the module docstring. Deterministic for a seed."""
        from mrigen.generate import sample_slices

        batch_size = int((params or {}).get("batch_size") or DEFAULT_BATCH_SIZE)
        parts = [np.concatenate(list(sample_slices(self.model, n, seed=seed, batch_size=batch_size)))
                 for n, seed in parse_requests(model_input)]
        return np.concatenate(parts).astype(np.float32, copy=False)


set_model(MrigenSampler())
