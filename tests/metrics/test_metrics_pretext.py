"""Pretext degradations: every kind is drawn, each changes the image the way it should, all are seeded."""

from __future__ import annotations

import pytest
import torch
from metrics_fakes import SyntheticStore

from mrigen.metrics.pretext import DEGRADATIONS, apply_degradation, degrade, head_masks


def _ringed(store: SyntheticStore) -> torch.Tensor:
    """Phantom slices with a bright scalp ring (the phantoms have none), like real T1 slices."""
    x = store.tensor("val")
    _, rim, _ = head_masks(x)
    return torch.where(rim > 0, torch.full_like(x, 0.9), x)


def test_masks_nest_and_the_rim_is_a_band(store: SyntheticStore) -> None:
    head, rim, interior = head_masks(store.tensor("val"))
    assert bool(((rim <= head) & (interior <= head)).all()) and not bool((rim * interior).any())
    assert 0.05 < float(rim.sum() / head.sum()) < 0.6 and float(interior.sum()) > 0
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        degrade(torch.rand(2, 32, 32), torch.Generator())


def test_masks_of_a_mirrored_slice_are_its_masks_mirrored(store: SyntheticStore) -> None:
    """The feature network mirrors training slices and their precomputed masks instead of recomputing them."""
    x = torch.cat([_ringed(store), store.tensor("train")])
    x = x * torch.linspace(0.6, 1.0, x.shape[-1])                    # left and right halves differ
    for mirrored, mask in zip(head_masks(x.flip(-1)), head_masks(x)):
        assert torch.equal(mirrored, mask.flip(-1))


def test_degrade_draws_every_kind_is_seeded_and_stays_in_range(store: SyntheticStore) -> None:
    x = _ringed(store)
    out, kind = degrade(x, torch.Generator().manual_seed(0))
    again, kind_again = degrade(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and torch.equal(kind, kind_again)
    given, kind_given = degrade(x, torch.Generator().manual_seed(0), head_masks(x))    # masks computed once
    assert torch.equal(out, given) and torch.equal(kind, kind_given)
    assert set(kind.tolist()) == set(range(len(DEGRADATIONS)))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    clean = kind == 0
    assert torch.equal(out[clean], x[clean])
    assert all(not torch.equal(out[i], x[i]) for i in (~clean).nonzero().flatten().tolist())


@pytest.mark.parametrize("name", DEGRADATIONS[1:])
def test_each_degradation_changes_what_it_names(store: SyntheticStore, name: str) -> None:
    x = _ringed(store)[:8]
    head, rim, interior = head_masks(x)
    y = apply_degradation(name, x, torch.Generator().manual_seed(1)).clamp(0, 1)
    diff = (y - x).abs()
    outside = diff * (1 - head)
    if name in ("blotch", "checker"):
        assert float(outside.max()) == 0.0 and float(diff.max()) > 0.02       # inside the head only
    if name == "rim":
        assert float((diff * (1 - rim)).sum()) < float((diff * rim).sum())    # mostly on the rim
    if name == "contrast":
        inside = interior > 0
        assert float(y[inside].std()) < float(x[inside].std())               # flatter interior
    if name == "blur":
        grad = lambda img: (img[..., 1:] - img[..., :-1]).abs().mean()
        assert float(grad(y)) < float(grad(x))
    if name == "noise":
        assert float(outside.mean()) > 0.002                                 # everywhere
    if name == "patches":
        changed = (diff > 0.05).float()
        assert 0.003 < float(changed.mean()) < 0.3                           # a share of the cells, not all
        near = torch.nn.functional.max_pool2d(head, 9, stride=1, padding=4)
        assert float((changed * (1 - near)).sum()) == 0.0                    # only in and around the head
    with pytest.raises(ValueError, match="unknown"):
        apply_degradation("smudge", x, torch.Generator())
