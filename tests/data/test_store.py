"""Slice store: round trip with digests, tamper refusal, atomic replace, torch tensor, demo builder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mrigen.data import build_demo_store
from mrigen.data.config import IngestConfig
from mrigen.data.ingest import ingest
from mrigen.data.store import SliceStore, StoreError, write_store

CFG = IngestConfig(size=16, slices=4)


@pytest.fixture
def store(cohort, tmp_path) -> SliceStore:
    return ingest(cohort, tmp_path / "store", CFG, progress=False)


def test_round_trip(store):
    again = SliceStore.open(store.path)
    assert again.digest == store.digest and again.image_size == 16 and again.config == CFG
    for split in store.splits:
        np.testing.assert_array_equal(again.images(split), store.images(split))
        assert again.slices(split) == store.slices(split)
    t = again.tensor("train", "cpu")
    assert t.shape == (len(again.images("train")), 1, 16, 16) and t.dtype == torch.float32
    np.testing.assert_array_equal(t[:, 0].numpy(), again.images("train").astype(np.float32))
    assert again.tensor("val", "cpu", dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="split='bogus'"):
        again.images("bogus")


def test_tampered_images_are_refused(store):
    path = store.path / "images.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="images.npy: sha256 does not match"):
        SliceStore.open(store.path)


def test_tampered_manifest_is_refused(store):
    path = store.path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["slices"]["age"][0] = 99.0
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="manifest_sha256"):
        SliceStore.open(store.path)
    path.write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        SliceStore.open(store.path)
    path.unlink()
    with pytest.raises(StoreError, match="not a slice store"):
        SliceStore.open(store.path)


def test_existing_store_is_refused_or_replaced_atomically(store, cohort, tmp_path):
    with pytest.raises(FileExistsError, match="--overwrite"):
        ingest(cohort, store.path, CFG, progress=False)
    with pytest.raises(ValueError):  # a failing write leaves the old store intact and no temporary directory
        write_store(store.path, [np.zeros((2, 16, 16), np.float16), np.zeros((2, 8, 8), np.float16)],
                    dict(store.manifest), overwrite=True)
    assert SliceStore.open(store.path).digest == store.digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ixi", "store"]
    replaced = ingest(cohort, store.path, IngestConfig(size=32, slices=4), overwrite=True, progress=False)
    assert replaced.image_size == 32 and SliceStore.open(store.path).digest == replaced.digest


def test_build_demo_store_reuses_a_matching_store(tmp_path):
    first = build_demo_store(tmp_path, subjects=3, size=16, seed=1, workers=1, progress=False)
    assert first.splits == ("train", "val", "test") and first.image_size == 16
    mtime = (first.path / "images.npy").stat().st_mtime_ns
    again = build_demo_store(tmp_path, subjects=3, size=16, seed=1, workers=2, progress=False)
    assert again.digest == first.digest and (again.path / "images.npy").stat().st_mtime_ns == mtime
    (first.path / "images.npy").write_bytes(b"broken")
    rebuilt = build_demo_store(tmp_path, subjects=3, size=16, seed=1, workers=1, progress=False)
    assert rebuilt.digest == first.digest  # damaged cache rebuilt, same deterministic content
