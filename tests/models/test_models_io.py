"""Saved models: safetensors + config.json, identical outputs after loading, clear errors, no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mrigen
from mrigen.models import VQVAE, build_model, load_model, save_model


def _trained_a_little(model, x):
    """A few optimiser steps so BatchNorm statistics, the codebook and the weights differ from a fresh model."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        out = model(x)
        opt.zero_grad()
        (out.recon - x).square().sum().backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("family", ["vae", "vqvae"])
def test_save_load_gives_identical_outputs(tmp_path, make_cfg, make_images, family, monkeypatch):
    cfg = make_cfg(family=family, image_size=32, blocks=3, norm="batch")
    x = make_images(4, 32)
    model = _trained_a_little(build_model(cfg), x)
    if family == "vqvae":
        with torch.no_grad():
            for p in model.prior.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.mark_prior_trained()
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["mrigen_version"] == mrigen.__version__ and meta["format_version"] == 1
    assert meta["model"]["family"] == family

    def no_pickle(*args, **kwargs):
        raise AssertionError("load_model must not unpickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_model(tmp_path / "m")
    assert loaded.config == cfg and not loaded.training
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    b = loaded(x)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    assert torch.equal(loaded.sample(2, generator=g()), model.sample(2, generator=g()))
    if family == "vqvae":
        assert isinstance(loaded, VQVAE) and bool(loaded.prior_trained)


def test_untrained_prior_flag_survives_round_trip(tmp_path, make_cfg):
    save_model(build_model(make_cfg(family="vqvae")), tmp_path)
    with pytest.raises(RuntimeError, match="trained code prior"):
        load_model(tmp_path).sample(1)


def test_channels_last_model_saves(tmp_path, make_cfg, make_images):
    model = build_model(make_cfg(image_size=32, blocks=3)).eval()
    x = make_images(2, 32)
    expected = model.reconstruct(x)
    save_model(model.to(memory_format=torch.channels_last), tmp_path)
    torch.testing.assert_close(load_model(tmp_path).reconstruct(x), expected)


def test_missing_files_name_the_directory(tmp_path, make_cfg):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*config.json"):
        load_model(tmp_path)
    save_model(build_model(make_cfg()), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)


def test_config_weight_mismatch_is_a_clear_error(tmp_path, make_cfg):
    save_model(build_model(make_cfg(latent_dim=8)), tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["latent_dim"] = 6
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{tmp_path}.*does not match.*wrong shape"):
        load_model(tmp_path)


def test_missing_and_extra_tensors_are_named(tmp_path, make_cfg):
    save_model(build_model(make_cfg()), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors.pop("decoder.0.weight")
    tensors["stray"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['decoder.0.weight'\].*unexpected \['stray'\]"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "content, match",
    [("{not json", "not valid JSON"), ('{"format_version": 1}', "no 'model'"),
     ('{"format_version": 99, "model": {}}', "format_version=99"),
     ('{"format_version": 1, "model": {"kernel_size": 7}}', "kernel_size")],
)
def test_bad_config_json_is_a_clear_error(tmp_path, content, match):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path)


def test_corrupt_weights_are_a_clear_error(tmp_path, make_cfg):
    save_model(build_model(make_cfg()), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(tmp_path)


def test_save_rejects_a_model_without_config(tmp_path):
    with pytest.raises(ValueError, match="ModelConfig"):
        save_model(torch.nn.Linear(2, 2), tmp_path)
