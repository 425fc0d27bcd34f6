"""The VAE's flow-matching latent prior (mrigen.models.latent_flow, mrigen.train.prior.train_latent_flow)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mrigen.models import ModelConfig
from mrigen.models.latent_flow import FlowLatentPrior, VelocityNet
from mrigen.train.config import TrainConfig
from mrigen.train.prior import REPORTS, train_latent_flow

SHAPE = (2, 4, 4)


def test_velocity_net_keeps_the_latent_shape_and_starts_at_zero():
    net = VelocityNet(3, width=16)
    v = net(torch.randn(5, 3, 8, 6), torch.rand(5))
    assert v.shape == (5, 3, 8, 6)
    assert float(v.abs().max()) == 0.0                       # zero-initialised output: the flow starts as identity


def test_an_untrained_flow_prior_refuses_to_draw():
    with pytest.raises(RuntimeError, match="has not been trained"):
        FlowLatentPrior(SHAPE, width=8).draw(2)


def test_standardisation_is_the_aggregate_posterior_per_channel():
    prior = FlowLatentPrior(SHAPE, width=8)
    mu = torch.randn(500, *SHAPE) * torch.tensor([2.0, 0.5]).view(1, 2, 1, 1) + torch.tensor([1.0, -3.0]).view(1, 2, 1, 1)
    logvar = torch.full_like(mu, 0.0)                            # posterior variance 1 added to var(mu)
    prior.set_standardisation(mu, logvar)
    assert prior.mean.flatten().tolist() == pytest.approx([1.0, -3.0], abs=0.15)
    assert prior.std.flatten().tolist() == pytest.approx([(4 + 1) ** 0.5, (0.25 + 1) ** 0.5], rel=0.05)


def test_a_wrong_latent_shape_is_named():
    with pytest.raises(ValueError, match=r"mu must be \(N, 2, 4, 4\)"):
        FlowLatentPrior(SHAPE, width=8).loss(torch.zeros(3, 2, 8, 8), torch.zeros(3, 2, 8, 8))
    with pytest.raises(ValueError, match="even latent grid"):
        FlowLatentPrior((2, 3, 3))


class _Encoder(nn.Module):
    """A stand-in VAE whose posterior mean of an image (N, 1, 4, 4) is (x, -x): a latent whose two channels are
    exact negatives at every position, and whose positions share one value per image."""

    def __init__(self) -> None:
        super().__init__()
        self.latent_prior = FlowLatentPrior(SHAPE, width=16, ode_steps=20)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = torch.cat([x, -x], dim=1)
        return mu, torch.full_like(mu, -9.0)                     # posterior sd ~0.01


def _structured_images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    level = 2.0 + 1.5 * torch.randn(n, 1, 1, 1, generator=gen)
    return level + 0.05 * torch.randn(n, 1, 4, 4, generator=gen)


def test_a_trained_flow_draws_the_structure_of_its_training_latents():
    """Channel 1 = -channel 0 and all 16 positions equal, per image: draws from the trained flow keep both
    (independent noise, what the untrained identity flow gives, has correlations ~0)."""
    model = _Encoder()
    cfg = TrainConfig(prior_steps=600, prior_batch_size=64, prior_lr=3e-3, eval_batch_size=256, seed=0)
    torch.manual_seed(0)
    result = train_latent_flow(model, _structured_images(1024, 0), cfg, val_from=_structured_images(256, 1),
                               progress=False)
    assert bool(model.latent_prior.trained)
    assert len(result.train_nll) == 20 and result.train_nll[-1] < 0.5 * result.train_nll[0]
    assert result.val_nll is not None and result.val_nll < 2 * result.train_nll[-1]
    z = model.latent_prior.draw(400, torch.Generator().manual_seed(0))
    assert z.shape == (400, *SHAPE) and torch.isfinite(z).all()
    a, b = z[:, 0].flatten(1), z[:, 1].flatten(1)
    assert float(torch.corrcoef(torch.stack([a[:, 0], b[:, 0]]))[0, 1]) < -0.9       # channels negate each other
    assert float(torch.corrcoef(torch.stack([a[:, 0], a[:, -1]]))[0, 1]) > 0.9       # corners move together
    assert float(a.mean()) == pytest.approx(2.0, abs=0.3) and float(a.mean(1).std()) == pytest.approx(1.5, rel=0.2)


class _TimeSpy(nn.Module):
    """Records the path times t a flow-matching loss feeds its velocity network."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[torch.Tensor] = []
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor, attrs=None) -> torch.Tensor:
        self.times.append(t.detach().clone())
        return x * self.scale


