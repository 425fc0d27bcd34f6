"""Helpers shared by the tracking, registry and generate tests (imported by their conftests).

`FakeStore` follows the slice-store contract the training loop uses, with smooth synthetic "slices", so these
tests do not depend on the data package; the end-to-end server test uses the real demo store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["FakeStore", "TINY_MODEL", "tiny_model_cfg", "tiny_train_cfg", "log_untrained_model", "sqlite_uri",
           "tracking_env", "fake_store"]

TINY_MODEL = dict(image_size=32, blocks=3, channels=(8, 16, 32), latent_dim=16)


class FakeStore:
    """n slices of size x size: a bright blob of random brightness plus noise; 40 train / rest val."""

    def __init__(self, n: int = 48, size: int = 32, seed: int = 0, path: Path = Path("/tmp/fake-store")) -> None:
        g = np.random.default_rng(seed)
        yy, xx = np.mgrid[:size, :size] / size
        base = np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.08)
        noise = g.normal(0, 0.02, (n, size, size))
        self.x = np.clip(base[None] * g.uniform(0.6, 1.0, (n, 1, 1)) + noise, 0, 1).astype(np.float32)
        self.image_size, self.path, self.digest = size, path, f"{seed:02d}" * 32
        self.n_train = min(40, n - 8)

    def tensor(self, split: str, device, dtype=torch.float32) -> torch.Tensor:
        x = self.x[: self.n_train] if split == "train" else self.x[self.n_train:]
        return torch.from_numpy(x[:, None]).to(device=device, dtype=dtype)     # (N, 1, H, W)


def tiny_model_cfg(**overrides):
    from mrigen.models import ModelConfig

    return ModelConfig(**{**TINY_MODEL, **overrides})


def tiny_train_cfg(**overrides):
    from mrigen.train import TrainConfig

    base = dict(epochs=2, batch_size=8, final_eval=False, grid_every=1, grid_n=4, device="cpu")
    return TrainConfig(**{**base, **overrides})


def log_untrained_model(tracking_uri: str, experiment: str, seed: int = 0, metrics: dict | None = None) -> str:
    """A FINISHED run holding a logged pyfunc model of an untrained tiny VAE (fast); returns the run id."""
    from mlflow import MlflowClient

    from mrigen.models import build_model, save_model
    from mrigen.tracking import get_or_create_experiment, log_pyfunc_model

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    exp = get_or_create_experiment(client, experiment)
    run = client.create_run(exp, tags={"mrigen.data_digest": "d" * 64, "mrigen.family": "vae"})
    for k, v in (metrics or {}).items():
        client.log_metric(run.info.run_id, k, v)
    torch.manual_seed(seed)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(build_model(tiny_model_cfg()), Path(tmp) / "model")
        log_pyfunc_model(client, tracking_uri, run.info.run_id, model_dir, 32)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


# -- fixtures (imported by the conftests of tests/tracking, tests/registry, tests/generate) -----------------------
import pytest  # noqa: E402

_SHARED: dict[str, str] = {}


@pytest.fixture(scope="session")
def sqlite_uri(tmp_path_factory) -> str:
    """One SQLite tracking + registry store for the whole session (schema creation takes seconds)."""
    if "uri" not in _SHARED:
        _SHARED["uri"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow-sqlite') / 'mlflow.db'}"
    return _SHARED["uri"]


@pytest.fixture
def tracking_env(sqlite_uri, monkeypatch) -> str:
    """MLFLOW_TRACKING_URI -> the session SQLite store, for one test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    return sqlite_uri


@pytest.fixture(scope="session")
def fake_store() -> FakeStore:
    return FakeStore()
