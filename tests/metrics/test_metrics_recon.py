"""Reconstruction metrics: SSIM / PSNR / MS-SSIM sanity and the scale table."""

from __future__ import annotations

import pytest
import torch
from metrics_fakes import MemoryModel

from mrigen.metrics import image_metrics, ms_ssim_betas, ms_ssim_per_image, psnr_per_image, recon_metrics, \
    ssim_per_image
from mrigen.metrics.recon import PSNR_CAP_DB


def _images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(n, 1, size, size, generator=g), 5, 1, 2)
    return smooth.clamp(0, 1)


def test_identical_images_give_ssim_one_and_capped_psnr() -> None:
    x = _images()
    assert torch.allclose(ssim_per_image(x, x), torch.ones(6), atol=1e-5)
    assert torch.allclose(ms_ssim_per_image(x, x), torch.ones(6), atol=1e-5)
    psnr = psnr_per_image(x, x)
    assert torch.isfinite(psnr).all() and torch.equal(psnr, torch.full((6,), PSNR_CAP_DB))


def test_noise_lowers_ssim_and_psnr_monotonically() -> None:
    x = _images()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    sigmas = (0.0, 0.01, 0.03, 0.1, 0.3)
    ssim = [float(ssim_per_image((x + s * noise).clamp(0, 1), x).mean()) for s in sigmas]
    psnr = [float(psnr_per_image((x + s * noise).clamp(0, 1), x).mean()) for s in sigmas]
    msssim = [float(ms_ssim_per_image((x + s * noise).clamp(0, 1), x).mean()) for s in sigmas]
    for series in (ssim, psnr, msssim):
        assert all(a > b for a, b in zip(series, series[1:])), series


@pytest.mark.parametrize(("size", "scales"), [(16, None), (21, None), (22, 2), (32, 2), (64, 3), (128, 4),
                                              (256, 5)])
def test_ms_ssim_scale_table(size: int, scales: int | None) -> None:
    betas = ms_ssim_betas(size)
    if scales is None:
        assert betas is None
        return
    assert len(betas) == scales and sum(betas) == pytest.approx(1.0) and all(b > 0 for b in betas)
    x = _images(2, size)
    inverted = 1.0 - x                                   # negative structure terms: clipped, never NaN
    values = ms_ssim_per_image(inverted, x)
    assert torch.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()


def test_image_metrics_omit_ms_ssim_when_too_small() -> None:
    x = _images(2, 16)
    assert set(image_metrics(x, x, ms_ssim=True)) == {"ssim", "psnr"}
    assert set(image_metrics(_images(2, 32), _images(2, 32), ms_ssim=True)) == {"ssim", "psnr", "ms_ssim"}
    with pytest.raises(ValueError, match="too small for MS-SSIM"):
        ms_ssim_per_image(x, x)


def test_bad_inputs_are_refused() -> None:
    x = _images(2)
    with pytest.raises(ValueError, match="differ in shape"):
        ssim_per_image(x, x[:1])
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        psnr_per_image(x[:, 0], x[:, 0])
    with pytest.raises(ValueError, match="NaN"):
        ssim_per_image(torch.full_like(x, float("nan")), x)


def test_recon_metrics_restores_mode_and_is_exact_for_identity() -> None:
    x = _images(5)
    model = MemoryModel(x).train()
    out = recon_metrics(model, x, batch_size=2, ms_ssim=True)
    assert model.training
    assert out["ssim"] == pytest.approx(1.0, abs=1e-5) and out["psnr"] == PSNR_CAP_DB
    assert out["ms_ssim"] == pytest.approx(1.0, abs=1e-5)
    assert set(recon_metrics(model.eval(), x)) == {"ssim", "psnr"} and not model.training
    with pytest.raises(ValueError, match="batch_size"):
        recon_metrics(model, x, batch_size=0)
