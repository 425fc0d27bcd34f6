"""Invariants behind sample and reconstruction quality: sampling noise, prior sampling, BatchNorm mean path,
decoder calibration (sigma-VAE), the fitted latent prior, the patch discriminator, residual blocks and the latent-grid
setting."""

from __future__ import annotations

import math

import pytest
import torch

from mrigen.models import CodePrior, ModelConfig, build_model, load_model, save_model
from mrigen.models.latent_prior import (MIN_PER_COMPONENT, MIN_SUBJECTS_PER_COMPONENT, SHRINKAGE, GaussianLatentPrior,
                                        kmeans, pooled_kmeans)
from mrigen.models.adversarial import adaptive_weight, PatchDiscriminator, discriminator_loss, generator_loss
from mrigen.models.losses import recon_nll, vae_loss
from mrigen.models.prior import gumbel_noise



def test_gumbel_noise_is_finite_and_standard():
    edge = torch.tensor([0.0, 1e-30, 1e-7, 0.5, 1.0 - 1e-7, 1.0])
    assert torch.isfinite(gumbel_noise(edge)).all()
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    g = gumbel_noise(u)
    assert abs(float(g.mean()) - 0.5772) < 0.02                          # Euler-Mascheroni: the Gumbel mean
    assert abs(float(g.var()) - math.pi ** 2 / 6) < 0.05


