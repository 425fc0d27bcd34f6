"""Fixtures of the metrics tests: one synthetic store and its (tiny) feature network per module."""

from __future__ import annotations

import pytest
from metrics_fakes import TINY_FEATURES, SyntheticStore

from mrigen.metrics import FeatureNet, get_feature_net


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return SyntheticStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def feature_net(store: SyntheticStore) -> FeatureNet:
    return get_feature_net(store, config=TINY_FEATURES)
