"""Fixtures for training tests: one small demo-cohort store per session (6 subjects, 32x32 slices)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory):
    from mrigen.data import build_demo_store

    return build_demo_store(tmp_path_factory.mktemp("demo-store"), subjects=6, size=32, seed=0)
