"""Attribute probes: what they read back from real held-out slices, the cache, missing labels."""

from __future__ import annotations

import statistics

import pytest
import torch
from conftest import TINY_PROBES

from mrigen.metrics.probe import (ProbeConfig, Probes, get_probes, label_info, probe_cache_path)


def test_probes_cover_the_store_attributes_and_beat_chance_on_position(demo_store, probes):
    assert probes.attributes == ("slice_pos", "site", "age", "sex")
    assert probes.site_names == ("A", "B", "C")
    val = demo_store.slices("val")
    median = statistics.median(r["slice_pos"] for r in demo_store.slices("train"))
    chance = statistics.fmean(abs(r["slice_pos"] - median) for r in val)
    assert set(probes.val_scores) == {"slice_pos_mae", "site_acc", "age_mae", "sex_acc"}
    assert probes.val_scores["slice_pos_mae"] < 0.6 * chance          # held-out subjects, not the training ones
    assert probes.val_scores["site_acc"] > 0.5                        # chance: 1/3
    pred = probes.predict(demo_store.tensor("val"))
    assert pred["site"].dtype == torch.int64 and pred["site"].max() < 3 and pred["slice_pos"].shape == (len(val),)


def test_cache_round_trip_and_store_identity(demo_store, probes, tmp_path):
    path = probe_cache_path(demo_store)
    assert path.is_file() and demo_store.digest[:12] in path.name and "probes-v1" in path.name
    again = get_probes(demo_store)
    x = demo_store.tensor("test")
    for k, v in probes.predict(x).items():
        assert torch.equal(v, again.predict(x)[k])
    assert again.val_scores == probes.val_scores
    from mrigen.metrics.probe import _load
    with pytest.raises(ValueError, match="trained on store"):
        _load(path, "0" * 64, "cpu")


def test_score_skips_unknown_values_and_counts_unknown_sites_as_misses(demo_store, probes):
    x = demo_store.tensor("test")[:4]
    rows = [{"slice_pos": 0.5, "site": "Mars", "age": None, "sex": None} for _ in range(4)]
    s = probes.score(x, rows)
    assert set(s) == {"slice_pos_mae", "site_acc"} and s["site_acc"] == 0.0
    with pytest.raises(ValueError, match="4 images"):
        probes.score(x, rows[:3])
    labels = probes.labels(x)
    assert labels[0]["site"] in probes.site_names and labels[0]["sex"] in ("F", "M")


def test_label_info_needs_two_values_and_ignores_missing():
    rows = [{"slice_pos": p / 10, "site": "HH", "age": None, "sex": "F"} for p in range(10)]
    info = label_info(rows)
    assert info["attributes"] == ["slice_pos"]          # one site, no age, one sex: nothing else to tell apart
    rows[0].update(age=30.0, sex="M")
    rows[1].update(age=60.0)
    assert label_info(rows)["attributes"] == ["slice_pos", "age", "sex"]
    assert label_info(rows)["age_mean"] == 45.0


def test_config_is_validated():
    with pytest.raises(ValueError, match="steps"):
        ProbeConfig(steps=0)
    with pytest.raises(ValueError, match="input_size"):
        ProbeConfig(input_size=30)
    assert isinstance(TINY_PROBES, ProbeConfig) and Probes.__name__ == "Probes"
