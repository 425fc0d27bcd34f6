"""Conditioning fidelity: probes read the requested attributes back from a faithful generator, not from a deaf one."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mrigen.metrics.fidelity import conditioning_fidelity, requested_rows


class _FromTrain(torch.nn.Module):
    """A fake conditional generator over the store's real training slices: `faithful` returns, for each requested
    slice_pos, a training slice at that position; otherwise a random training slice (it ignores the request)."""

    def __init__(self, store, faithful: bool) -> None:
        super().__init__()
        self.config = SimpleNamespace(conditions=("slice_pos",), family="vqvae")
        self.images = store.tensor("train", "cpu")
        self.pos = torch.tensor([r["slice_pos"] for r in store.slices("train")])
        self.faithful = faithful
        self.own = torch.Generator().manual_seed(12345)

    def sample(self, n, generator=None, conditions=None):
        assert conditions is not None and conditions.shape == (n, 1)
        if not self.faithful:   # its own stream: the request's stream would pick slices at the requested positions
            return self.images[torch.randint(0, len(self.images), (n,), generator=self.own)]
        out = []
        for p in conditions[:, 0]:
            near = torch.nonzero((self.pos - p).abs() < 1e-6).flatten()
            out.append(self.images[near[torch.randint(0, len(near), (1,), generator=generator)]])
        return torch.cat(out)


def test_a_faithful_generator_scores_like_real_slices_and_a_deaf_one_does_not(demo_store, probes):
    good = conditioning_fidelity(_FromTrain(demo_store, True), demo_store, probes, n=120, seed=0)
    deaf = conditioning_fidelity(_FromTrain(demo_store, False), demo_store, probes, n=120, seed=0)
    assert set(good) == {"cond_slice_pos_mae", "cond_slice_pos_mae_real"}     # only what the model conditions on
    real = good["cond_slice_pos_mae_real"]
    assert good["cond_slice_pos_mae"] <= 1.5 * real
    assert deaf["cond_slice_pos_mae"] > 1.5 * real and deaf["cond_slice_pos_mae"] > 2 * good["cond_slice_pos_mae"]


def test_requests_follow_the_held_out_rows_and_keep_only_the_model_attributes(demo_store):
    rows = demo_store.slices("val")
    asked = requested_rows(rows, ("slice_pos", "site"), 50, seed=1)
    assert len(asked) == 50 and all(set(r) == {"slice_pos", "site"} for r in asked)
    assert {(r["slice_pos"], r["site"]) for r in asked} <= {(r["slice_pos"], r["site"]) for r in rows}
    assert asked == requested_rows(rows, ("slice_pos", "site"), 50, seed=1)


def test_an_unconditional_model_has_no_fidelity(demo_store, probes):
    model = SimpleNamespace(config=SimpleNamespace(conditions=()))
    assert conditioning_fidelity(model, demo_store, probes) == {}
