"""hf_power / hf_ratio: real vs real near 1, soft below, noisy above; invariances; errors that name the input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from metrics_fakes import phantom

from mrigen.metrics.recon import recon_metrics
from mrigen.metrics.spectrum import hf_power, hf_ratio


def _slices(first: int, n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """`(n, 1, size, size)` phantom slices of subjects first.. with fine texture (what a sharp slice shows)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([phantom(first + i, i % 10, size, rng) for i in range(n)]))[:, None]


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0]) / 4
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None, :])[None, None])


@pytest.fixture(scope="module")
def real() -> tuple[torch.Tensor, torch.Tensor]:
    return _slices(0, 40, seed=0), _slices(100, 40, seed=1)      # two sets of other subjects


def test_real_slices_of_other_subjects_score_near_one(real) -> None:
    reference, other = real
    assert hf_ratio(reference, reference) == pytest.approx(1.0)
    assert 0.8 < hf_ratio(other, reference) < 1.25


def test_soft_slices_score_below_and_noisy_slices_above(real) -> None:
    reference, other = real
    gen = torch.Generator().manual_seed(0)
    assert hf_ratio(_blur(other), reference) < 0.5
    noisy = (other + 0.05 * torch.randn(other.shape, generator=gen)).clamp(0, 1)
    assert hf_ratio(noisy, reference) > 1.4
    head = other > 0.05
    mean = (other * head).sum((-2, -1), keepdim=True) / head.sum((-2, -1), keepdim=True)
    washed = torch.where(head, mean + 0.5 * (other - mean), other)       # half the contrast inside the head
    assert hf_ratio(washed, reference) == pytest.approx(0.25 * hf_ratio(other, reference), rel=0.05)  # ~contrast^2


def test_the_head_outline_is_not_counted(real) -> None:
    """A sharp skull edge around a soft interior is still soft: the window stays inside the head."""
    _, other = real
    head = (other > 0.05).float()
    flat = head * (other * head).sum((-2, -1), keepdim=True) / head.sum((-2, -1), keepdim=True)
    assert hf_ratio(flat, other) < 0.05


def test_a_head_that_fills_the_frame_adds_no_wrap_around_edge(real) -> None:
    """The FFT treats the image as periodic: a window reaching the frame edge would see a smooth ramp's two ends
    meet as a sharp step."""
    reference, _ = real
    ramp = torch.linspace(0.3, 0.9, 64)[None, None, None, :].expand(4, 1, 64, 64).clone()
    assert hf_power(ramp) < 1e-3 * hf_power(reference)


def test_flip_and_batching_do_not_change_it(real) -> None:
    reference, _ = real
    assert hf_power(reference.flip(-1)) == pytest.approx(hf_power(reference), rel=1e-4)
    assert hf_power(reference, batch_size=7) == pytest.approx(hf_power(reference), rel=1e-5)


def test_blank_images_have_no_power_and_cannot_be_a_reference(real) -> None:
    reference, _ = real
    blank = torch.zeros(4, 1, 64, 64)
    assert hf_power(blank) == 0.0 and hf_ratio(blank, reference) == 0.0
    with pytest.raises(ValueError, match="reference slices have no high-frequency power"):
        hf_ratio(reference, blank)


@pytest.mark.parametrize("bad, match", [
    (torch.rand(4, 64, 64), "square"),
    (torch.rand(4, 1, 64, 32), "square"),
    (torch.rand(0, 1, 64, 64), "non-empty"),
    (torch.rand(4, 1, 4, 4), "too small"),
    (torch.full((4, 1, 16, 16), float("nan")), "NaN"),
])
def test_invalid_images_are_refused(bad: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hf_power(bad)


def test_sides_must_match(real) -> None:
    reference, _ = real
    with pytest.raises(ValueError, match="image sides differ"):
        hf_ratio(_slices(0, 4, size=32), reference)


class _Smoother(torch.nn.Module):
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return _blur(x)


def test_recon_metrics_reports_a_soft_decoder(real) -> None:
    reference, _ = real
    out = recon_metrics(_Smoother(), reference, batch_size=16, spectrum=True)
    assert out["recon_hf_ratio"] < 0.5 and out["ssim"] > 0.5
    assert "recon_hf_ratio" not in recon_metrics(_Smoother(), reference)
