"""Fixtures for tuning tests: a tiny study file and a small demo store (32x32 slices)."""

from __future__ import annotations

import textwrap

import pytest

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
