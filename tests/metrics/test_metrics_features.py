"""The in-project feature network: config validation, features, cache, weight validation, usefulness."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from metrics_fakes import TINY_FEATURES, SyntheticStore
from safetensors.torch import load_file, save_file

import mrigen.metrics.features as features_mod
from mrigen.metrics import (FeatureNet, FeatureNetConfig, cache_path, extract_features, frechet_distance,
                            get_feature_net, load_feature_net, save_feature_net)
from mrigen.metrics.pretext import DEGRADATIONS


@pytest.mark.parametrize(("field", "value", "match"), [
    ("input_size", 0, "input_size"), ("input_size", 40, "input_size"), ("steps", 0, "steps"),
    ("batch_size", 0, "batch_size"), ("feature_dim", 0, "feature_dim"), ("lr", 0.0, "lr"),
    ("channels", (), "channels"), ("channels", (8, 0), "channels"), ("detector_weight", -0.5, "detector_weight"),
    ("members", 0, "members"),
])
def test_config_rejects_invalid_values(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=f"FeatureNetConfig.{match}"):
        FeatureNetConfig(**{field: value})


def test_config_from_dict_rejects_unknown_keys_and_round_trips() -> None:
    with pytest.raises(ValueError, match="FeatureNetConfig: unknown key"):
        FeatureNetConfig.from_dict({"depth": 3})
    assert FeatureNetConfig.from_dict({"channels": [8, 16, 32], "input_size": 32}).channels == (8, 16, 32)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_features_are_a_unit_embedding_then_detector_probabilities_for_any_size(size: int) -> None:
    net = FeatureNet(TINY_FEATURES)
    feats = extract_features(net, torch.rand(5, 1, size, size), batch_size=2)
    emb = TINY_FEATURES.feature_dim
    assert feats.shape == (5, emb + len(DEGRADATIONS)) == (5, net.out_dim)
    assert torch.allclose(feats[:, :emb].norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(feats[:, emb:].sum(1), torch.full((5,), TINY_FEATURES.detector_weight), atol=1e-5)
    assert bool((feats[:, emb:] >= 0).all())
    net.cfg = replace(TINY_FEATURES, detector_weight=0.0)          # 0 turns the detector part off
    assert float(extract_features(net, torch.rand(2, 1, size, size))[:, emb:].abs().max()) == 0.0
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net.features(torch.rand(2, 3, size, size))


def test_cache_second_call_loads_without_training(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SyntheticStore(tmp_path, subjects={"train": 4, "val": 2})
    first = get_feature_net(store, config=TINY_FEATURES)
    path = cache_path(store)
    assert path.name == f"feature_net-v5-{store.digest[:12]}-1nets.safetensors" and path.is_file()
    assert not list(tmp_path.glob("*.tmp"))                       # atomic write left no temporary file

    def no_training(*args, **kwargs):
        raise AssertionError("the cached feature network should have been loaded, not retrained")

    monkeypatch.setattr(features_mod, "train_feature_net", no_training)
    second = get_feature_net(store, config=TINY_FEATURES)
    x = store.tensor("val")
    assert torch.equal(extract_features(first, x), extract_features(second, x))
    with pytest.raises(ValueError, match="other settings"):
        get_feature_net(store, config=replace(TINY_FEATURES, steps=41))


def test_training_is_deterministic_for_a_seed(tmp_path) -> None:
    cfg = replace(TINY_FEATURES, steps=5)
    a = get_feature_net(SyntheticStore(tmp_path / "a", subjects={"train": 3, "val": 2}), config=cfg)
    b = get_feature_net(SyntheticStore(tmp_path / "b", subjects={"train": 3, "val": 2}), config=cfg)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name


def test_weights_of_another_store_are_refused(store: SyntheticStore, feature_net: FeatureNet, tmp_path) -> None:
    other = SyntheticStore(tmp_path, subjects={"train": 2, "val": 2}, seed=5)
    with pytest.raises(ValueError, match="trained on store digest"):
        get_feature_net(other, weights=cache_path(store))
    copied = cache_path(other)                                          # planted in the other store's cache
    copied.write_bytes(cache_path(store).read_bytes())
    with pytest.raises(ValueError, match="not on this store"):
        get_feature_net(other, config=TINY_FEATURES)


def test_user_weights_are_validated(store: SyntheticStore, feature_net: FeatureNet, tmp_path) -> None:
    good = save_feature_net(feature_net, tmp_path / "mine.safetensors", store_digest=store.digest)
    loaded = get_feature_net(store, weights=good)
    val = store.tensor("val")
    assert torch.equal(extract_features(loaded, val), extract_features(feature_net, val))

    tensors = load_file(str(good))
    meta = {"format": features_mod.FORMAT, "store_digest": store.digest, "config": json.dumps(
        {"input_size": 32, "channels": [16, 32, 64], "feature_dim": 64, "steps": 40, "batch_size": 32})}
    save_file(tensors, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="does not match its config"):
        get_feature_net(store, weights=tmp_path / "shape.safetensors")

    save_file(tensors, str(tmp_path / "foreign.safetensors"), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not an mrigen feature network"):
        load_feature_net(tmp_path / "foreign.safetensors", store_digest=store.digest)
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_feature_net(tmp_path / "junk.safetensors", store_digest=store.digest)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_feature_net(tmp_path / "missing.safetensors", store_digest=store.digest)


def test_feature_space_separates_real_from_noise(store: SyntheticStore, feature_net: FeatureNet) -> None:
    val = store.tensor("val")
    a, b = extract_features(feature_net, val[0::2]), extract_features(feature_net, val[1::2])
    noise = extract_features(feature_net, torch.rand(val[0::2].shape, generator=torch.Generator().manual_seed(0)))
    assert frechet_distance(a, b) < frechet_distance(noise, b)


def test_cache_of_an_older_format_is_ignored_not_refused(tmp_path) -> None:
    store = SyntheticStore(tmp_path, subjects={"train": 2, "val": 2})
    (tmp_path / f"feature_net-{store.digest[:12]}.safetensors").write_bytes(b"format 1 file")   # old cache name
    assert isinstance(get_feature_net(store, config=replace(TINY_FEATURES, steps=2)), FeatureNet)
    assert cache_path(store).is_file()


def test_feature_net_trains_on_one_half_of_the_train_subjects(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mrigen.metrics.features import train_halves

    store = SyntheticStore(tmp_path, subjects={"train": 6, "val": 2})
    seen: list[set[str]] = []
    real_aux = features_mod.aux_targets

    def spy(slices, n, device):
        seen.append({row["subject"] for row in slices})
        return real_aux(slices, n, device)

    monkeypatch.setattr(features_mod, "aux_targets", spy)
    features_mod.train_feature_net(store, replace(TINY_FEATURES, steps=2))
    rows = store.slices("train")
    net_rows, base_rows = train_halves(rows)
    assert seen == [{rows[i]["subject"] for i in net_rows.tolist()}]
    assert not seen[0] & {rows[i]["subject"] for i in base_rows.tolist()}


@pytest.mark.parametrize("mirror", [True, False])
def test_training_slices_are_mirrored_half_the_time_with_their_masks(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                                     mirror: bool) -> None:
    """With `mirror`, about half the slices a member sees are store slices flipped left-right (never anything else),
    and each comes with the head masks of what it shows; without it, every slice is a store slice as stored."""
    from mrigen.metrics.pretext import head_masks

    store = SyntheticStore(tmp_path, subjects={"train": 4, "val": 2})
    stored = features_mod.resize_square(store.tensor("train"), TINY_FEATURES.input_size)
    shown: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = []
    real_degrade = features_mod.degrade

    def spy(x, gen, masks=None):
        shown.append((x.clone(), tuple(m.clone() for m in masks)))
        return real_degrade(x, gen, masks)

    monkeypatch.setattr(features_mod, "degrade", spy)
    features_mod.train_feature_net(store, replace(TINY_FEATURES, steps=8, mirror=mirror))
    flipped = 0
    for x, masks in shown:
        for got, want in zip(masks, head_masks(x)):
            assert torch.equal(got, want)
        for img in x:
            same = bool((stored == img).flatten(1).all(1).any())
            mirrored = bool((stored.flip(-1) == img).flatten(1).all(1).any())
            assert same or mirrored, "a training slice is neither a stored slice nor its mirror image"
            flipped += mirrored and not same
    total = sum(len(x) for x, _ in shown)
    assert total == 8 * TINY_FEATURES.batch_size
    if mirror:
        assert 0.35 < flipped / total < 0.65
    else:
        assert flipped == 0


def test_unwritable_cache_warns_and_still_returns_a_net(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    store = SyntheticStore(tmp_path, subjects={"train": 2, "val": 2})

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(features_mod, "save_feature_net", read_only)
    net = get_feature_net(store, config=replace(TINY_FEATURES, steps=2))
    assert isinstance(net, FeatureNet) and not cache_path(store).exists()
    assert "could not cache the feature network" in caplog.text


def test_feature_net_trains_when_called_under_no_grad(store: SyntheticStore) -> None:
    """evaluate() runs under torch.no_grad(); training the store's feature net there must still work."""
    from mrigen.metrics import FeatureNetConfig, train_feature_net

    with torch.no_grad():
        net, summary = train_feature_net(store, FeatureNetConfig(steps=3, batch_size=8))
    assert all(p.requires_grad for p in net.parameters())
    assert summary["loss"] == summary["loss"]    # finite, not NaN


