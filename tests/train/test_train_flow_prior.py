"""A VAE with the flow latent prior (model.latent_prior="flow") through the training loop, saving and loading."""

from __future__ import annotations

import pytest
import torch

from mrigen.models.io import load_model, save_model
from mrigen.train import train
from mrigen.train.configs import build_configs


def test_a_vae_with_a_flow_prior_trains_it_after_the_autoencoder_and_samples_the_same_after_loading(
        demo_store, tmp_path):
    model_cfg, train_cfg = build_configs("vae", {
        "model": {"image_size": 32, "blocks": 3, "channels": [8, 16, 32], "latent": "spatial", "norm": "group",
                  "latent_dim": 4, "latent_prior": "flow", "flow_width": 16, "flow_steps": 4},
        "train": {"batch_size": 16, "final_eval": False, "grid_every": 1, "prior_steps": 40, "epochs": 2}})
    result = train(model_cfg, train_cfg, demo_store, out_dir=tmp_path / "run", progress=False)  # grids at epoch 1: no samples
    model = result.model
    assert model.prior_trained and len(result.extra["flow_loss"]) == 20
    assert result.extra["flow_val_loss"] is not None
    first = model.sample(3, torch.Generator().manual_seed(5))
    assert first.shape == (3, 1, 32, 32) and torch.isfinite(first).all()
    loaded = load_model(save_model(model, tmp_path / "saved"))
    again = loaded.sample(3, torch.Generator().manual_seed(5))
    assert float((first - again).abs().max()) < 1e-5       # same draws; the trained copy may run channels_last
    assert not torch.equal(first, loaded.sample(3, torch.Generator().manual_seed(6)))


def test_a_flow_prior_without_prior_steps_leaves_the_model_unable_to_sample(demo_store):
    model_cfg, train_cfg = build_configs("vae", {
        "model": {"image_size": 32, "blocks": 3, "channels": [8, 16, 32], "latent": "spatial", "norm": "group",
                  "latent_dim": 4, "latent_prior": "flow", "flow_width": 8},
        "train": {"batch_size": 16, "final_eval": False, "grid_every": 0, "prior_steps": 0, "epochs": 1}})
    model = train(model_cfg, train_cfg, demo_store, progress=False).model
    assert not model.prior_trained
    with pytest.raises(RuntimeError, match="flow prior"):
        model.sample(1)
