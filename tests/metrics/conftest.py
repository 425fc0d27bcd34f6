"""Fixtures of the metrics tests: one synthetic store and its (tiny) feature network per module.

The metrics tests run torch on ONE intra-op thread: their tensors are small, and on a busy two-core machine
(CI, or several jobs at once) two threads make each small op wait for a core, measured 20x slower per step.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from metrics_fakes import TINY_FEATURES, SyntheticStore

from mrigen.metrics import FeatureNet, get_feature_net


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return SyntheticStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def feature_net(store: SyntheticStore) -> FeatureNet:
    return get_feature_net(store, config=TINY_FEATURES)
