"""ModelConfig: defaults, validation per field, from_dict, JSON round trip; the model registry."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mrigen.models import MODELS, VAE, VQVAE, ModelConfig, build_model


def test_defaults_are_the_thesis_vae():
    cfg = ModelConfig()
    assert (cfg.family, cfg.image_size, cfg.blocks, cfg.kernel_size, cfg.latent, cfg.latent_dim) == (
        "vae", 128, 5, 4, "dense", 1024)
    assert cfg.scaled_channels == (16, 32, 64, 256, 1024)
    assert cfg.grid_size == 4


def test_width_scales_channels():
    assert ModelConfig(width=0.5).scaled_channels == (8, 16, 32, 128, 512)
    assert ModelConfig(width=0.01).scaled_channels[0] == 1


@pytest.mark.parametrize(
    "field, value",
    [
        ("family", "gan"),
        ("image_size", 100),
        ("image_size", 8),
        ("image_size", 64.0),
        ("blocks", 0),
        ("blocks", 7),  # more blocks than channel entries
        ("channels", ()),
        ("channels", (16, 0, 32, 64, 128)),
        ("width", 0.0),
        ("width", float("nan")),
        ("kernel_size", 2),
        ("kernel_size", 6),
        ("norm", "layer"),
        ("encoder_stem", "none"),
        ("latent", "sparse"),
        ("latent_dim", 0),
        ("codebook_size", 1),
        ("code_dim", 0),
        ("commitment", -0.1),
        ("ema_decay", 1.0),
        ("ema_decay", 0.0),
        ("dead_code_threshold", -1.0),
        ("prior_channels", 40),
        ("prior_layers", 0),
    ],
)
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def test_blocks_too_deep_for_image_size_names_both_fields():
    with pytest.raises(ValueError, match="blocks=5.*image_size=16"):
        ModelConfig(image_size=16, blocks=5)
    ModelConfig(image_size=16, blocks=4)  # 1x1 grid is fine


def test_vqvae_needs_spatial_latent():
    with pytest.raises(ValueError, match="latent"):
        ModelConfig(family="vqvae", latent="dense")
    assert ModelConfig(family="vqvae", latent="spatial").family == "vqvae"


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match="lattent_dim"):
        ModelConfig.from_dict({"lattent_dim": 3})


def test_json_round_trip_keeps_tuples():
    cfg = ModelConfig(family="vqvae", latent="spatial", blocks=3, channels=(8, 16, 32), width=0.5)
    back = ModelConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg
    assert isinstance(back.channels, tuple)
    hash(back)


def test_registry_builds_each_family_and_names_choices_on_unknown():
    assert MODELS == {"vae": VAE, "vqvae": VQVAE}
    assert isinstance(build_model(ModelConfig(image_size=16, blocks=4, channels=(2, 2, 2, 2), latent_dim=4)), VAE)
    bad = ModelConfig()
    object.__setattr__(bad, "family", "diffusion")  # bypasses validation, as a corrupted config would
    with pytest.raises(ValueError, match="'vae', 'vqvae'"):
        build_model(bad)
