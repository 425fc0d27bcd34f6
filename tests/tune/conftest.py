"""Fixtures for tuning tests: a tiny study file, a small demo store (32x32 slices), a local SQLite MLflow store
and a fake final evaluation (`fake_eval`) whose sample metrics the test chooses (and which, needing no feature
network, starts none in the background)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracking"))
from mlflow_testlib import sqlite_uri, tracking_env  # noqa: E402,F401

TINY_STUDY = """
description: tiny VAE study for tests
family: vae
base:
  model: {blocks: 3}
  train: {batch_size: 16, grid_every: 1}
search_space:
  train.lr: {type: float, low: 5.0e-4, high: 3.0e-3, log: true}
  model.kernel_size: {type: categorical, choices: [3, 4]}
objective: {metric: val_ssim, direction: maximize}
pruner: {type: none}
demo_budget: {trials: 3, epochs: 1, image_size: 32}
"""


@pytest.fixture(scope="session")
def tune_store(tmp_path_factory):
    from mrigen.data import build_demo_store

    return build_demo_store(tmp_path_factory.mktemp("tune-store"), subjects=6, size=32, seed=0)


@pytest.fixture
def tiny_study(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY_STUDY))
    return path


@pytest.fixture
def fake_eval(monkeypatch):
    """Replace `mrigen.metrics.evaluate` (what `train` calls at the end) by a fake that returns the next dict of
    the list the test sets (`fake_eval.results = [...]`), filled up with plausible values; trials of one
    in-process worker run in order, so result i belongs to trial i."""

    class Fake:
        results: list[dict] = []
        calls = 0

        def __call__(self, model, store, split="val", **kwargs):
            base = {"ssim": 0.5, "psnr": 20.0, "fd": 1.0, "fd_real": 0.5, "fd_ratio": 2.0, "precision": 0.6,
                    "recall": 0.5, "precision_real": 0.7, "recall_real": 0.7, "diversity": 0.3,
                    "diversity_real": 0.3, "memorised": 0.0, "feature_nets": 1.0}
            out = {**base, **(self.results[self.calls] if self.calls < len(self.results) else {})}
            self.calls += 1
            return {k: v for k, v in out.items() if v is not None}

    fake = Fake()
    monkeypatch.setattr("mrigen.metrics.evaluate", fake)
    # The fake needs no feature network: do not train one in a background process for each study.
    monkeypatch.setattr("mrigen.tune.runner._feature_net_in_background", lambda *args, **kwargs: None)
    return fake
