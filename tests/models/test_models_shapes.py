"""Shape tables for both families, and model invariants: eval determinism, outputs in [0, 1], gradients."""

from __future__ import annotations

import pytest
import torch

from mrigen.models import ModelConfig, VAEOutput, VQOutput, build_model, vae_loss, vq_vae_loss

# (config overrides, input shape, expected shapes: recon, latent mean (VAE) or indices (VQ-VAE))
CASES = [
    (dict(family="vae", image_size=16, blocks=4, kernel_size=4), (2, 1, 16, 16), ((2, 1, 16, 16), (2, 8))),
    (dict(family="vae", image_size=32, blocks=5, kernel_size=3, latent="spatial", norm="group"),
     (2, 1, 32, 32), ((2, 1, 32, 32), (2, 8, 1, 1))),
    (dict(family="vae", image_size=64, blocks=6, kernel_size=5, norm="group"), (2, 1, 64, 64), ((2, 1, 64, 64), (2, 8))),
    (dict(family="vae", image_size=64, blocks=4, kernel_size=3, latent="spatial", latent_dim=3),
     (3, 1, 64, 64), ((3, 1, 64, 64), (3, 3, 4, 4))),
    (dict(family="vae", image_size=32, blocks=4, kernel_size=5, latent_dim=5), (2, 1, 32, 32), ((2, 1, 32, 32), (2, 5))),
    (dict(family="vqvae", image_size=16, blocks=4, kernel_size=4), (2, 1, 16, 16), ((2, 1, 16, 16), (2, 1, 1))),
    (dict(family="vqvae", image_size=32, blocks=4, kernel_size=3, norm="group"), (2, 1, 32, 32), ((2, 1, 32, 32), (2, 2, 2))),
    (dict(family="vqvae", image_size=64, blocks=5, kernel_size=5), (2, 1, 64, 64), ((2, 1, 64, 64), (2, 2, 2))),
    (dict(family="vqvae", image_size=64, blocks=6, kernel_size=4, norm="group"), (2, 1, 64, 64), ((2, 1, 64, 64), (2, 1, 1))),
    (dict(family="vqvae", image_size=32, blocks=2, kernel_size=3), (2, 1, 32, 32), ((2, 1, 32, 32), (2, 8, 8))),
]
IDS = [f"{c['family']}-{c['image_size']}px-b{c['blocks']}-k{c['kernel_size']}-{c.get('latent', 'dense')}" for c, _, _ in CASES]


@pytest.mark.parametrize("overrides, in_shape, expected", CASES, ids=IDS)
def test_forward_shapes(make_cfg, overrides, in_shape, expected):
    model = build_model(make_cfg(**overrides))
    x = torch.rand(in_shape)
    out = model(x)
    recon_shape, code_shape = expected
    assert out.recon.shape == recon_shape
    assert 0.0 <= out.recon.min() and out.recon.max() <= 1.0
    if isinstance(out, VAEOutput):
        assert out.mu.shape == out.logvar.shape == code_shape
        assert vae_loss(out, x).total.isfinite()
    else:
        assert isinstance(out, VQOutput)
        assert out.indices.shape == code_shape and out.indices.dtype == torch.int64
        assert out.vq_loss.shape == out.perplexity.shape == ()
        assert 1.0 <= out.perplexity <= model.config.codebook_size
        assert vq_vae_loss(out, x).total.isfinite()
    assert model.reconstruct(x).shape == recon_shape


def test_thesis_default_layers():
    """Five k4/s2 conv blocks 16-32-64-256-1024, dense 1024-d posterior, mirrored decoder to 1 channel."""
    model = build_model(ModelConfig())
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 256, 1024]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    assert model.to_posterior[1].out_features == 2 * 1024
    deconvs = [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [d.out_channels for d in deconvs] == [256, 64, 32, 16, 1]
    assert isinstance(model.decoder[-1], torch.nn.Sigmoid)


@pytest.mark.parametrize("family", ["vae", "vqvae"])
def test_eval_is_deterministic_and_keeps_mode(make_cfg, make_images, family):
    model = build_model(make_cfg(family=family, image_size=32, blocks=3))
    x = make_images(4, 32)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r1, r2 = model.reconstruct(x), model.reconstruct(x)
    assert torch.equal(r1, r2)
    assert model.training  # reconstruct switched to eval and back
    for k, v in model.state_dict().items():  # no BatchNorm statistics or codebook moved
        assert torch.equal(v, before[k]), k
    model.eval()
    torch.manual_seed(1)
    o1 = model(x)
    torch.manual_seed(1)
    o2 = model(x)
    for a, b in zip(o1, o2):
        assert torch.equal(a, b)
    if family == "vqvae":
        # eval forward = nearest-code reconstruction (up to the straight-through rounding z + (q - z))
        torch.testing.assert_close(o1.recon, r1)


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("latent", ["dense", "spatial"])
def test_vae_gradients_reach_every_parameter(make_cfg, make_images, norm, latent):
    model = build_model(make_cfg(image_size=32, blocks=3, norm=norm, latent=latent))
    x = make_images(4, 32)
    vae_loss(model(x), x, ssim_weight=0.1, sigma="learned", log_sigma=model.log_sigma).total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_vqvae_gradients_reach_every_autoencoder_parameter(make_cfg, make_images):
    model = build_model(make_cfg(family="vqvae", image_size=32, blocks=3))
    x = make_images(4, 32)
    vq_vae_loss(model(x), x).total.backward()
    trained = list(model.autoencoder_parameters())
    assert len(trained) == len([n for n, _ in model.named_parameters() if not n.startswith("prior.")])
    for name, p in model.named_parameters():
        if name.startswith("prior."):
            assert p.grad is None, name  # the prior is trained separately, on the codes
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(b.requires_grad for b in model.quantizer.buffers())  # the codebook is EMA, not a parameter


@pytest.mark.parametrize("family", ["vae", "vqvae"])
def test_sample_shapes_in_unit_range_and_reproducible(make_cfg, family):
    model = build_model(make_cfg(family=family, image_size=32, blocks=4))
    if family == "vqvae":
        model.mark_prior_trained()
    s1 = model.sample(3, generator=torch.Generator().manual_seed(7))
    s2 = model.sample(3, generator=torch.Generator().manual_seed(7))
    assert s1.shape == (3, 1, 32, 32)
    assert 0.0 <= s1.min() and s1.max() <= 1.0
    assert torch.equal(s1, s2)
    with pytest.raises(ValueError, match="n=0"):
        model.sample(0)


@pytest.mark.parametrize("family", ["vae", "vqvae"])
def test_wrong_input_shape_is_a_clear_error(make_cfg, family):
    model = build_model(make_cfg(family=family))
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\).*\(2, 3, 16, 16\)"):
        model(torch.rand(2, 3, 16, 16))


@pytest.mark.parametrize("family", ["vae", "vqvae"])
def test_bf16_autocast_and_channels_last(make_cfg, make_images, family):
    model = build_model(make_cfg(family=family, image_size=32, blocks=3)).to(memory_format=torch.channels_last)
    x = make_images(4, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        terms = vae_loss(out, x) if family == "vae" else vq_vae_loss(out, x)
    assert terms.total.dtype == torch.float32 and terms.total.isfinite()
    terms.total.backward()
    if family == "vqvae":
        assert model.quantizer.embed.dtype == torch.float32
