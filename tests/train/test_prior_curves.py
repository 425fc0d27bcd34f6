"""The second stage's loss curves: `train_prior` and `train_latent_flow` report the held-out loss at every report
point (the figure that shows a prior fitting its training grids rather than their distribution), without changing
what they train; `train()` hands the curves to its hooks (prior_history.json, MLflow `prior_*` metrics)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mrigen.models.latent_flow import FlowLatentPrior
from mrigen.models.prior import CodePrior
from mrigen.train import TrainConfig
from mrigen.train.prior import REPORTS, _flow_loss, _mean_nll, best_report, encode_split, train_latent_flow, train_prior

GRID, CODES = 4, 8


class _Codes(nn.Module):
    """A stand-in VQ-VAE whose "images" (N, 1, 4, 4) hold their own code indices."""

    def __init__(self) -> None:
        super().__init__()
        self.prior = CodePrior(CODES, GRID * GRID, channels=32, layers=2)
        self.prior_marked = False

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0].long()

    def mark_prior_trained(self) -> None:
        self.prior_marked = True


def _grids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, CODES, (n, 1, GRID, GRID), generator=torch.Generator().manual_seed(seed)).float()


def _train_codes(train_x, val_x, steps: int = 300, keep_best: bool = False):
    torch.manual_seed(0)
    model = _Codes()
    cfg = TrainConfig(prior_steps=steps, prior_batch_size=4, prior_lr=3e-3, eval_batch_size=64, seed=0,
                      prior_keep_best=keep_best)
    return model, train_prior(model, train_x, cfg, val_codes_from=val_x, progress=False)


def test_the_held_out_curve_of_a_code_prior_turns_up_when_it_memorises_its_grids():
    """Four random training grids, held-out grids from the same uniform distribution: the prior learns them by
    heart, so its training NLL falls towards 0 while the held-out NLL climbs far past log(8), that of knowing
    nothing."""
    model, result = _train_codes(_grids(4, 0), _grids(64, 1))
    assert model.prior_marked
    assert len(result.steps) == len(result.train_nll) == len(result.val_curve) == REPORTS
    assert result.steps == sorted(result.steps) and result.steps[-1] == 300
    assert result.train_nll[-1] < 0.2 < 1.0 < result.train_nll[0]
    assert result.val_curve[-1] > result.val_curve[0] + 1.0 and result.val_curve[-1] > math.log(CODES) + 1.0
    assert result.val_nll == result.val_curve[-1]               # the final figure is the curve's last point
    assert result.kept_step is None                             # prior_keep_best off: the last weights
    assert result.rows()[-1] == {"step": 300, "train_loss": result.train_nll[-1], "val_loss": result.val_curve[-1]}


def test_keep_best_restores_the_weights_of_the_lowest_held_out_loss():
    """The same memorising prior with `prior_keep_best`: it ends with the weights of its first report (the lowest
    held-out NLL), which score that NLL again; the curve itself is the same as without."""
    val = _grids(64, 1)
    model, result = _train_codes(_grids(4, 0), val, keep_best=True)
    _, plain = _train_codes(_grids(4, 0), val)
    assert model.prior.training is False and model.prior_marked
    assert result.val_curve == plain.val_curve and result.kept_step == result.steps[0] == 15
    assert result.val_nll == min(result.val_curve) == pytest.approx(
        _mean_nll(model.prior, encode_split(model, val, 64), 64), rel=1e-6)


@pytest.mark.parametrize("curve,first,kept", [
    ([3.0, 2.0, 1.0], 0, None),             # still falling: the last weights
    ([3.0, 1.0, 1.005], 0, None),           # up by 0.5%, within the margin: the last weights
    ([3.0, 1.0, 1.2, 1.5], 0, 1),           # up by 50% from report 1: report 1
    ([0.5, 1.0, 1.2, 1.5], 1, 1),           # the lowest report is not eligible (before the guide): the lowest after
    ([0.5, 1.0], 2, None),                  # no eligible report
    ([], 0, None),
])
def test_best_report_keeps_the_lowest_only_beyond_the_margin(curve, first, kept):
    assert best_report(curve, first) == kept


def test_measuring_the_held_out_curve_does_not_change_the_code_prior():
    with_val, _ = _train_codes(_grids(16, 0), _grids(16, 1), steps=60)
    without, result = _train_codes(_grids(16, 0), None, steps=60)
    for p, q in zip(with_val.prior.parameters(), without.prior.parameters(), strict=True):
        assert torch.equal(p, q)
    assert result.val_nll is None and result.val_curve == [] and "val_loss" not in result.rows()[0]


class _Posteriors(nn.Module):
    """A stand-in VAE whose posterior of an image (N, 2, 4, 4) is the image itself, with sd ~0.01."""

    def __init__(self) -> None:
        super().__init__()
        self.latent_prior = FlowLatentPrior((2, 4, 4), width=16, ode_steps=10, guide=True)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.full_like(x, -9.0)


def _latents(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    level = 2.0 + 1.5 * torch.randn(n, 1, 1, 1, generator=gen)
    return torch.cat([level, -level], 1) + 0.05 * torch.randn(n, 2, 4, 4, generator=gen)


def _train_flow(val_x, keep_best: bool = True):
    torch.manual_seed(0)
    model = _Posteriors()
    cfg = TrainConfig(prior_steps=100, prior_batch_size=32, prior_lr=3e-3, eval_batch_size=64, seed=0,
                      flow_guide_at=0.3, prior_keep_best=keep_best)
    return model, train_latent_flow(model, _latents(256, 0), cfg, val_from=val_x, progress=False)


def test_the_flow_reports_its_held_out_loss_with_the_weights_it_samples_with():
    held_out = _latents(64, 1)
    model, result = _train_flow(held_out)
    flow = model.latent_prior
    assert len(result.val_curve) == REPORTS and result.steps[-1] == 100
    assert result.val_curve[-1] < result.val_curve[0]          # the flow learns the distribution
    # the last point is the final (EMA) weights' held-out loss, as the trainer's own loss function gives it
    assert result.val_nll == result.val_curve[-1] == pytest.approx(
        _flow_loss(flow, held_out, torch.full_like(held_out, -9.0), 64, 0))
    unmeasured, plain = _train_flow(None)
    for p, q in zip(flow.parameters(), unmeasured.latent_prior.parameters(), strict=True):
        assert torch.equal(p, q)                                # measuring it changed neither the flow nor its guide
    assert flow.net.training is False and plain.val_curve == [] and result.kept_step is None


def test_a_flow_keeps_its_best_ema_weights_but_none_from_before_its_guide(monkeypatch):
    """With a scripted held-out curve: lowest at the first reports (before the guide is taken at step 30), then
    lowest again at step 45, rising after: the flow keeps step 45's EMA weights (a flow never weaker than its guide),
    its guide is untouched, and the loss it reports is step 45's."""
    import mrigen.train.prior as prior_module

    curve = [0.1] * 5 + [1.0, 2.0, 2.0, 0.5] + [2.0] * 11        # reports at steps 5, 10, ..., 100
    scripted = iter(curve)
    monkeypatch.setattr(prior_module, "_flow_loss", lambda *args, **kw: next(scripted))
    kept_model, kept = _train_flow(_latents(64, 1))
    monkeypatch.undo()
    last_model, last = _train_flow(_latents(64, 1), keep_best=False)
    assert kept.val_curve == curve and kept.kept_step == 45 and kept.val_nll == 0.5
    assert last.kept_step is None
    for p, q in zip(kept_model.latent_prior.guide.parameters(), last_model.latent_prior.guide.parameters(),
                    strict=True):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(kept_model.latent_prior.net.parameters(),
                                                     last_model.latent_prior.net.parameters()))


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_prior_amp_runs_both_priors_training_steps_in_bf16_and_nothing_else(amp):
    """`prior_amp="bf16"`: the training steps of the flow and of the code prior run under bf16 autocast (their
    layers output bf16); their weights, the held-out loss and what they learn stay as in fp32. The flow trains
    with contiguous weights even when the autoencoder's channels_last training converted them."""
    expected = torch.bfloat16 if amp == "bf16" else torch.float32
    seen: list[tuple[bool, torch.dtype]] = []

    def spy(module, inputs, output):
        seen.append((torch.is_grad_enabled(), output.dtype))   # grad on: a training step; off: the held-out loss

    torch.manual_seed(0)
    flow_model = _Posteriors()
    flow_model.latent_prior.to(memory_format=torch.channels_last)     # as the autoencoder's training leaves it
    flow_model.latent_prior.net.inp.register_forward_hook(spy)
    cfg = TrainConfig(prior_steps=100, prior_batch_size=32, prior_lr=3e-3, eval_batch_size=64, seed=0,
                      flow_guide_at=0.3, prior_amp=amp)
    flow_result = train_latent_flow(flow_model, _latents(256, 0), cfg, val_from=_latents(64, 1), progress=False)
    torch.manual_seed(0)
    code_model = _Codes()
    code_model.prior.head.register_forward_hook(spy)
    cfg = TrainConfig(prior_steps=100, prior_batch_size=4, prior_lr=3e-3, eval_batch_size=64, seed=0, prior_amp=amp)
    code_result = train_prior(code_model, _grids(4, 0), cfg, val_codes_from=_grids(64, 1), progress=False)
    assert {dtype for grad, dtype in seen if grad} == {expected}
    assert {dtype for grad, dtype in seen if not grad} == {torch.float32}
    for model in (flow_model.latent_prior, code_model.prior):
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.is_contiguous() for p in flow_model.latent_prior.parameters())  # bf16 is only fast contiguous
    assert flow_result.val_curve[-1] < flow_result.val_curve[0]            # the flow learns in either precision
    assert code_result.train_nll[-1] < 0.5 * code_result.train_nll[0]      # the code prior learns its 4 grids


def test_prior_amp_refuses_a_precision_it_does_not_have():
    with pytest.raises(ValueError, match=r"TrainConfig.prior_amp='fp16' is not one of \('off', 'bf16'\)"):
        TrainConfig(prior_amp="fp16")