def test_logit_normal_time_puts_the_training_mid_path_and_train_latent_flow_uses_the_config():
    """t ~ U(0, 1) gives half the draws in [0.25, 0.75]; t = sigmoid(N(0, 1)) gives ~73% (P(|N| < logit 0.75 =
    1.0986)), never exactly 0 or 1. `train.flow_time` reaches the loss in training and in the held-out loss."""
    prior = FlowLatentPrior(SHAPE, width=8)
    prior.net = _TimeSpy()
    mu, logvar = torch.randn(4000, *SHAPE), torch.zeros(4000, *SHAPE)
    share = {}
    for time in ("uniform", "logit_normal"):
        prior.net.times.clear()
        prior.loss(mu, logvar, torch.Generator().manual_seed(0), time=time)
        t = prior.net.times[0]
        assert t.shape == (4000,) and bool(((t > 0) & (t < 1)).all())
        share[time] = float(((t > 0.25) & (t < 0.75)).float().mean())
    assert share["uniform"] == pytest.approx(0.5, abs=0.03)
    assert share["logit_normal"] == pytest.approx(0.728, abs=0.03)
    with pytest.raises(ValueError, match="time='beta' is not one of"):
        prior.loss(mu, logvar, time="beta")
    with pytest.raises(ValueError, match="TrainConfig.flow_time='beta' is not one of"):
        TrainConfig(flow_time="beta")

    model = _Encoder()
    model.latent_prior.net = spy = _TimeSpy()
    cfg = TrainConfig(prior_steps=40, prior_batch_size=200, eval_batch_size=256, flow_time="logit_normal")
    train_latent_flow(model, _structured_images(400, 0), cfg, val_from=_structured_images(256, 1), progress=False)
    t = torch.cat(spy.times)                   # 40 training batches + the held-out loss at each of the 20 reports
    assert t.numel() == 40 * 200 + REPORTS * 256
    assert float(((t > 0.25) & (t < 0.75)).float().mean()) == pytest.approx(0.728, abs=0.03)


class _PositionEncoder(nn.Module):
    """A stand-in VAE whose posterior mean is 4 * slice_pos - 2 at every entry (plus noise of sd 0.1): what the
    latent of a slice is, given its position."""

    def __init__(self) -> None:
        super().__init__()
        self.latent_prior = FlowLatentPrior(SHAPE, width=16, ode_steps=20, conditions=("slice_pos", "site"))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = x.expand(-1, 2, -1, -1)
        return mu, torch.full_like(mu, -9.0)


def _positions(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 1, 4, 4), encoded attributes (n, 2): slice_pos uniform, site random and irrelevant)."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, generator=gen)
    images = (4 * pos - 2).reshape(n, 1, 1, 1) + 0.1 * torch.randn(n, 1, 4, 4, generator=gen)
    return images, torch.stack([pos, torch.randint(0, 3, (n,), generator=gen).float()], dim=1)


def test_a_conditional_flow_draws_the_latents_of_the_requested_position():
    """Trained with condition dropout, the flow draws latents at the requested position's level (a broken
    conditioning draws the whole spread, sd 1.15, whatever is asked); with the position unknown it draws the
    whole spread; guidance pushes the draws further from the unconditioned ones (the extrapolation of classifier-free
    guidance) and w = 1 is the unguided sampler exactly."""
    model = _PositionEncoder()
    cfg = TrainConfig(prior_steps=600, prior_batch_size=64, prior_lr=3e-3, eval_batch_size=256, seed=0,
                      condition_dropout=0.2)
    torch.manual_seed(0)
    images, attrs = _positions(1024, 0)
    val_images, val_attrs = _positions(256, 1)
    result = train_latent_flow(model, images, cfg, val_from=val_images, progress=False, train_attrs=attrs,
                               val_attrs=val_attrs)
    assert result.val_nll is not None and result.val_nll < 2 * result.train_nll[-1]
    flow = model.latent_prior

    def draw(pos: float, **kw) -> torch.Tensor:
        asked = torch.tensor([[pos, 1.0]]).repeat(300, 1)
        return flow.draw(300, torch.Generator().manual_seed(2), attrs=asked, **kw).mean(dim=(1, 2, 3))

    low, high = draw(0.1), draw(0.9)
    assert float(low.mean()) == pytest.approx(-1.6, abs=0.3) and float(high.mean()) == pytest.approx(1.6, abs=0.3)
    assert float(low.std()) < 0.5 and float(high.std()) < 0.5
    hidden = flow.draw(300, torch.Generator().manual_seed(2), attrs=torch.tensor([[float("nan"), 1.0]]).repeat(300, 1))
    assert float(hidden.mean(dim=(1, 2, 3)).std()) > 0.8                       # position unknown: any level
    guided = draw(0.1, guidance=2.0, guidance_on=("slice_pos",))
    assert float(guided.mean()) < float(low.mean()) - 0.1                      # away from the unconditioned mean 0
    assert torch.equal(draw(0.5), draw(0.5, guidance=1.0))
    with pytest.raises(ValueError, match="guidance"):
        draw(0.5, guidance=0.5)
    with pytest.raises(ValueError, match="age"):
        draw(0.5, guidance=2.0, guidance_on=("age",))
    with pytest.raises(ValueError, match="unconditional flow"):
        FlowLatentPrior(SHAPE, width=8).net(torch.zeros(1, *SHAPE), torch.zeros(1), attrs)


