"""evaluate(): keys, finiteness, determinism, baselines, copies, models that cannot sample, invalid settings."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from metrics_fakes import MemoryModel, NoiseModel, NoPriorModel, SyntheticStore

from mrigen.metrics import EVAL_SAMPLES, FeatureNet, evaluate
from mrigen.metrics.features import train_halves

ALL_KEYS = {"ssim", "psnr", "ms_ssim", "fd", "fd_real", "fd_ratio", "precision", "recall", "precision_real",
            "recall_real", "diversity", "diversity_real", "hf_ratio", "hf_ratio_real", "recon_hf_ratio", "memorised",
            "nn_train_dist", "nn_train_dist_real", "feature_nets"}


def test_identity_model_returns_every_key_finite(store: SyntheticStore, feature_net: FeatureNet) -> None:
    model = MemoryModel(store.tensor("val")).train()
    out = evaluate(model, store, "val", feature_net=feature_net, batch_size=16)
    assert set(out) == ALL_KEYS
    assert all(isinstance(v, float) and torch.isfinite(torch.tensor(v)) for v in out.values())
    assert out["ssim"] == pytest.approx(1.0, abs=1e-5) and out["ms_ssim"] == pytest.approx(1.0, abs=1e-5)
    assert out["recon_hf_ratio"] == pytest.approx(1.0)             # a perfect decoder is as sharp as its input
    assert out["hf_ratio"] == pytest.approx(1.0, abs=0.1)           # samples are draws of the reference slices
    assert model.training                                            # previous mode restored
    for key in ("precision", "recall", "precision_real", "recall_real", "memorised"):
        assert 0.0 <= out[key] <= 1.0
    assert out["fd"] >= 0 and out["fd_real"] > 0
    assert out["fd_ratio"] == pytest.approx(out["fd"] / out["fd_real"])
    assert out["feature_nets"] == len(feature_net.members) == 1
    assert out["memorised"] == 0.0                  # held-out slices are no copies of training slices


def test_default_sample_count_and_baseline_from_unseen_train_subjects(
        store: SyntheticStore, feature_net: FeatureNet, monkeypatch: pytest.MonkeyPatch) -> None:
    evaluate_mod = importlib.import_module("mrigen.metrics.evaluate")

    seen: dict[str, object] = {}
    real_sample_metrics = evaluate_mod.sample_metrics

    def spy(fake, reference, baseline, train, **kwargs):
        seen.update(fake=fake, reference=reference, baseline=baseline, train=train, **kwargs)
        return real_sample_metrics(fake, reference, baseline, train, **kwargs)

    monkeypatch.setattr(evaluate_mod, "sample_metrics", spy)
    evaluate(MemoryModel(store.tensor("val")), store, feature_net=feature_net)
    assert seen["fake"].shape[0] == EVAL_SAMPLES
    assert torch.equal(seen["reference"], store.tensor("val"))               # every held-out slice
    train = store.tensor("train")
    _, baseline_rows = train_halves(store.slices("train"))
    assert seen["baseline"].shape[0] == len(baseline_rows) < EVAL_SAMPLES   # all of a small baseline half
    assert torch.allclose(seen["baseline"].sum(0), train[baseline_rows].sum(0), atol=1e-4)   # same slices
    # both real sets are grouped by subject for their k-NN balls (the reference's and the baseline's)
    assert seen["reference_groups"] == [row["subject"] for row in store.slices("val")]
    rows = store.slices("train")
    assert sorted(seen["baseline_groups"]) == sorted(rows[i]["subject"] for i in baseline_rows.tolist())

def test_evaluate_is_deterministic_for_a_seed(store: SyntheticStore, feature_net: FeatureNet) -> None:
    model = MemoryModel(store.tensor("train"), noise=0.05)
    first = evaluate(model, store, feature_net=feature_net, seed=3)
    assert evaluate(model, store, feature_net=feature_net, seed=3) == first


def test_noise_model_is_far_worse_than_the_real_baseline(store: SyntheticStore, feature_net: FeatureNet) -> None:
    out = evaluate(NoiseModel(store.tensor("train")), store, feature_net=feature_net, n_samples=20)
    assert out["fd"] > out["fd_real"] and out["fd_ratio"] > 2
    assert out["precision"] < out["precision_real"] and out["recall"] < out["recall_real"]
    assert out["diversity"] < out["diversity_real"] and out["ssim"] < 0.2
    assert out["hf_ratio"] > 1.5 * out["hf_ratio_real"]             # noise is all high frequencies


def test_cached_feature_net_is_used_by_default(store: SyntheticStore, feature_net: FeatureNet) -> None:
    model = MemoryModel(store.tensor("train"))
    assert evaluate(model, store) == evaluate(model, store, feature_net=feature_net)


def test_model_that_cannot_sample_reports_reconstruction_only(
        store: SyntheticStore, feature_net: FeatureNet, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mrigen.metrics"):
        out = evaluate(NoPriorModel(store.tensor("train")), store, feature_net=feature_net)
    assert set(out) == {"ssim", "psnr", "ms_ssim", "recon_hf_ratio"}
    assert "cannot sample" in caplog.text and "prior has not been trained" in caplog.text


def test_copies_of_training_slices_are_flagged_as_memorised(store: SyntheticStore, feature_net: FeatureNet) -> None:
    copies = evaluate(MemoryModel(store.tensor("train")), store, feature_net=feature_net, n_samples=40)
    assert copies["memorised"] == 1.0 and copies["nn_train_dist"] == pytest.approx(0.0, abs=1e-3)
    assert copies["nn_train_dist_real"] > 0.01


def test_invalid_settings_are_refused(store: SyntheticStore, feature_net: FeatureNet, tmp_path) -> None:
    model = MemoryModel(store.tensor("train"))
    for bad in (2, 10, 12.5, True):
        with pytest.raises(ValueError, match="n_samples"):
            evaluate(model, store, feature_net=feature_net, n_samples=bad)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, store, feature_net=feature_net, batch_size=0)
    with pytest.raises(ValueError, match="split='train'"):
        evaluate(model, store, "train", feature_net=feature_net)
    tiny = SyntheticStore(tmp_path, subjects={"train": 2, "val": 1}, n_pos=5)
    with pytest.raises(ValueError, match="more than 10 slices"):
        evaluate(model, tiny, feature_net=feature_net)


def test_train_halves_split_subjects_evenly_and_stably(store: SyntheticStore) -> None:
    rows = store.slices("train")
    net_rows, base_rows = train_halves(rows)
    net_subjects = {rows[i]["subject"] for i in net_rows.tolist()}
    base_subjects = {rows[i]["subject"] for i in base_rows.tolist()}
    assert not net_subjects & base_subjects and len(net_subjects) == len(base_subjects) == 4
    assert len(net_rows) + len(base_rows) == len(rows)
    again = train_halves(list(reversed(rows)))          # membership follows the names, not the row order
    assert {rows[::-1][i]["subject"] for i in again[0].tolist()} == net_subjects


def test_train_halves_fall_back_to_every_row_with_one_subject(caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"subject": "IXI001", "site": "HH", "slice_pos": p} for p in range(9)]
    with caplog.at_level(logging.WARNING, logger="mrigen.metrics"):
        a, b = train_halves(rows)
    assert torch.equal(a, torch.arange(9)) and torch.equal(b, torch.arange(9))
    assert "1 subject" in caplog.text


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