def _structured_grids(n: int, side: int, k: int, seed: int = 0) -> torch.Tensor:
    """Code grids with learnable structure and entropy: a per-grid offset plus a fixed position pattern plus a
    random 0/1 at each position, mod k (about 2**16 * 16 possible grids)."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randint(0, k, (n, 1, 1), generator=g)
    pattern = torch.arange(side * side).view(1, side, side) % 3
    bits = torch.randint(0, 2, (n, side, side), generator=g)
    return (offset + pattern + bits) % k


@pytest.fixture(scope="module")
def trained_prior() -> CodePrior:
    torch.manual_seed(0)
    prior = CodePrior(num_codes=16, max_positions=16, channels=32, layers=2)
    grids = _structured_grids(128, 4, 16)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(150):
        loss = prior.loss(grids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return prior.eval()


def test_prior_samples_are_distinct_and_use_many_codes(trained_prior):
    n = 32
    grids = trained_prior.sample(n, 4, 4, generator=torch.Generator().manual_seed(1))
    distinct = {tuple(g.flatten().tolist()) for g in grids}
    assert len(distinct) >= n - 1
    codes_per_position = [len(set(grids[:, i, j].tolist())) for i in range(4) for j in range(4)]
    assert sum(codes_per_position) / 16 >= 6                             # the offset is uniform over 16 codes


def test_prior_sampling_is_seeded_and_top_k_1_is_greedy(trained_prior):
    a = trained_prior.sample(8, 4, 4, generator=torch.Generator().manual_seed(3))
    b = trained_prior.sample(8, 4, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    greedy = trained_prior.sample(8, 4, 4, generator=torch.Generator().manual_seed(4), top_k=1)
    assert (greedy == greedy[0]).all()                                   # top-1 ignores the noise
    hot = trained_prior.sample(64, 4, 4, generator=torch.Generator().manual_seed(5), temperature=5.0)
    cold = trained_prior.sample(64, 4, 4, generator=torch.Generator().manual_seed(5), temperature=0.2)
    def spread(x):
        return sum(len(set(x[:, i, j].tolist())) for i in range(4) for j in range(4))
    assert spread(hot) > spread(cold)


@pytest.mark.parametrize("kwargs,match", [({"temperature": 0.0}, "temperature"), ({"top_k": -1}, "top_k")])
def test_prior_sampling_options_are_checked(trained_prior, kwargs, match):
    with pytest.raises(ValueError, match=match):
        trained_prior.sample(2, 4, 4, **kwargs)


def _first_decoder_bn_input_stats(model, x) -> tuple[float, float]:
    """Mean and variance of the first decoder BatchNorm's input after that layer's running normalisation."""
    bn = model._decoder_batchnorms()[0]
    seen = {}
    handle = bn.register_forward_hook(lambda m, inp, out: seen.setdefault("out", out.detach()))
    try:
        model.reconstruct(x)
    finally:
        handle.remove()
    out = seen["out"].detach()
    # undo the affine part: (out - bias) / weight is the normalised input
    z = (out - bn.bias.detach().view(1, -1, 1, 1)) / bn.weight.detach().view(1, -1, 1, 1)
    return float(z.mean()), float(z.transpose(0, 1).flatten(1).var(dim=1).mean())


def test_vae_reconstruction_uses_mean_path_batchnorm_statistics(make_images, make_cfg):
    torch.manual_seed(0)
    model = build_model(make_cfg(image_size=32, blocks=3, norm="batch", latent="dense"))
    x = make_images(64, 32)
    model.train()
    with torch.no_grad():
        for _ in range(30):                       # running statistics of the sampled-z path, as training leaves them
            model(x)
    _, var_before = _first_decoder_bn_input_stats(model, x)
    model.calibrate_reconstruction(x)
    mean_after, var_after = _first_decoder_bn_input_stats(model, x)
    assert abs(mean_after) < 0.05 and abs(var_after - 1.0) < 0.05      # normalised as the layer intends
    assert abs(var_before - 1.0) > 2 * abs(var_after - 1.0)             # the sampled-z statistics were off
    assert model.training                                               # calibration restores the mode


def test_mean_path_statistics_survive_save_and_load(tmp_path, make_images, make_cfg):
    torch.manual_seed(0)
    model = build_model(make_cfg(image_size=32, blocks=3, norm="batch", latent="dense"))
    x = make_images(16, 32)
    with torch.no_grad():
        model.train()
        model(x)
    model.calibrate_reconstruction(x)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert torch.equal(model.reconstruct(x), again.reconstruct(x))
    assert torch.equal(model.sample(4, torch.Generator().manual_seed(0)),
                       again.sample(4, torch.Generator().manual_seed(0)))


def test_group_norm_vae_needs_no_calibration(make_images, make_cfg):
    model = build_model(make_cfg(image_size=32, blocks=3, norm="group", latent="spatial"))
    x = make_images(8, 32)
    before = model.reconstruct(x)
    model.calibrate_reconstruction(x)
    assert not bool(model.mean_path_calibrated) and torch.equal(before, model.reconstruct(x))


def _posterior_means(model, x):
    with torch.no_grad():
        model.eval()
        return model.encode(x)[0].flatten(1)


@pytest.mark.parametrize("norm,latent", [("group", "spatial"), ("batch", "dense")])
def test_fitted_latent_prior_draws_with_the_posterior_means_moments(make_images, make_cfg, norm, latent):
    torch.manual_seed(0)
    model = build_model(make_cfg(image_size=32, blocks=3, norm=norm, latent=latent, latent_prior="fitted",
                                 latent_prior_components=1))
    x = make_images(200, 32) + 0.05 * torch.rand(200, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    model.fit_latent_prior(x, batch_size=64)
    mu = _posterior_means(model, x)
    z = model.latent_prior.draw(50_000, torch.Generator().manual_seed(2))
    assert z.shape == (50_000, mu.shape[1])
    cov = torch.cov(mu.T)
    shrunk = (1 - SHRINKAGE) * cov + SHRINKAGE * torch.diag(torch.diag(cov))
    scale = float(mu.std(0).mean())
    assert float((z.mean(0) - mu.mean(0)).abs().max()) < 0.05 * scale
    assert float((torch.cov(z.T) - shrunk).abs().max()) < 0.05 * float(cov.abs().max())
    assert model.sample(3, torch.Generator().manual_seed(0)).shape == (3, 1, 32, 32)


def test_fitted_prior_keeps_correlations_that_a_standard_normal_loses():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(500, 1, generator=g)
    latents = torch.cat([base, base + 0.1 * torch.randn(500, 1, generator=g)], dim=1) * 3 + 5  # corr ~0.995
    prior = GaussianLatentPrior(2)
    prior.fit(latents)
    z = prior.draw(20_000, torch.Generator().manual_seed(1))
    expected = (1 - SHRINKAGE) * float(torch.corrcoef(latents.T)[0, 1])      # shrinkage scales the covariance
    assert abs(float(torch.corrcoef(z.T)[0, 1]) - expected) < 0.02 and expected > 0.8
    assert torch.allclose(z.mean(0), latents.mean(0), atol=0.1)
    assert torch.allclose(z.std(0), latents.std(0), rtol=0.05)


def test_mixture_prior_finds_the_clusters_and_their_shares():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    counts = [300, 200, 100]
    latents = torch.cat([c + 0.5 * torch.randn(n, 3, generator=g) for c, n in zip(centres, counts)])
    prior = GaussianLatentPrior(3, components=3)
    assert prior.fit(latents) == 3
    z = prior.draw(30_000, torch.Generator().manual_seed(1))
    nearest = torch.cdist(z, centres).argmin(1)
    shares = torch.bincount(nearest, minlength=3).float() / len(z)
    assert torch.allclose(shares, torch.tensor(counts) / 600.0, atol=0.02)
    for k in range(3):                                     # within-cluster spread is the pooled one, 0.5
        assert torch.allclose((z[nearest == k] - centres[k]).std(0), torch.full((3,), 0.5), atol=0.05)
    small = torch.cat([latents[:60], latents[300:360]])          # 120 slices of two clusters: at most 2 components
    assert GaussianLatentPrior(3, components=3).fit(small) == 2


def test_kmeans_stopping_at_a_fixed_point_gives_what_every_iteration_gives(monkeypatch):
    """The early stop is exact: the same centres and assignment as Lloyd's iterations run to the end, in fewer
    distance computations."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([c + torch.randn(200, 8, generator=g, dtype=torch.float64) for c in torch.randn(12, 8, generator=g,
                                                                                             dtype=torch.float64) * 4])
    k, iterations = 10, 30

    def full_lloyd():                                       # the plain loop, every iteration
        centres = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(3))[:k]].clone()
        for _ in range(iterations):
            assign = torch.cdist(x, centres).argmin(dim=1)
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).to(x.dtype)
            filled = counts > 0
            centres[filled] = sums[filled] / counts[filled, None]
        return centres, torch.cdist(x, centres).argmin(dim=1)

    calls = []
    cdist = torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda *a, **kw: calls.append(1) or cdist(*a, **kw))
    centres, assign = kmeans(x, k, iterations=iterations, seed=3)
    assert len(calls) < iterations                          # it did stop early
    monkeypatch.setattr(torch, "cdist", cdist)
    ref_centres, ref_assign = full_lloyd()
    assert torch.equal(assign, ref_assign)
    assert torch.equal(centres, ref_centres)