def test_the_flow_prior_needs_a_spatial_latent_and_conditions_only_itself():
    with pytest.raises(ValueError, match="latent='spatial'"):
        ModelConfig(image_size=32, blocks=3, channels=(8, 16, 32), latent="dense", latent_prior="flow")
    flow = ModelConfig(image_size=32, blocks=3, channels=(8, 16, 32), latent="spatial", latent_prior="flow",
                       conditions=("site",))
    assert not flow.autoencoder_conditioned                    # the flow reads the attributes, not the decoder
    assert ModelConfig(conditions=("site",)).autoencoder_conditioned       # a dense VAE: FiLM
    assert not ModelConfig(family="vqvae", latent="spatial", conditions=("site",)).autoencoder_conditioned
    with pytest.raises(ValueError, match="flow_width"):
        ModelConfig(image_size=32, blocks=3, channels=(8, 16, 32), latent="spatial", latent_prior="flow",
                    flow_width=12)


def test_the_guide_is_the_flow_itself_earlier_in_its_training():
    """`model.flow_guide`: training copies the EMA weights after `flow_guide_at` of its steps into the guide. At
    the last step the guide is the flow exactly; a quarter of the way in it is a different, weaker flow (higher
    flow-matching loss on held-out latents), and without a guide network nothing is copied."""
    images, held_out = _structured_images(1024, 0), _structured_images(256, 1)

    def trained(guide_at: float) -> FlowLatentPrior:
        model = _Encoder()
        model.latent_prior = FlowLatentPrior(SHAPE, width=16, ode_steps=20, guide=True)
        torch.manual_seed(0)
        cfg = TrainConfig(prior_steps=200, prior_batch_size=64, prior_lr=3e-3, eval_batch_size=256,
                          flow_guide_at=guide_at, seed=0)
        train_latent_flow(model, images, cfg, progress=False)
        return model.latent_prior

    last, early = trained(0.999), trained(0.25)              # guide steps 200 (the last) and 50
    for p, q in zip(last.net.parameters(), last.guide.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(early.net.parameters(), last.net.parameters(), strict=True):
        assert torch.equal(p, q)                             # the guide does not change how the flow trains
    assert any(not torch.equal(p, q) for p, q in zip(early.net.parameters(), early.guide.parameters()))
    mu = torch.cat([held_out, -held_out], dim=1)
    logvar = torch.full_like(mu, -9.0)

    def held_out_loss(net: nn.Module) -> float:
        probe = FlowLatentPrior(SHAPE, width=16)
        probe.net, probe.mean, probe.std = net, early.mean, early.std
        return float(probe.loss(mu, logvar, torch.Generator().manual_seed(3)))

    assert held_out_loss(early.guide) > 1.2 * held_out_loss(early.net)
    assert FlowLatentPrior(SHAPE, width=8).guide is None


def test_autoguidance_moves_the_velocity_away_from_the_guide_by_its_weight():
    """draw(autoguidance=w) integrates v_guide + w * (v - v_guide): with a guide that outputs 0 that is w * v
    (checked against a hand-written Heun loop), and with the flow as its own guide it is v whatever w."""
    torch.manual_seed(0)
    prior = FlowLatentPrior(SHAPE, width=8, ode_steps=4, guide=True)
    nn.init.normal_(prior.net.out[-1].weight, std=0.3)       # a flow that moves (the output layer starts at zero)
    prior.trained.fill_(True)                                # the guide keeps its zero output layer: v_guide = 0
    x = torch.randn((5, *SHAPE), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for i in range(4):
            t0 = torch.full((5,), i / 4)
            v0 = 2.5 * prior.net(x, t0)
            v1 = 2.5 * prior.net(x + v0 / 4, t0 + 1 / 4)
            x = x + (v0 + v1) / 8
    drawn = prior.draw(5, torch.Generator().manual_seed(1), autoguidance=2.5)
    assert torch.allclose(drawn, x, atol=1e-5)
    plain = prior.draw(5, torch.Generator().manual_seed(1))
    assert not torch.allclose(plain, drawn, atol=1e-3)
    prior.guide.load_state_dict(prior.net.state_dict())      # the flow as its own guide: v + w * 0
    assert torch.allclose(prior.draw(5, torch.Generator().manual_seed(1), autoguidance=2.5), plain, atol=1e-5)


def test_autoguidance_needs_a_guide_and_a_weight_of_at_least_one():
    prior = FlowLatentPrior(SHAPE, width=8)
    prior.trained.fill_(True)
    with pytest.raises(ValueError, match="needs a guide network"):
        prior.draw(2, autoguidance=1.5)
    guided = FlowLatentPrior(SHAPE, width=8, guide=True)
    guided.trained.fill_(True)
    with pytest.raises(ValueError, match="autoguidance=0.5 must be >= 1"):
        guided.draw(2, autoguidance=0.5)
    spatial = {"image_size": 32, "blocks": 3, "channels": (8, 16, 32), "latent": "spatial"}
    with pytest.raises(ValueError, match="sample_autoguidance=1.5 needs a guide network: set flow_guide=true"):
        ModelConfig(**spatial, latent_prior="flow", sample_autoguidance=1.5)
    with pytest.raises(ValueError, match="flow_guide=True keeps a guide for the flow prior"):
        ModelConfig(**spatial, latent_prior="fitted", flow_guide=True)
    with pytest.raises(ValueError, match="flow_guide='yes' must be true or false"):
        ModelConfig(**spatial, latent_prior="flow", flow_guide="yes")
    with pytest.raises(ValueError, match="sample_autoguidance"):
        ModelConfig(**spatial, latent_prior="flow", flow_guide=True, sample_autoguidance=0.9)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match=rf"TrainConfig.flow_guide_at={bad} must be in \(0, 1\)"):
            TrainConfig(flow_guide_at=bad)


def test_a_guided_flow_vae_keeps_its_guide_through_save_and_load(tmp_path):
    from mrigen.models.io import load_model, save_model
    from mrigen.models.vae import VAE

    cfg = ModelConfig(image_size=32, blocks=3, channels=(8, 16, 32), latent="spatial", latent_dim=4,
                      latent_prior="flow", flow_width=8, flow_guide=True, sample_autoguidance=1.7)
    model = VAE(cfg)
    with torch.no_grad():
        for p in model.latent_prior.guide.parameters():
            p.normal_()
    model.latent_prior.trained.fill_(True)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config.flow_guide and loaded.config.sample_autoguidance == 1.7
    for p, q in zip(model.latent_prior.guide.parameters(), loaded.latent_prior.guide.parameters(), strict=True):
        assert torch.equal(p, q)
    a = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, loaded.sample(3, generator=torch.Generator().manual_seed(0)))


