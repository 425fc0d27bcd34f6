"""Fixtures of the utility and probe tests: one small labelled store (32 px) with tiny cached probes, fake
generators (noise, copies of real slices, a conditional one), and the session SQLite MLflow store.

Torch runs on one intra-op thread here (small tensors on a shared two-core machine).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracking"))
from mlflow_testlib import sqlite_uri, tracking_env  # noqa: E402,F401

from mrigen.metrics.probe import ProbeConfig  # noqa: E402
from mrigen.utility import UtilityConfig  # noqa: E402

TINY_PROBES = ProbeConfig(input_size=32, channels=(8, 16, 32), hidden=32, steps=150, batch_size=32)
TINY_UTILITY = dict(task="slice_pos", real_fraction=0.25, seeds=2, synthetic=(30, 90), steps=60, batch_size=32,
                    input_size=32, channels=(8, 16, 32), sample_batch=32)


def tiny_cfg(**overrides) -> UtilityConfig:
    return UtilityConfig(**{**TINY_UTILITY, **overrides})


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory):
    """A 42-subject labelled store at 32 px (24 train / 6 val / 12 test subjects, 10 slices each; see
    labelled_store.py), with tiny probes trained and cached (get_probes(store) loads them)."""
    from labelled_store import make_labelled_store

    from mrigen.metrics.probe import get_probes

    store = make_labelled_store(tmp_path_factory.mktemp("utility") / "store")
    get_probes(store, config=TINY_PROBES)
    return store


@pytest.fixture(scope="session")
def probes(demo_store):
    from mrigen.metrics.probe import get_probes

    return get_probes(demo_store)


class NoiseModel(nn.Module):
    """A generator that generates noise: uniform pixels."""

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.config = SimpleNamespace(image_size=size, conditions=())
        self.w = nn.Parameter(torch.zeros(1))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(n, 1, self.config.image_size, self.config.image_size, generator=generator)


class CopyModel(NoiseModel):
    """A 'perfect' generator: random real slices of every training subject."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__(images.shape[-1])
        self.images = images

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.images[torch.randint(0, len(self.images), (n,), generator=generator)]


class ConditionalFake(NoiseModel):
    """Conditioned on slice_pos and site: returns the training slice of the requested site nearest in position."""

    def __init__(self, images: torch.Tensor, rows: list[dict]) -> None:
        super().__init__(images.shape[-1])
        self.config = SimpleNamespace(image_size=images.shape[-1], conditions=("slice_pos", "site"))
        self.images, self.rows, self.requested = images, rows, []

    def sample(self, n, generator=None, conditions=None):
        assert conditions is not None and len(conditions) == n
        self.requested += conditions
        out = []
        for c in conditions:
            best = min((i for i, r in enumerate(self.rows) if r["site"] == c["site"]),
                       key=lambda i: abs(self.rows[i]["slice_pos"] - c["slice_pos"]))
            out.append(self.images[best])
        return torch.stack(out)
