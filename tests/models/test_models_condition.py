"""Conditioning on slice attributes: encoding, requests, the embedding's unknown values, FiLM, conditional priors."""

from __future__ import annotations

import math

import pytest
import torch

from mrigen.models import ModelConfig, build_model, save_model
from mrigen.models.condition import (ATTRIBUTES, SITES, ConditionEmbedding, ConditionRequest, decode_rows,
                                     encode_rows, parse_condition)
from mrigen.models.io import load_model
from mrigen.models.losses import vae_loss
from mrigen.models.prior import CodePrior

ALL = ("slice_pos", "site", "age", "sex")


def test_sites_are_the_data_layers_sites():
    from mrigen.data.ixi import SITES as DATA_SITES

    assert SITES == DATA_SITES


def test_rows_round_trip_and_missing_values_are_nan():
    rows = [{"slice_pos": 0.25, "site": "HH", "age": 61.5, "sex": "F"},
            {"slice_pos": 1.0, "site": "IOP", "age": None, "sex": None}]
    attrs = encode_rows(ALL, rows)
    assert attrs.shape == (2, 4)
    assert attrs[0].tolist() == [0.25, SITES.index("HH"), 61.5, 0.0]
    assert math.isnan(attrs[1, 2]) and math.isnan(attrs[1, 3])
    assert decode_rows(ALL, attrs) == rows


@pytest.mark.parametrize("row,match", [({"slice_pos": 0.5, "site": "Mars"}, "site='Mars' is not a known level"),
                                       ({"slice_pos": "top", "site": "HH"}, "slice_pos='top' is not a number"),
                                       ({"site": "HH"}, "has no 'slice_pos'")])
def test_bad_rows_are_named(row, match):
    with pytest.raises(ValueError, match=match):
        encode_rows(("slice_pos", "site"), [row])


def test_unknown_attribute_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown attribute.*'scanner'.*known: slice_pos, age, site, sex"):
        ModelConfig(conditions=("scanner",))
    with pytest.raises(ValueError, match="twice"):
        ModelConfig(conditions=("site", "site"))
    assert ModelConfig(conditions=["site"]).conditions == ("site",)   # YAML lists become tuples


@pytest.mark.parametrize("text,expected", [("site=HH", ("site", "HH")), ("slice_pos=0.2:0.8", ("slice_pos", ("0.2", "0.8"))),
                                           (" age = 70 ", ("age", "70"))])
def test_parse_condition(text, expected):
    assert parse_condition(text) == expected


@pytest.mark.parametrize("text", ["site", "=HH", "site=", "slice_pos=0.2:"])
def test_parse_condition_refuses_malformed_text(text):
    with pytest.raises(ValueError, match="--condition"):
        parse_condition(text)


def test_request_errors_name_what_the_model_knows():
    with pytest.raises(ValueError, match="not trained on 'age'; it knows: slice_pos, site"):
        ConditionRequest(("slice_pos", "site"), {"age": "40"})
    with pytest.raises(ValueError, match="it knows: none"):
        ConditionRequest((), {"site": "HH"})
    with pytest.raises(ValueError, match="a range needs a continuous attribute"):
        ConditionRequest(("site",), {"site": ("HH", "IOP")})
    with pytest.raises(ValueError, match="empty"):
        ConditionRequest(("slice_pos",), {"slice_pos": ("0.8", "0.2")})
    with pytest.raises(ValueError, match="not a known level"):
        ConditionRequest(("sex",), {"sex": "X"})


def test_request_draws_bank_rows_then_applies_fixed_values_and_ranges():
    bank = encode_rows(ALL, [{"slice_pos": p / 10, "site": SITES[p % 3], "age": 20.0 + p, "sex": "MF"[p % 2]}
                             for p in range(10)])
    req = ConditionRequest(ALL, {"site": "IOP", "slice_pos": ("0.2", "0.4")})
    rows = req.draw(bank, 500, torch.Generator().manual_seed(0))
    assert (rows[:, 1] == SITES.index("IOP")).all()
    assert rows[:, 0].min() >= 0.2 and rows[:, 0].max() <= 0.4 and rows[:, 0].std() > 0.03
    # unspecified attributes come from whole bank rows: age and sex stay paired as in the bank
    ages = rows[:, 2]
    assert set(ages.tolist()) <= set(bank[:, 2].tolist())
    assert torch.equal(rows[:, 3], bank[(ages - 20).long(), 3])
    assert req.as_dict() == {"site": "IOP", "slice_pos": [0.2, 0.4]}