def test_default_config_reads_steps_and_members_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(features_mod.STEPS_ENV, "7")
    monkeypatch.setenv(features_mod.MEMBERS_ENV, "2")
    assert features_mod.default_config() == FeatureNetConfig(steps=7, members=2)
    assert features_mod.default_config(members=5) == FeatureNetConfig(steps=7, members=5)     # the caller's count wins
    monkeypatch.setenv(features_mod.STEPS_ENV, "")
    monkeypatch.setenv(features_mod.MEMBERS_ENV, "")
    assert features_mod.default_config() == FeatureNetConfig() and FeatureNetConfig().members == 3
    for var in (features_mod.STEPS_ENV, features_mod.MEMBERS_ENV):
        for bad in ("many", "0", "-3"):
            monkeypatch.setenv(var, bad)
            with pytest.raises(ValueError, match=f"{var}='{bad}' must be an integer >= 1"):
                features_mod.default_config()
        monkeypatch.setenv(var, "")


def test_an_ensemble_is_its_members_each_trained_alone_with_its_own_seed(tmp_path) -> None:
    """Member i of a K-network ensemble is bit for bit the single network of seed + 1000 i; features are the
    members' features side by side over sqrt(K), so squared distances are the mean of the members'."""
    store = SyntheticStore(tmp_path, subjects={"train": 4, "val": 2})
    cfg = replace(TINY_FEATURES, steps=6, members=2, seed=3)
    ensemble, summary = features_mod.train_feature_net(store, cfg, progress=False)
    singles = [features_mod.train_feature_net(store, replace(cfg, members=1, seed=3 + 1000 * i), progress=False)[0]
               for i in range(2)]
    for i, single in enumerate(singles):
        member, alone = ensemble.members[i].state_dict(), single.members[0].state_dict()
        assert all(torch.equal(member[name], alone[name]) for name in alone), i
    assert not torch.equal(ensemble.members[0].embed.weight, ensemble.members[1].embed.weight)
    x = store.tensor("val")
    feats = extract_features(ensemble, x)
    assert feats.shape == (x.shape[0], ensemble.out_dim) == (x.shape[0], 2 * (cfg.feature_dim + len(DEGRADATIONS)))
    assert torch.allclose(feats, torch.cat([extract_features(s, x) for s in singles], 1) / 2 ** 0.5, atol=1e-6)
    a, b = feats[:1], feats[1:2]
    per_member = [(extract_features(s, x[:1]) - extract_features(s, x[1:2])).pow(2).sum() for s in singles]
    assert torch.allclose((a - b).pow(2).sum(), sum(per_member) / 2, atol=1e-6)
    emb = ensemble.embedding(feats)                                   # what precision / recall use
    assert emb.shape == (x.shape[0], 2 * cfg.feature_dim)
    assert torch.allclose(emb.norm(dim=1), torch.ones(x.shape[0]), atol=1e-5)
    assert set(summary) == {"loss", "pos_mae", "site_acc", "degradation_acc"}


def test_each_member_count_has_its_own_cache_file_and_a_mismatch_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(features_mod.STEPS_ENV, "2")          # the default-config network trained below: 2 steps
    store = SyntheticStore(tmp_path, subjects={"train": 3, "val": 2})
    two = get_feature_net(store, config=replace(TINY_FEATURES, steps=2, members=2))
    assert cache_path(store, 2).is_file() and not cache_path(store, 1).exists()
    assert len(get_feature_net(store, members=2).members) == 2                    # the cached file, any settings
    assert len(get_feature_net(store, members=1).members) == 1 and cache_path(store, 1).is_file()
    with pytest.raises(ValueError, match="has 2 member"):
        get_feature_net(store, weights=cache_path(store, 2), members=3)
    with pytest.raises(ValueError, match="contradicts"):
        get_feature_net(store, config=TINY_FEATURES, members=2)
    assert len(two.members) == 2
