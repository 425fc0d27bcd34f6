"""Training options for quality: patch-adversarial loss (and its resume), sigma-VAE, augmentation, early stopping
with the best weights kept, mean-path BatchNorm statistics after training."""

from __future__ import annotations

import math

import pytest
import torch

from mrigen.models.latent_prior import GaussianLatentPrior
from mrigen.train import train
from mrigen.train.augment import augment_batch
from mrigen.train.configs import build_configs
from mrigen.train.loop import _BestWeights, _subject_ids

SMALL = {"image_size": 32, "blocks": 3, "channels": [8, 16, 32]}
FAST = {"batch_size": 16, "final_eval": False, "grid_every": 0, "prior_steps": 20, "lr": 1e-3}


def configs(family="vae", epochs=2, **train_kw):
    return build_configs(family, {"model": SMALL, "train": {**FAST, "epochs": epochs, **train_kw}})


def test_adversarial_training_updates_the_discriminator_and_resumes_exactly(demo_store, tmp_path):
    model_cfg, train_cfg = configs(epochs=3, adv_weight=0.1, adv_start_epoch=1)
    straight = train(model_cfg, train_cfg, demo_store, out_dir=tmp_path / "a", progress=False)
    first, later = straight.history[0], straight.history[-1]
    assert first["train_adv"] == 0.0 and first["train_disc"] == 0.0     # warm-up: no discriminator yet
    assert math.isfinite(later["train_adv"]) and later["train_disc"] > 0
    _, two = configs(epochs=2, adv_weight=0.1, adv_start_epoch=1)
    train(model_cfg, two, demo_store, out_dir=tmp_path / "b", progress=False)
    resumed = train(model_cfg, train_cfg, demo_store, out_dir=tmp_path / "b", resume=True, progress=False)
    for a, b in zip(straight.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_disc"] == pytest.approx(b["train_disc"], rel=1e-5)


def test_the_adversarial_term_does_not_overrule_a_calibrated_reconstruction(demo_store):
    """sigma-VAE scales the reconstruction by 1 / (2 sigma^2): a fixed adversarial weight overruled it once the
    error got small and held-out SSIM collapsed (0.92 -> 0.03 at 64 px); the adaptive weight keeps it balanced."""
    model_cfg, train_cfg = configs(epochs=5, sigma="optimal", adv_weight=0.5, adv_start_epoch=2)
    ssim = [h["val_ssim"] for h in train(model_cfg, train_cfg, demo_store, progress=False).history]
    # the discriminator joins at epoch 2; with the fixed weight SSIM fell below the warm-up's (0.056 -> -0.088)
    assert all(s > ssim[1] for s in ssim[2:]) and ssim[-1] > 2 * ssim[1], ssim


@pytest.mark.parametrize("sigma", ["optimal", "learned"])
def test_calibrated_decoder_trains_and_reports_sigma(demo_store, sigma):
    model_cfg, train_cfg = configs(epochs=2, sigma=sigma)
    result = train(model_cfg, train_cfg, demo_store, progress=False)
    for h in result.history:
        assert math.isfinite(h["train_loss"]) and 0 < h["train_sigma"] < 1.0
    if sigma == "learned":
        assert float(result.model.log_sigma.detach()) < 0                        # moved down from sigma = 1


def test_batchnorm_vae_is_calibrated_for_reconstruction_after_training(demo_store):
    model_cfg, train_cfg = configs(epochs=1)
    result = train(model_cfg, train_cfg, demo_store, progress=False)
    assert bool(result.model.mean_path_calibrated)


def test_vae_with_a_fitted_prior_fits_it_after_training_and_samples(demo_store, monkeypatch):
    model_cfg, train_cfg = build_configs("vae", {"model": {**SMALL, "latent": "spatial", "norm": "group",
                                                           "latent_dim": 8, "latent_prior": "fitted"},
                                                 "train": {**FAST, "epochs": 1, "grid_every": 1}})
    seen = []
    fit = GaussianLatentPrior.fit
    monkeypatch.setattr(GaussianLatentPrior, "fit",
                        lambda self, latents, **kw: seen.append(kw) or fit(self, latents, **kw))
    result = train(model_cfg, train_cfg, demo_store, progress=False)
    subjects = [row["subject"] for row in demo_store.slices("train")]
    assert seen and all(kw["groups"] is not None for kw in seen)          # every fit pools subjects, not slices
    groups = seen[-1]["groups"].tolist()
    assert len(groups) == len(subjects) and len(set(zip(groups, subjects))) == len(set(subjects)) == len(set(groups))
    prior = result.model.latent_prior
    assert bool(prior.fitted) and torch.isfinite(prior.scale_tril).all()
    assert float(prior.means.abs().sum()) > 0 and float(prior.weights.sum()) == pytest.approx(1.0)
    samples = result.model.sample(4, torch.Generator().manual_seed(0))
    assert samples.shape == (4, 1, 32, 32) and torch.isfinite(samples).all()


def test_subject_ids_name_each_training_slice_or_warn(caplog):
    class Rows:
        def __init__(self, rows):
            self.rows = rows

        def slices(self, split):
            return self.rows

    ids = _subject_ids(Rows([{"subject": "IXI002"}, {"subject": "IXI012"}, {"subject": "IXI002"}]), 3)
    assert ids.tolist() == [0, 1, 0]
    assert _subject_ids(Rows([{"subject": "IXI002"}, {}]), 2) is None
    assert _subject_ids(Rows([{"subject": "IXI002"}]), 2) is None
    assert "pool slices, not subjects" in caplog.text


def test_augmentation_flips_and_shifts_by_whole_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 32, 32, generator=g)
    flipped = augment_batch(x, "flip", torch.Generator().manual_seed(1))
    for a, b in zip(x, flipped):
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
    assert any(not torch.equal(a, b) for a, b in zip(x, flipped))
    shifted = augment_batch(x, "flip_shift", torch.Generator().manual_seed(2))
    assert shifted.shape == x.shape and shifted.dtype == x.dtype
    values = set(x.flatten().tolist()) | {0.0}
    assert set(shifted.flatten().tolist()) <= values                    # no interpolated (blurred) values
    again = augment_batch(x, "flip_shift", torch.Generator().manual_seed(2))
    assert torch.equal(shifted, again)
    assert augment_batch(x, "none") is x
    with pytest.raises(ValueError, match="augment"):
        augment_batch(x, "rotate")


def test_early_stopping_keeps_the_best_weights():
    model = torch.nn.Linear(2, 1)
    best = _BestWeights(patience=2)
    values = [0.5, 0.6, 0.55, 0.58]
    stops = []
    for epoch, v in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(v)
        stops.append(best.update(model, epoch, v))
    assert stops == [False, False, False, True] and best.epoch == 1
    assert best.restore(model) and float(model.weight[0, 0]) == pytest.approx(0.6)
    assert not _BestWeights(patience=0).update(model, 0, 1.0)           # off: never stops, keeps nothing


def test_early_stopping_in_training_restores_the_best_epoch(demo_store):
    model_cfg, train_cfg = configs(epochs=4, early_stop_patience=1, lr=0.05)   # a high lr makes val_ssim wander
    result = train(model_cfg, train_cfg, demo_store, progress=False)
    ssims = [h["val_ssim"] for h in result.history]
    best_epoch = max(range(len(ssims)), key=ssims.__getitem__)
    assert result.extra["best_epoch"] == best_epoch
    if len(ssims) < 4:
        assert result.extra["early_stopped_epoch"] == len(ssims) - 1
        assert not result.stopped_early                                  # early stopping is not pruning
