"""Losses: the ELBO's scaling (sums per image), KL per dim, free bits, annealing, SSIM, local spectrum, active units,
overfit."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.image import (multiscale_structural_similarity_index_measure,
                                           structural_similarity_index_measure)

from mrigen.models.ssim import gaussian_ms_ssim, gaussian_ssim
from mrigen.models import VAEOutput, VQOutput, active_units, build_model, kl_per_dim, recon_loss, vae_loss, vq_vae_loss
from mrigen.models.losses import local_spectrum_distance, recon_nll


def _out(recon, d=4, mu=0.0, logvar=0.0):
    b = recon.shape[0]
    return VAEOutput(recon, torch.full((b, d), mu), torch.full((b, d), logvar))


def test_recon_is_summed_per_image_then_averaged_over_batch():
    x = torch.zeros(2, 1, 16, 16)
    recon = torch.full_like(x, 0.5)
    assert recon_loss(recon, x, "mse") == pytest.approx(256 * 0.25)
    assert recon_loss(recon, x, "l1") == pytest.approx(256 * 0.5)
    assert recon_loss(x, x, "mse", ssim_weight=1.0) == pytest.approx(0.0, abs=1e-4)  # SSIM(x, x) = 1
    assert recon_loss(recon, x, "mse", ssim_weight=1.0) > recon_loss(recon, x, "mse")


def test_kl_matches_closed_form():
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    expected = torch.tensor([0.5, 0.5 * (2.0 - 1.0 - math.log(2.0))])
    torch.testing.assert_close(kl_per_dim(mu, logvar), expected)
    spatial = kl_per_dim(torch.ones(3, 2, 2, 2), torch.zeros(3, 2, 2, 2))
    assert spatial.shape == (8,) and torch.allclose(spatial, torch.full((8,), 0.5))


def test_vae_loss_terms_beta_annealing_and_free_bits():
    x = torch.zeros(2, 1, 16, 16)
    out = _out(torch.full_like(x, 0.5), d=4, mu=1.0)  # KL 0.5 per dim -> 2.0
    t = vae_loss(out, x, beta=2.0, kl_weight=0.5)
    assert t.recon == pytest.approx(64.0) and t.kl == pytest.approx(2.0)
    assert t.total == pytest.approx(64.0 + 2.0 * 0.5 * 2.0)
    assert t.kl_per_dim.shape == (4,) and t.vq == 0
    fb = vae_loss(out, x, free_bits=0.75)
    assert fb.kl == pytest.approx(2.0)  # reported KL is the raw KL
    assert fb.total == pytest.approx(64.0 + 4 * 0.75)  # each dim clamped up to the free-bits floor
    assert vae_loss(out, x, kl_weight=0.0).total == pytest.approx(64.0)


def test_free_bits_stop_gradient_below_the_floor():
    mu = torch.full((2, 3), 0.1, requires_grad=True)
    out = VAEOutput(torch.zeros(2, 1, 16, 16), mu, torch.zeros(2, 3))
    vae_loss(out, torch.zeros(2, 1, 16, 16), free_bits=1.0).total.backward()
    assert torch.equal(mu.grad, torch.zeros_like(mu))


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(recon="bce"), "recon"), (dict(beta=-1.0), "beta"), (dict(kl_weight=1.5), "kl_weight"),
     (dict(free_bits=-0.1), "free_bits"), (dict(ssim_weight=-1.0), "ssim_weight"),
     (dict(spectral_weight=-1.0), "spectral_weight")],
)
def test_invalid_loss_settings_raise_naming_the_field(kwargs, field):
    x = torch.zeros(1, 1, 16, 16)
    with pytest.raises(ValueError, match=field):
        vae_loss(_out(x), x, **kwargs)


def _textured(n: int = 4, side: int = 32) -> torch.Tensor:
    """Slices with fine detail: a disc of smooth shading plus pixel texture."""
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    disc = ((xx ** 2 + yy ** 2) < 0.7).float()
    return (disc * (0.5 + 0.2 * torch.rand(n, 1, side, side, generator=gen))).clamp(0, 1)


def test_local_spectrum_term_is_zero_for_copies_and_penalises_blur_more_than_its_pixel_error():
    x = _textured()
    k = torch.tensor([1.0, 2.0, 1.0]) / 4
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"),
                                         (k[:, None] * k[None, :])[None, None])
    shifted = x.roll(1, dims=-1)                   # same detail, misplaced: a larger pixel error than the blur
    d = local_spectrum_distance(blurred, x)
    assert d.shape == (4,) and torch.all(local_spectrum_distance(x, x) == 0)
    assert recon_loss(shifted, x) > recon_loss(blurred, x)
    assert torch.all(local_spectrum_distance(shifted, x) < 0.5 * d)   # phase-free: detail counts, not its place
    plain = recon_nll(blurred, x)[0]
    assert recon_nll(blurred, x, spectral_weight=0.01)[0] == pytest.approx(
        float(plain + 0.01 * 32 * 32 * d.mean()), rel=1e-5)


def test_local_spectrum_term_has_gradients_and_works_below_the_patch_size():
    x = _textured(side=8)                                          # smaller than SPECTRUM_PATCH: one patch
    recon = (0.5 * x + 0.1).requires_grad_(True)                   # textured: the patches' amplitudes are not 0
    local_spectrum_distance(recon, x).sum().backward()
    own = recon.grad.clone()
    assert bool(torch.isfinite(own).all()) and own.abs().sum() > 0

    def grad(weight: float) -> torch.Tensor:
        r = recon.detach().clone().requires_grad_(True)
        vq_vae_loss(VQOutput(r, torch.tensor(0.0), torch.zeros(4, 1, 1, dtype=torch.long), torch.tensor(1.0)), x,
                    spectral_weight=weight).total.backward()
        return r.grad

    torch.testing.assert_close(grad(0.1) - grad(0.0), 0.1 * 64 * own / 4)   # weight x H*W x d/dr, batch mean


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="recon"):
        recon_loss(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 32, 32))


def test_vq_vae_loss_adds_commitment():
    x = torch.zeros(2, 1, 16, 16)
    out = VQOutput(torch.full_like(x, 0.5), torch.tensor(3.0), torch.zeros(2, 1, 1, dtype=torch.long), torch.tensor(1.0))
    t = vq_vae_loss(out, x)
    assert t.total == pytest.approx(64.0 + 3.0) and t.vq == pytest.approx(3.0) and t.kl == 0
    assert t.kl_per_dim.numel() == 0


def test_active_units_counts_dims_that_vary_over_data():
    g = torch.Generator().manual_seed(0)
    mu = torch.cat([torch.randn(200, 3, generator=g), torch.full((200, 2), 0.7) + 0.01 * torch.randn(200, 2, generator=g)], 1)
    assert active_units(mu) == 3
    assert active_units(mu.reshape(200, 5, 1, 1)) == 3
    with pytest.raises(ValueError, match="N >= 2"):
        active_units(torch.zeros(1, 5))


@pytest.mark.parametrize("family", ["vae", "vqvae"])
def test_tiny_overfit_reduces_reconstruction_loss(make_cfg, make_images, family):
    model = build_model(make_cfg(family=family, image_size=32, blocks=3, channels=(8, 16, 16), latent_dim=16))
    x = make_images(8, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    recons = []
    for _ in range(20):
        out = model(x)
        terms = vae_loss(out, x) if family == "vae" else vq_vae_loss(out, x)
        assert terms.total.isfinite()
        opt.zero_grad()
        terms.total.backward()
        opt.step()
        recons.append(terms.recon.item())
    assert recons[-1] < 0.5 * recons[0], recons


@pytest.mark.parametrize("size", [16, 32, 64])
def test_separable_ssim_equals_torchmetrics_in_value_and_gradient(size):
    g = torch.Generator().manual_seed(size)
    x = torch.rand(6, 1, size, size, generator=g)
    recon = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    recon[0] = x[0]                                                           # one perfect pair: SSIM 1
    a, b = recon.clone().requires_grad_(), recon.clone().requires_grad_()
    fast = gaussian_ssim(a, x)
    reference = structural_similarity_index_measure(b, x, data_range=1.0, reduction="none")
    assert torch.allclose(fast, reference, atol=1e-5) and float(fast[0]) == pytest.approx(1.0, abs=1e-5)
    fast.sum().backward()
    reference.sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("size,betas", [(32, (0.3, 0.7)), (64, (0.1, 0.5, 0.4)), (128, (0.05, 0.3, 0.35, 0.3))])
def test_separable_ms_ssim_equals_torchmetrics(size, betas):
    g = torch.Generator().manual_seed(size)
    x = torch.rand(8, 1, size, size, generator=g)
    other = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    other[0] = x[0]                                                           # identical: 1
    other[1] = torch.rand(x[1].shape, generator=g)                            # unrelated noise: near 0
    other[2] = 1 - x[2]                                                       # anti-correlated: clipped to 0
    fast = gaussian_ms_ssim(other, x, betas)
    reference = multiscale_structural_similarity_index_measure(other, x, data_range=1.0, betas=betas,
                                                               normalize="relu", reduction="none")
    assert torch.allclose(fast, reference, atol=1e-5), (fast, reference)
    assert float(fast[0]) == pytest.approx(1.0, abs=1e-5) and float(fast[2]) < 0.05


def test_separable_ms_ssim_refuses_images_too_small_for_its_scales():
    with pytest.raises(ValueError, match="scales need images larger than 40 px"):
        gaussian_ms_ssim(torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32), (0.3, 0.3, 0.4))


def test_separable_ssim_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="must both be"):
        gaussian_ssim(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 8))
