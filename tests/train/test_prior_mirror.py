"""`train.prior_mirror`: the second stage also learns every training slice's left-right mirror image (twice the
data for the stage that overfits first); the held-out images stay as they are."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mrigen.models.latent_flow import FlowLatentPrior
from mrigen.models.prior import CodePrior
from mrigen.train import TrainConfig
from mrigen.train.prior import _mean_nll, encode_posteriors, encode_split, train_latent_flow, train_prior

GRID, CODES = 4, 8


class _Codes(nn.Module):
    """A stand-in VQ-VAE whose "images" (N, 1, 4, 4) hold their own code indices."""

    def __init__(self) -> None:
        super().__init__()
        self.prior = CodePrior(CODES, GRID * GRID, channels=32, layers=2)

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0].long()

    def mark_prior_trained(self) -> None:
        pass


def test_encoders_flip_each_batch_when_asked():
    x = torch.randint(0, CODES, (10, 1, GRID, GRID)).float()
    assert torch.equal(encode_split(_Codes(), x, 3, mirror=True), x.flip(-1)[:, 0].long())
    flow_model = _HalfBright()
    mu, logvar = encode_posteriors(flow_model, x, 4, mirror=True)
    assert torch.equal(mu, x.flip(-1).expand(-1, 2, -1, -1)) and logvar.shape == mu.shape


@pytest.mark.parametrize("mirror", [False, True])
def test_a_code_prior_trained_with_mirrors_knows_the_mirrored_grids(mirror):
    """Four random grids learnt by heart: with `prior_mirror` their mirror images are as likely as the grids
    themselves (both far below log(8) nats per code, knowing nothing); without, the mirrors are unknown grids."""
    train = torch.randint(0, CODES, (4, 1, GRID, GRID), generator=torch.Generator().manual_seed(0)).float()
    torch.manual_seed(0)
    model = _Codes()
    cfg = TrainConfig(prior_steps=400, prior_batch_size=8, prior_lr=3e-3, eval_batch_size=64, seed=0,
                      prior_mirror=mirror, prior_keep_best=False)
    train_prior(model, train, cfg, val_codes_from=train, progress=False)
    own = _mean_nll(model.prior, encode_split(model, train, 64), 64)
    mirrored = _mean_nll(model.prior, encode_split(model, train, 64, mirror=True), 64)
    assert own < 0.3
    if mirror:
        assert mirrored < 0.3
    else:
        assert mirrored > math.log(CODES)


class _HalfBright(nn.Module):
    """A stand-in VAE whose posterior mean is the image itself on both of its 2 channels, with sd ~0.01."""

    def __init__(self, conditions: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.latent_prior = FlowLatentPrior((2, 4, 4), width=16, ode_steps=10, conditions=conditions)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = x.expand(-1, 2, -1, -1)
        return mu, torch.full_like(mu, -9.0)


@pytest.mark.parametrize("mirror", [False, True])
def test_a_flow_trained_with_mirrors_draws_both_orientations(mirror):
    """Every training latent is bright on its left half: the flow draws left-bright latents only; with
    `prior_mirror` it draws right-bright ones as often (their mirrors). Conditioned on slice position, whose
    attributes the mirrors repeat."""
    gen = torch.Generator().manual_seed(0)
    n = 512
    images = 0.2 * torch.randn(n, 1, 4, 4, generator=gen)
    images[..., :2] += 1.5
    attrs = torch.stack([torch.rand(n, generator=gen), torch.zeros(n)], dim=1)
    torch.manual_seed(0)
    model = _HalfBright(conditions=("slice_pos", "site"))
    cfg = TrainConfig(prior_steps=400, prior_batch_size=64, prior_lr=3e-3, eval_batch_size=256, seed=0,
                      prior_mirror=mirror, prior_keep_best=False)
    train_latent_flow(model, images, cfg, val_from=images[:64], progress=False, train_attrs=attrs,
                      val_attrs=attrs[:64])
    z = model.latent_prior.draw(400, torch.Generator().manual_seed(1), attrs=attrs[:400])
    left_bright = (z[..., :2].mean(dim=(1, 2, 3)) > z[..., 2:].mean(dim=(1, 2, 3))).float().mean()
    if mirror:
        assert 0.3 < float(left_bright) < 0.7
    else:
        assert float(left_bright) > 0.95


def test_prior_mirror_must_be_a_bool():
    with pytest.raises(ValueError, match="prior_mirror"):
        TrainConfig(prior_mirror="yes")