def test_every_mixture_component_pools_enough_slices_and_subjects():
    """A tight cluster of one subject's slices gets no component of its own: its draws would be that subject."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])
    counts = [300, 200, MIN_PER_COMPONENT - 10]                 # the third cluster is too small on its own
    latents = torch.cat([c + 0.5 * torch.randn(n, 2, generator=g) for c, n in zip(centres, counts)])
    subjects = torch.arange(len(latents)) % 20                  # 20 subjects spread over every cluster
    prior = GaussianLatentPrior(2, components=3)
    assert prior.fit(latents, groups=subjects) == 2
    assert float(prior.weights.min()) == 0.0 and int((prior.weights > 0).sum()) == 2
    assert float(prior.weights[prior.weights > 0].min()) * len(latents) >= MIN_PER_COMPONENT
    # a cluster big enough but of one subject: a component of its own only when subjects are not given
    one = torch.cat([latents[:500], torch.tensor([0.0, 10.0]) + 0.5 * torch.randn(120, 2, generator=g)])
    subjects = torch.cat([torch.arange(500) % 20, torch.full((120,), 99)])
    assert GaussianLatentPrior(2, components=3).fit(one) == 3
    centres_fit, assign = pooled_kmeans(one.double(), 3, groups=subjects)
    assert centres_fit.shape[0] == 2
    for k in range(2):
        assert len(torch.unique(subjects[assign == k])) >= MIN_SUBJECTS_PER_COMPONENT
        assert int((assign == k).sum()) >= MIN_PER_COMPONENT
    assert GaussianLatentPrior(2, components=3).fit(one, groups=subjects) == 2
    with pytest.raises(ValueError, match="groups must be"):
        GaussianLatentPrior(2, components=3).fit(one, groups=subjects[:10])


def test_unfitted_latent_prior_refuses_to_sample(make_cfg):
    model = build_model(make_cfg(image_size=32, blocks=3, norm="group", latent="spatial", latent_prior="fitted"))
    with pytest.raises(RuntimeError, match="has not been fitted"):
        model.sample(2)


def test_fitted_latent_prior_survives_save_and_load(tmp_path, make_images, make_cfg):
    model = build_model(make_cfg(image_size=32, blocks=3, norm="group", latent="spatial", latent_prior="fitted"))
    model.fit_latent_prior(make_images(40, 32))
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert bool(again.latent_prior.fitted)
    assert torch.equal(model.sample(4, torch.Generator().manual_seed(0)),
                       again.sample(4, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("latents,match", [(torch.zeros(1, 2), "N >= 2"), (torch.zeros(5, 3), "N >= 2"),
                                           (torch.full((5, 2), float("nan")), "non-finite")])
def test_latent_prior_fit_refuses_bad_latents(latents, match):
    with pytest.raises(ValueError, match=match):
        GaussianLatentPrior(2).fit(latents)


def test_latent_prior_is_a_vae_option():
    with pytest.raises(ValueError, match="latent_prior"):
        ModelConfig(family="vqvae", latent="spatial", latent_prior="fitted")
    with pytest.raises(ValueError, match="latent_prior"):
        ModelConfig(latent_prior="flow")
    with pytest.raises(ValueError, match="latent_prior_components"):
        ModelConfig(latent_prior="fitted", latent_prior_components=0)


def test_optimal_sigma_weights_pixels_by_the_batch_error(make_images):
    x = make_images(4, 16)
    recon = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    fixed, w_fixed = recon_nll(recon, x)
    assert float(w_fixed) == 1.0 and torch.isclose(fixed, (recon - x).square().sum(dim=(1, 2, 3)).mean())
    _, w_opt = recon_nll(recon, x, sigma="optimal")
    mse = float((recon - x).square().mean())
    assert float(w_opt) == pytest.approx(1 / (2 * mse), rel=1e-3)
    _, w_l1 = recon_nll(recon, x, kind="l1", sigma="optimal")
    assert float(w_l1) == pytest.approx(1 / float((recon - x).abs().mean()), rel=1e-3)


def test_learned_sigma_moves_towards_the_error_scale(make_images):
    x = make_images(4, 16)
    recon = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    log_sigma = torch.zeros((), requires_grad=True)                     # sigma = 1, far above the 0.05 error
    recon_nll(recon, x, sigma="learned", log_sigma=log_sigma)[0].backward()
    assert float(log_sigma.grad) > 0                                    # descent lowers sigma


def test_sigma_modes_are_checked(make_images):
    x = make_images(2, 16)
    with pytest.raises(ValueError, match="sigma"):
        recon_nll(x, x, sigma="adaptive")
    with pytest.raises(ValueError, match="log_sigma"):
        recon_nll(x, x, sigma="learned")


def test_optimal_sigma_vae_loss_is_finite_at_a_perfect_reconstruction(make_images, make_cfg):
    model = build_model(make_cfg(image_size=16, latent="dense"))
    x = make_images(2, 16)
    out = model(x)
    perfect = out._replace(recon=x.clone())
    terms = vae_loss(perfect, x, sigma="optimal")
    assert torch.isfinite(terms.total) and torch.isfinite(terms.pixel_weight)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_patch_discriminator_scores_patches(size):
    disc = PatchDiscriminator(size, channels=8)
    logits = disc(torch.rand(3, 1, size, size))
    assert logits.shape[:2] == (3, 1) and logits.shape[-1] >= 2 and logits.shape[-1] < size


def test_adversarial_losses_at_zero_logits():
    zero = torch.zeros(2, 1, 4, 4)
    assert float(discriminator_loss(zero, zero, "hinge")) == pytest.approx(2.0)
    assert float(discriminator_loss(zero, zero, "lsgan")) == pytest.approx(1.0)
    assert float(generator_loss(zero, "hinge")) == 0.0 and float(generator_loss(zero, "lsgan")) == 1.0
    with pytest.raises(ValueError, match="adv_loss"):
        generator_loss(zero, "wgan")


def test_adaptive_weight_balances_the_gradients_whatever_the_reconstruction_scale():
    """lambda * adversarial pulls on the last layer as hard as the reconstruction does, and scales with it: the
    fixed weight it replaced let a sigma-VAE's discriminator overrule a 1000x smaller-scaled reconstruction."""
    torch.manual_seed(0)
    last = torch.nn.Conv2d(4, 1, 3, padding=1)
    disc = PatchDiscriminator(16, channels=8)
    h, x = torch.randn(2, 4, 16, 16), torch.rand(2, 1, 16, 16)

    def losses(scale):
        recon = torch.sigmoid(last(h))
        return scale * (recon - x).square().sum(), generator_loss(disc(recon))

    rec, adv = losses(1.0)
    lam = adaptive_weight(rec, adv, last.weight)
    g_rec, = torch.autograd.grad(rec, last.weight, retain_graph=True)
    g_adv, = torch.autograd.grad(lam * adv, last.weight)
    assert not lam.requires_grad and float(g_adv.norm()) == pytest.approx(float(g_rec.norm()), rel=1e-3)
    rec_big, adv_again = losses(1000.0)
    assert float(adaptive_weight(rec_big, adv_again, last.weight)) == pytest.approx(1000 * float(lam), rel=1e-3)
    rec_huge, adv_huge = losses(1e9)
    assert float(adaptive_weight(rec_huge, adv_huge, last.weight, max_weight=50.0)) == 50.0


