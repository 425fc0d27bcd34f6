"""evaluate(): keys, finiteness, determinism, baselines, models that cannot sample, invalid settings."""

from __future__ import annotations

import logging

import pytest
import torch
from metrics_fakes import MemoryModel, NoiseModel, NoPriorModel, SyntheticStore

from mrigen.metrics import FeatureNet, evaluate, real_halves

ALL_KEYS = {"ssim", "psnr", "ms_ssim", "fd", "fd_real", "precision", "recall", "precision_real", "recall_real",
            "diversity", "diversity_real"}


def test_identity_model_returns_every_key_finite(store: SyntheticStore, feature_net: FeatureNet) -> None:
    model = MemoryModel(store.tensor("val")).train()
    out = evaluate(model, store, "val", feature_net=feature_net, batch_size=16)
    assert set(out) == ALL_KEYS
    assert all(isinstance(v, float) and torch.isfinite(torch.tensor(v)) for v in out.values())
    assert out["ssim"] == pytest.approx(1.0, abs=1e-5) and out["ms_ssim"] == pytest.approx(1.0, abs=1e-5)
    assert model.training                                            # previous mode restored
    for key in ("precision", "recall", "precision_real", "recall_real"):
        assert 0.0 <= out[key] <= 1.0
    assert out["fd"] >= 0 and out["fd_real"] >= 0


def test_evaluate_is_deterministic_for_a_seed(store: SyntheticStore, feature_net: FeatureNet) -> None:
    model = MemoryModel(store.tensor("train"), noise=0.05)
    first = evaluate(model, store, feature_net=feature_net, seed=3)
    assert evaluate(model, store, feature_net=feature_net, seed=3) == first


def test_noise_model_is_far_worse_than_the_real_baseline(store: SyntheticStore, feature_net: FeatureNet) -> None:
    out = evaluate(NoiseModel(store.tensor("train")), store, feature_net=feature_net, n_samples=20)
    assert out["fd"] > out["fd_real"]
    assert out["precision"] < out["precision_real"] and out["recall"] < out["recall_real"]
    assert out["diversity"] < out["diversity_real"] and out["ssim"] < 0.2


def test_cached_feature_net_is_used_by_default(store: SyntheticStore, feature_net: FeatureNet) -> None:
    model = MemoryModel(store.tensor("train"))
    assert evaluate(model, store) == evaluate(model, store, feature_net=feature_net)


def test_model_that_cannot_sample_reports_reconstruction_only(
        store: SyntheticStore, feature_net: FeatureNet, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mrigen.metrics"):
        out = evaluate(NoPriorModel(store.tensor("train")), store, feature_net=feature_net)
    assert set(out) == {"ssim", "psnr", "ms_ssim"}
    assert "cannot sample" in caplog.text and "prior has not been trained" in caplog.text


def test_invalid_settings_are_refused(store: SyntheticStore, feature_net: FeatureNet, tmp_path) -> None:
    model = MemoryModel(store.tensor("train"))
    with pytest.raises(ValueError, match="n_samples"):
        evaluate(model, store, feature_net=feature_net, n_samples=10_000)
    with pytest.raises(ValueError, match="n_samples"):
        evaluate(model, store, feature_net=feature_net, n_samples=2)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, store, feature_net=feature_net, batch_size=0)
    tiny = SyntheticStore(tmp_path, subjects={"train": 1, "val": 1}, n_pos=5)
    with pytest.raises(ValueError, match="needs two real halves"):
        evaluate(model, tiny, feature_net=feature_net)


def test_real_halves_are_disjoint_by_subject_and_equal(store: SyntheticStore) -> None:
    rows = store.slices("val")
    a, b = real_halves(rows, seed=0)
    assert len(a) == len(b) > 0
    assert not {rows[i]["subject"] for i in a.tolist()} & {rows[i]["subject"] for i in b.tolist()}
    assert all(torch.equal(x, y) for x, y in zip(real_halves(rows, 0), (a, b)))


def test_real_halves_fall_back_to_slices_with_one_subject(caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"subject": "IXI001", "site": "HH", "slice_pos": p} for p in range(9)]
    with caplog.at_level(logging.WARNING, logger="mrigen.metrics"):
        a, b = real_halves(rows, seed=0)
    assert len(a) == len(b) == 4 and not set(a.tolist()) & set(b.tolist())
    assert "not by subject" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_on_cuda_is_finite_and_deterministic(tmp_path) -> None:
    from metrics_fakes import TINY_FEATURES

    from mrigen.metrics import get_feature_net

    store = SyntheticStore(tmp_path)
    net = get_feature_net(store, device="cuda", config=TINY_FEATURES)
    model = MemoryModel(store.tensor("train")).to("cuda")
    first = evaluate(model, store, feature_net=net)
    assert set(first) == ALL_KEYS and all(torch.isfinite(torch.tensor(v)) for v in first.values())
    assert evaluate(model, store, feature_net=net) == first
