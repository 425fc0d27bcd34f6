"""Vector quantizer and code prior invariants: lookup, EMA, dead-code restart, perplexity, prior training."""

from __future__ import annotations

import pytest
import torch

from mrigen.models import CodePrior, VectorQuantizer, build_model, codebook_usage


def _quantizer(k=8, d=2, threshold=1.0, decay=0.9):
    return VectorQuantizer(k, d, commitment=0.25, decay=decay, dead_threshold=threshold)


def _as_grid(rows: torch.Tensor) -> torch.Tensor:
    """(N, D) vectors -> (1, D, 1, N) encoder-output layout."""
    return rows.t().reshape(1, rows.shape[1], 1, rows.shape[0])


def test_lookup_of_an_index_is_the_codebook_row():
    vq = _quantizer()
    idx = torch.tensor([[[3, 0], [7, 3]]])
    codes = vq.lookup(idx)  # (1, D, 2, 2)
    assert codes.shape == (1, 2, 2, 2)
    assert torch.equal(codes[0, :, 1, 0], vq.embed[7])
    assert torch.equal(codes[0, :, 0, 0], vq.embed[3])


def test_codebook_vectors_quantize_to_themselves_and_perplexity_counts_codes():
    vq = _quantizer().eval()
    out = vq(_as_grid(vq.embed.clone()))
    assert torch.equal(out.indices.reshape(-1), torch.arange(8))
    torch.testing.assert_close(out.perplexity, torch.tensor(8.0))
    assert out.loss == 0
    same = vq(_as_grid(vq.embed[[2, 2, 2, 2]]))
    torch.testing.assert_close(same.perplexity, torch.tensor(1.0))
    assert codebook_usage(same.indices, 8) == 1 / 8
    assert codebook_usage(torch.arange(8), 8) == 1.0


def test_decode_indices_decodes_exactly_that_code(make_cfg):
    model = build_model(make_cfg(family="vqvae", image_size=16, blocks=3)).eval()
    idx = torch.randint(0, 16, (3, 2, 2))
    with torch.no_grad():
        expected = model.decoder(model.post_quant(model.quantizer.embed[idx].permute(0, 3, 1, 2)))
    assert torch.equal(model.decode_indices(idx), expected)
    with pytest.raises(ValueError, match=r"\(B, 2, 2\) int64"):
        model.decode_indices(torch.zeros(1, 3, 3, dtype=torch.long))


def test_encode_then_decode_indices_is_reconstruct(make_cfg, make_images):
    model = build_model(make_cfg(family="vqvae", image_size=16, blocks=3))
    x = make_images(3, 16)
    idx = model.encode_indices(x)
    assert idx.shape == (3, 2, 2) and idx.dtype == torch.int64
    assert torch.equal(model.decode_indices(idx), model.reconstruct(x))


def test_dead_code_restart_replaces_unused_codes_with_batch_vectors():
    vq = _quantizer(k=8, d=2, threshold=1.0).train()
    with torch.no_grad():
        vq.embed[:4] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        vq.embed[4:] = 100.0  # far away: never nearest
        vq.embed_sum.copy_(vq.embed * vq.cluster_size.unsqueeze(1))
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).repeat(4, 1) + 0.01 * torch.randn(16, 2)
    out = vq(_as_grid(z))
    assert set(out.indices.reshape(-1).tolist()) == {0, 1, 2, 3}
    for k in range(4, 8):  # every dead code now sits exactly on an encoder output of the batch
        assert (vq.embed[k] - z).abs().sum(dim=1).min() < 1e-6, k
    assert (vq.cluster_size >= 1.0).all()


def test_no_restart_when_threshold_is_zero():
    vq = _quantizer(threshold=0.0).train()
    with torch.no_grad():
        vq.embed[4:] = 100.0
        vq.embed_sum[4:] = 100.0
    vq(_as_grid(torch.rand(16, 2)))
    assert torch.allclose(vq.embed[4:], torch.full((4, 2), 100.0))


def test_ema_moves_used_codes_to_their_cluster_means_and_eval_freezes_codebook():
    vq = _quantizer(k=4, d=2, threshold=0.0, decay=0.8).train()
    with torch.no_grad():
        vq.embed.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0], [50.0, 50.0], [-50.0, -50.0]]))
        vq.embed_sum.copy_(vq.embed)
    z = torch.cat([torch.tensor([0.5, 0.0]) + 0.1 * torch.randn(32, 2), torch.tensor([4.0, 4.5]) + 0.1 * torch.randn(32, 2)])
    for _ in range(60):
        vq(_as_grid(z))
    torch.testing.assert_close(vq.embed[0], z[:32].mean(0), atol=1e-3, rtol=0)
    torch.testing.assert_close(vq.embed[1], z[32:].mean(0), atol=1e-3, rtol=0)
    frozen = vq.embed.clone()
    vq.eval()(_as_grid(z + 1.0))
    assert torch.equal(vq.embed, frozen)


def test_quantizer_updates_in_fp32_under_bf16_autocast():
    vq = _quantizer().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(_as_grid(torch.rand(16, 2)).bfloat16())
    assert vq.embed.dtype == vq.cluster_size.dtype == torch.float32
    assert out.loss.dtype == torch.float32


def test_prior_loss_decreases_on_a_fixed_index_set():
    torch.manual_seed(0)
    prior = CodePrior(num_codes=16, max_positions=9, channels=32, layers=2)
    indices = torch.randint(0, 16, (4, 3, 3))
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = prior.loss(indices)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(16.0)).item(), rel=0.2)  # ~uniform at init
    assert losses[-1] < 0.7 * losses[0]


def test_prior_cached_steps_match_full_forward():
    prior = CodePrior(num_codes=10, max_positions=6, channels=32, layers=2).eval()
    grid = torch.randint(0, 10, (2, 2, 3))
    full = prior.logits(grid)  # (2, 6, 10)
    flat = grid.reshape(2, 6)
    cache = prior.empty_cache()
    token = torch.full((2, 1), 10)
    for t in range(6):
        torch.testing.assert_close(prior.step(token, t, cache), full[:, t], atol=1e-5, rtol=1e-5)
        token = flat[:, t : t + 1]


def test_prior_sample_shape_range_and_grid_limit():
    prior = CodePrior(num_codes=10, max_positions=6, channels=16, layers=1)
    s = prior.sample(5, 2, 3, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, 2, 3) and s.dtype == torch.int64
    assert 0 <= s.min() and s.max() < 10
    with pytest.raises(ValueError, match="3x3"):
        prior.sample(1, 3, 3)
    with pytest.raises(ValueError, match="int64"):
        prior.loss(torch.zeros(1, 2, 3))


def test_vqvae_sample_needs_a_trained_prior(make_cfg):
    model = build_model(make_cfg(family="vqvae"))
    with pytest.raises(RuntimeError, match="mark_prior_trained"):
        model.sample(2)
    model.mark_prior_trained()
    assert model.sample(2).shape == (2, 1, 16, 16)
