"""The encoder's first layer: a GroupNorm encoder must see a slice's intensity level (ModelConfig.encoder_stem)."""

from __future__ import annotations

import json

import pytest
import torch

from mrigen.models import build_model, load_model, save_model


def _posterior_means(model, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).mu


@pytest.mark.parametrize("latent", ["dense", "spatial"])
def test_a_groupnorm_encoder_sees_the_intensity_level_of_a_slice(make_cfg, make_images, latent):
    """GroupNorm normalises each slice's own features: after a bias-free first conv it divides out any global
    scaling, so conv -> GroupNorm encodes a slice and the same slice at 80% brightness identically. The default stem
    (a biased conv, no norm) keeps the level."""
    x = make_images(4, 16, seed=1)
    torch.manual_seed(0)
    blind = build_model(make_cfg(norm="group", encoder_stem="norm", latent=latent))
    torch.testing.assert_close(_posterior_means(blind, 0.8 * x), _posterior_means(blind, x), atol=1e-4, rtol=1e-4)
    torch.manual_seed(0)
    seeing = build_model(make_cfg(norm="group", latent=latent))
    assert seeing.config.plain_stem
    gap = (_posterior_means(seeing, 0.8 * x) - _posterior_means(seeing, x)).abs().max()
    assert gap > 1e-2


def test_auto_stem_is_plain_for_groupnorm_only_and_the_thesis_layers_stay(make_cfg):
    assert make_cfg(norm="group").plain_stem and not make_cfg(norm="batch").plain_stem
    assert make_cfg(norm="batch", encoder_stem="plain").plain_stem
    assert not make_cfg(norm="group", encoder_stem="norm").plain_stem
    first = list(build_model(make_cfg(norm="group")).encoder)[:2]
    assert first[0].bias is not None and isinstance(first[1], torch.nn.LeakyReLU)
    thesis = list(build_model(make_cfg(norm="batch")).encoder)[:3]
    assert thesis[0].bias is None and isinstance(thesis[1], torch.nn.BatchNorm2d)


@pytest.mark.parametrize("family", ["vae", "vqvae"])
def test_a_model_saved_before_the_stem_option_loads_with_its_old_layers(tmp_path, make_cfg, make_images, family):
    """A config.json without `encoder_stem` was written when every encoder began conv -> norm: it loads that way."""
    torch.manual_seed(0)
    old = build_model(make_cfg(family=family, norm="group", encoder_stem="norm"))
    save_model(old, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["model"]["encoder_stem"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = load_model(tmp_path)
    assert loaded.config.encoder_stem == "norm"
    x = make_images(2, 16)
    old.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.reconstruct(x), old.reconstruct(x))
