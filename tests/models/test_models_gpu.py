"""The models on CUDA: bf16 autocast + channels_last training steps, fp32 codebook, sampling, save / load.

Marked `gpu`: skipped where CUDA is absent (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from mrigen.models import build_model, load_model, save_model, vae_loss, vq_vae_loss

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["vae", "vqvae"])
def test_bf16_channels_last_training_steps_on_cuda(tmp_path, make_cfg, make_images, family):
    cfg = make_cfg(family=family, image_size=64, blocks=4, channels=(16, 32, 64, 128), codebook_size=32)
    model = build_model(cfg).cuda().to(memory_format=torch.channels_last)
    x = make_images(32, 64).cuda().contiguous(memory_format=torch.channels_last)
    params = list(model.autoencoder_parameters()) if family == "vqvae" else list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        terms = (vae_loss(out, x, ssim_weight=0.1, spectral_weight=0.01) if family == "vae"
                 else vq_vae_loss(out, x, ssim_weight=0.1, spectral_weight=0.01))
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        opt.step()
        losses.append(terms.recon.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    if family == "vqvae":
        assert model.quantizer.embed.dtype == torch.float32 and model.quantizer.embed.is_cuda
        assert 1.0 <= out.perplexity.item() <= cfg.codebook_size
        idx = model.encode_indices(x)
        opt = torch.optim.Adam(model.prior.parameters(), lr=1e-3)
        for _ in range(5):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.prior.loss(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.mark_prior_trained()
    model.eval()
    for gen in (None, torch.Generator().manual_seed(0), torch.Generator("cuda").manual_seed(0)):
        s = model.sample(4, generator=gen)
        assert s.shape == (4, 1, 64, 64) and s.is_cuda and 0 <= s.min() and s.max() <= 1
    expected = model.reconstruct(x)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path, device="cuda")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name  # bit-identical weights, buffers, codebook and prior flag
    # same memory layout as the original, so cuDNN picks comparable kernels (TF32 may differ across layouts)
    loaded = loaded.to(memory_format=torch.channels_last)
    torch.testing.assert_close(loaded.reconstruct(x), expected)