def test_autoguidance_composes_with_classifier_free_guidance_on_a_conditional_flow():
    """v = v_guide + w * (v_cfg - v_guide), the guide seeing the conditioned rows (not the hidden ones classifier-free
    guidance adds): with the flow as its own guide that is classifier-free guidance of weight 1 + w * (g - 1), which
    is how the two stack (bench/RESULTS.md, session 15)."""
    torch.manual_seed(0)
    prior = FlowLatentPrior(SHAPE, width=8, ode_steps=3, conditions=("slice_pos", "site"), guide=True)
    nn.init.normal_(prior.net.out[-1].weight, std=0.3)
    prior.trained.fill_(True)
    attrs = torch.tensor([[0.1, 0.0], [0.9, 2.0], [0.5, float("nan")]])

    def draw(**kw) -> torch.Tensor:
        gen = torch.Generator().manual_seed(2)
        return prior.draw(3, gen, attrs=attrs, guidance=1.5, guidance_on=("slice_pos",), **kw)

    zero_guide = draw(autoguidance=2.0)
    assert zero_guide.shape == (3, *SHAPE) and torch.isfinite(zero_guide).all()
    assert not torch.allclose(zero_guide, draw(), atol=1e-3)
    prior.guide.load_state_dict(prior.net.state_dict())
    stacked = draw(autoguidance=2.0)
    plain_cfg = prior.draw(3, torch.Generator().manual_seed(2), attrs=attrs, guidance=2.0, guidance_on=("slice_pos",))
    assert torch.allclose(stacked, plain_cfg, atol=1e-5)             # 1 + 2 * (1.5 - 1) = 2
    assert not torch.allclose(stacked, draw(), atol=1e-3)