def test_embedding_uses_a_learned_vector_for_unknown_values_and_never_sees_nan():
    torch.manual_seed(0)
    emb = ConditionEmbedding(ALL, 16)
    known = encode_rows(ALL, [{"slice_pos": 0.3, "site": "HH", "age": 40, "sex": "M"}])
    missing = encode_rows(ALL, [{"slice_pos": 0.3, "site": "HH", "age": None, "sex": "M"}])
    out_known, out_missing = emb(known), emb(missing)
    assert torch.isfinite(out_missing).all()
    assert not torch.allclose(out_known, out_missing)
    with torch.no_grad():
        emb.unknown[2] += 1.0                     # the age "unknown" vector: changes only rows with unknown age
    assert torch.allclose(emb(known), out_known)
    assert not torch.allclose(emb(missing), out_missing)
    out = emb(missing)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in emb.parameters() if p.grad is not None)


def test_bank_is_saved_with_the_model_and_default_sampling_draws_from_it(tmp_path, make_cfg):
    model = build_model(make_cfg(family="vae", conditions=("site",), norm="group"))
    rows = [{"site": "HH"}] * 7
    model.condition_embedding.set_bank(encode_rows(("site",), rows))
    loaded = load_model(save_model(model, tmp_path / "m"))
    assert loaded.condition_embedding.training_rows().tolist() == [[SITES.index("HH")]] * 7
    attrs = loaded.condition_embedding.resolve(20, None, torch.Generator().manual_seed(0))
    assert (attrs[:, 0] == SITES.index("HH")).all()


def test_untrained_conditional_model_needs_explicit_conditions(make_cfg):
    model = build_model(make_cfg(family="vae", conditions=("site",)))
    with pytest.raises(RuntimeError, match="no training rows"):
        model.sample(2)
    assert model.sample(2, conditions=[{"site": "HH"}, {"site": "IOP"}]).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="2 samples need 2 condition rows"):
        model.sample(2, conditions=[{"site": "HH"}])
    unconditional = build_model(make_cfg(family="vae"))
    with pytest.raises(ValueError, match="unconditional"):
        unconditional.sample(1, conditions=[{"site": "HH"}])


def test_film_starts_as_the_identity_so_a_fresh_model_ignores_its_attributes(make_cfg):
    torch.manual_seed(0)
    model = build_model(make_cfg(family="vae", conditions=("slice_pos", "site"), norm="group")).eval()
    z = torch.randn(3, *model.latent_shape)
    a = encode_rows(("slice_pos", "site"), [{"slice_pos": 0.0, "site": "HH"}] * 3)
    b = encode_rows(("slice_pos", "site"), [{"slice_pos": 1.0, "site": "IOP"}] * 3)
    with torch.no_grad():
        assert torch.allclose(model.decode(z, a), model.decode(z, b))