def test_grid_sets_the_number_of_blocks_for_any_image_size():
    assert ModelConfig(family="vqvae", latent="spatial", image_size=64, grid=16).blocks == 2
    assert ModelConfig(family="vqvae", latent="spatial", image_size=128, grid=16).blocks == 3
    assert ModelConfig(family="vqvae", latent="spatial", image_size=128, grid=16).grid_size == 16


@pytest.mark.parametrize("field,value", [("grid", 12), ("grid", 64), ("res_blocks", -1), ("sample_top_k", -2),
                                         ("sample_temperature", 0.0)])
def test_quality_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(image_size=64, **{field: value})


@pytest.mark.parametrize("family", ["vae", "vqvae"])
def test_residual_blocks_keep_shapes_and_train(family, make_images, make_cfg):
    cfg = make_cfg(family=family, image_size=32, blocks=2, res_blocks=2, norm="group",
                      **({"latent": "spatial"} if family == "vae" else {}))
    model = build_model(cfg)
    x = make_images(4, 32)
    out = model(x)
    assert out.recon.shape == x.shape
    plain = build_model(make_cfg(family=family, image_size=32, blocks=2, norm="group",
                                    **({"latent": "spatial"} if family == "vae" else {})))
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in plain.parameters())


def test_fitted_prior_refuses_a_latent_too_large_for_its_covariance():
    # 1024 channels on a 4x4 grid = 16,384 entries: a 2 GiB covariance (a test once spent 40 s factorising it).
    with pytest.raises(ValueError, match=r"16384 entries \(1024 x 4x4: a 2.0 GiB .*at most 8192; lower latent_dim"):
        ModelConfig(image_size=32, blocks=3, channels=(8, 16, 32), latent="spatial", latent_dim=1024,
                    latent_prior="fitted")
    with pytest.raises(ValueError, match="latent_dim=9000 entries: at most 8192"):
        ModelConfig(latent="dense", latent_dim=9000, latent_prior="fitted")
    assert ModelConfig(image_size=32, blocks=3, channels=(8, 16, 32), latent="spatial", latent_dim=1024).latent_entries \
        == 16384                                                    # N(0, I) sampling has no covariance to fit
    assert ModelConfig(image_size=128, grid=8, latent="spatial", latent_dim=16, latent_prior="fitted").latent_entries \
        == 1024
