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


def test_a_conditional_flow_vae_conditions_only_its_flow_and_samples_the_same_after_loading(demo_store, tmp_path):
    names = ["slice_pos", "site", "age", "sex"]
    model_cfg, train_cfg = build_configs("vae", {
        "model": {"image_size": 32, "blocks": 3, "channels": [8, 16, 32], "latent": "spatial", "norm": "group",
                  "latent_dim": 4, "latent_prior": "flow", "flow_width": 16, "flow_steps": 4, "conditions": names,
                  "sample_guidance": 1.5, "sample_guidance_on": ["slice_pos"]},
        "train": {"batch_size": 16, "final_eval": False, "grid_every": 0, "prior_steps": 40, "epochs": 1}})
    model = train(model_cfg, train_cfg, demo_store, out_dir=tmp_path / "run", progress=False).model
    assert model.condition is None and model.dec_film is None         # the autoencoder is unconditional
    emb = model.condition_embedding
    assert emb is model.latent_prior.condition and len(emb.training_rows()) == len(demo_store.slices("train"))
    flow_params = {id(p) for p in model.latent_prior.net.parameters()}
    assert all(id(p) in flow_params for p in emb.parameters())          # trained (and EMA-averaged) with the flow
    rows = [{"slice_pos": p, "site": "HH", "age": None, "sex": None} for p in (0.1, 0.5, 0.9)]
    first = model.sample(3, torch.Generator().manual_seed(5), conditions=rows)
    assert first.shape == (3, 1, 32, 32) and torch.isfinite(first).all()
    loaded = load_model(save_model(model, tmp_path / "saved"))
    again = loaded.sample(3, torch.Generator().manual_seed(5), conditions=rows)
    assert float((first - again).abs().max()) < 1e-5
    other = [{**r, "slice_pos": 1 - r["slice_pos"]} for r in rows]
    assert not torch.allclose(first, loaded.sample(3, torch.Generator().manual_seed(5), conditions=other))
    with pytest.raises(ValueError, match="it knows: slice_pos, site, age, sex"):
        from mrigen.models.condition import ConditionRequest

        ConditionRequest(emb.names, {"scanner": "GE"})