def _disc_images(pos: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Bright discs whose radius grows with pos in [0, 1]: (N,) -> (N, 1, size, size)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = (0.25 + 0.6 * pos).reshape(-1, 1, 1)
    return ((xx ** 2 + yy ** 2).sqrt() < r).float().unsqueeze(1) * 0.9


def test_conditional_vae_samples_follow_the_requested_slice_position(make_cfg):
    """Trained where slice_pos sets the disc's size, samples asked for pos 0 are smaller than those asked for 1."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = make_cfg(family="vae", latent="spatial", blocks=2, latent_dim=2, conditions=("slice_pos",),
                   norm="group", channels=(8, 16, 16, 16))
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(250):
        pos = torch.rand(32, generator=gen)
        x = _disc_images(pos)
        out = model(x, pos[:, None])
        loss = vae_loss(out, x, recon="mse", beta=1.0, kl_weight=1.0).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    area = {}
    for p in (0.0, 1.0):
        s = model.sample(64, generator=torch.Generator().manual_seed(1), conditions=torch.full((64, 1), p))
        area[p] = float((s > 0.45).float().mean())
    real = {p: float((_disc_images(torch.tensor([p])) > 0.45).float().mean()) for p in (0.0, 1.0)}
    assert area[1.0] - area[0.0] > 0.5 * (real[1.0] - real[0.0])


def test_conditional_prior_draws_the_codes_of_the_requested_site():
    """Code grids that are all code k for site k: a trained conditional prior samples code k when asked for site k,
    and its 'unknown' input (condition dropout) gives a mix."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    prior = CodePrior(num_codes=4, max_positions=4, channels=32, layers=1, conditions=("site",))
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        site = torch.randint(0, 3, (64,), generator=gen)
        codes = site.reshape(-1, 1, 1).expand(-1, 2, 2).clone()
        attrs = site.float().unsqueeze(1).masked_fill(torch.rand(64, 1, generator=gen) < 0.2, float("nan"))
        loss = prior.loss(codes, attrs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    prior.eval()
    for k in range(3):
        out = prior.sample(50, 2, 2, generator=torch.Generator().manual_seed(k), attrs=torch.full((50, 1), float(k)))
        assert (out == k).float().mean() > 0.95
    mixed = prior.sample(300, 2, 2, generator=torch.Generator().manual_seed(9))
    first = mixed[:, 0, 0]
    assert all((first == k).float().mean() > 0.15 for k in range(3))


def test_attributes_table_covers_the_store_columns():
    from mrigen.data.store import SLICE_COLUMNS

    assert set(ATTRIBUTES) <= set(SLICE_COLUMNS)


def test_vae_conditioning_changes_nothing_for_unconditional_configs(make_cfg):
    """No conditions: no extra parameters (saved unconditional models keep loading with strict state dicts)."""
    plain = build_model(make_cfg(family="vae"))
    assert plain.condition_embedding is None
    assert not any("film" in k or "condition" in k for k in plain.state_dict())
    vq = build_model(make_cfg(family="vqvae"))
    assert vq.condition_embedding is None and not any("condition" in k for k in vq.state_dict())
    # a conditional VQ-VAE's autoencoder is the unconditional one: only its prior gains parameters
    cond = build_model(make_cfg(family="vqvae", conditions=("site",)))
    extra = set(cond.state_dict()) - set(vq.state_dict())
    assert extra and all(k.startswith("prior.condition.") for k in extra)


def test_classifier_free_guidance_follows_the_guided_attribute_more_closely():
    """Grids of code `site` at each position with chance 0.6 (else any of 4 codes): a trained conditional prior
    draws the site's code ~70% of the time; guided on `site` (w = 3) it draws it far more often, while w = 1 is the
    unguided sampler exactly."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    prior = CodePrior(num_codes=4, max_positions=4, channels=32, layers=1, conditions=("site", "sex"))
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        site = torch.randint(0, 3, (64,), generator=gen)
        noise = torch.randint(0, 4, (64, 2, 2), generator=gen)
        keep = torch.rand(64, 2, 2, generator=gen) < 0.6
        codes = torch.where(keep, site.reshape(-1, 1, 1).expand(-1, 2, 2), noise)
        attrs = torch.stack([site.float(), torch.randint(0, 2, (64,), generator=gen).float()], dim=1)
        attrs = attrs.masked_fill(torch.rand(64, 2, generator=gen) < 0.2, float("nan"))
        loss = prior.loss(codes, attrs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    prior.eval()
    attrs = torch.tensor([[1.0, 0.0]]).repeat(400, 1)

    def share(**kw):
        return float((prior.sample(400, 2, 2, generator=torch.Generator().manual_seed(3), attrs=attrs, **kw) == 1)
                     .float().mean())

    plain, guided = share(), share(guidance=3.0, guidance_on=("site",))
    assert 0.55 < plain < 0.85 and guided > plain + 0.1
    assert torch.equal(prior.sample(8, 2, 2, generator=torch.Generator().manual_seed(1), attrs=attrs[:8]),
                       prior.sample(8, 2, 2, generator=torch.Generator().manual_seed(1), attrs=attrs[:8], guidance=1.0))
    with pytest.raises(ValueError, match="guidance"):
        prior.sample(2, 2, 2, attrs=attrs[:2], guidance=0.5)
    with pytest.raises(ValueError, match="age"):
        prior.sample(2, 2, 2, attrs=attrs[:2], guidance=2.0, guidance_on=("age",))


def test_guidance_attributes_must_be_conditions():
    with pytest.raises(ValueError, match="sample_guidance_on"):
        ModelConfig(family="vqvae", latent="spatial", conditions=("site",), sample_guidance_on=("slice_pos",))
    with pytest.raises(ValueError, match="sample_guidance"):
        ModelConfig(family="vqvae", latent="spatial", conditions=("site",), sample_guidance=0.5)
    with pytest.raises(ValueError, match="sample_guidance_on"):
        ModelConfig(family="vqvae", latent="spatial", conditions=("site",), sample_guidance_on=3)
    assert ModelConfig(family="vqvae", latent="spatial", conditions=("site",),
                       sample_guidance_on=["site"]).sample_guidance_on == ("site",)


def test_condition_dropout_hides_attributes_one_by_one_and_whole_rows_at_once():
    from mrigen.train.config import TrainConfig
    from mrigen.train.prior import drop_conditions

    attrs = torch.arange(20000 * 4, dtype=torch.float32).reshape(20000, 4)
    each = drop_conditions(attrs, 0.2, torch.Generator().manual_seed(0))
    hidden = torch.isnan(each)
    assert abs(float(hidden.float().mean()) - 0.2) < 0.01
    assert abs(float(hidden.all(1).float().mean()) - 0.2 ** 4) < 0.001              # all four: rare
    joint = torch.isnan(drop_conditions(attrs, 0.2, torch.Generator().manual_seed(0), p_all=0.3))
    assert bool((joint | ~hidden).all())                     # the same per-attribute draws, plus whole rows
    assert abs(float(joint.all(1).float().mean()) - (0.3 + 0.7 * 0.2 ** 4)) < 0.015
    assert torch.equal(drop_conditions(attrs, 0.0, torch.Generator()), attrs)
    with pytest.raises(ValueError, match="condition_dropout_all=1.0 must be in"):
        TrainConfig(condition_dropout_all=1.0)

