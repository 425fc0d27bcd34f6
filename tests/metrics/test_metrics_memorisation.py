"""Copy detection: nearest-training-slice distances and the memorised share."""

from __future__ import annotations

import pytest
import torch
from metrics_fakes import SyntheticStore

from mrigen.metrics import memorisation, nn_distances
from mrigen.metrics.memorisation import downsample


def test_downsample_pools_to_at_most_the_side_and_flattens() -> None:
    x = torch.rand(3, 1, 64, 64)
    assert downsample(x, 32).shape == (3, 32 * 32)
    assert downsample(x, 64).shape == (3, 64 * 64)
    assert downsample(torch.rand(2, 1, 40, 40), 32).shape == (2, 20 * 20)     # factor 2, any side
    assert torch.allclose(downsample(x, 32).mean(1), x.flatten(1).mean(1), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        downsample(x[:, 0])
    with pytest.raises(ValueError, match="max_side=0"):
        downsample(x, 0)


def test_nn_distances_are_rms_and_exclude_the_own_group() -> None:
    bank = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]])
    query = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(nn_distances(query, bank), torch.zeros(2), atol=1e-6)
    groups = torch.tensor([0, 1, 2])
    d = nn_distances(query, bank, query_groups=torch.tensor([0, 1]), bank_groups=groups)
    assert torch.allclose(d, torch.full((2,), 0.5))                          # RMS of (0.5, 0.5)
    with pytest.raises(ValueError, match="share P"):
        nn_distances(query, bank[:, :1])
    with pytest.raises(ValueError, match="together"):
        nn_distances(query, bank, query_groups=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="chunk"):
        nn_distances(query, bank, chunk=0)


def test_copies_score_one_and_held_out_subjects_zero(tmp_path) -> None:
    store = SyntheticStore(tmp_path, subjects={"train": 6, "val": 3, "test": 3})
    train, val, test = store.tensor("train"), store.tensor("val"), store.tensor("test")
    subjects = {name: i for i, name in enumerate(sorted({r["subject"] for r in store.slices("train")}))}
    groups = torch.tensor([subjects[r["subject"]] for r in store.slices("train")])
    copies = memorisation(train[torch.randperm(len(train))[:30]], train, val, train_groups=groups)
    assert copies["memorised"] == 1.0 and copies["nn_train_dist"] < 1e-3 < copies["nn_train_dist_real"]
    held_out = memorisation(test, train, val, train_groups=groups, mirror=False)   # (symmetric phantoms: below)
    assert held_out["memorised"] <= 0.05 and held_out["nn_train_dist"] > 0.01
    near_copies = memorisation((train[:30] + 0.002 * torch.randn(30, *train.shape[1:])).clamp(0, 1),
                               train, val, train_groups=groups, mirror=False)
    assert near_copies["memorised"] == 1.0
    with pytest.raises(ValueError, match="train_groups"):
        memorisation(test, train, val, train_groups=groups[:5])



def test_mirrored_copies_are_flagged(tmp_path) -> None:
    """The synthetic phantoms are nearly left-right symmetric, so a mirror is close to its slice either way; the
    demo-cohort test (test_metrics_discrimination) checks that unseen slices stay unflagged with mirrors."""
    store = SyntheticStore(tmp_path, subjects={"train": 6, "val": 3, "test": 3})
    train, val = store.tensor("train"), store.tensor("val")
    subjects = {name: i for i, name in enumerate(sorted({r["subject"] for r in store.slices("train")}))}
    groups = torch.tensor([subjects[r["subject"]] for r in store.slices("train")])
    mirrored = memorisation(train[:30].flip(-1), train, val, train_groups=groups)
    assert mirrored["memorised"] == 1.0 and mirrored["nn_train_dist"] < 1e-3
    assert memorisation(train[:30].flip(-1), train, val, train_groups=groups, mirror=False)["nn_train_dist"] > 1e-3
