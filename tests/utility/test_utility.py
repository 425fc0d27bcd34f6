"""The utility protocol: a noise generator gives no gain, arms share the CNN and seeds, held-out subjects only,
conditional models get matched conditions, and clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import ConditionalFake, CopyModel, NoiseModel, tiny_cfg

import mrigen.utility.pool as pool_module
from mrigen.utility import UtilityConfig, get_task, paired, run_utility, summary, table, verdict
from mrigen.utility.arms import classic_augment, real_subset
from mrigen.utility.cnn import fit_and_predict


@pytest.fixture(scope="module")
def noise_result(demo_store, probes):
    return run_utility(NoiseModel(), demo_store, tiny_cfg(), probes=probes, progress=False)


def test_noise_generator_gives_no_gain_and_the_benchmark_tells_it_from_real_slices(demo_store, probes,
                                                                                   noise_result):
    s = summary(noise_result)
    assert s["learnable"], table(noise_result)                 # slice position is learnable from real slices
    for arm in noise_result.arms:
        if arm.arm != "real":
            assert verdict(noise_result, arm) != "gain" or arm.arm == "real+classic", table(noise_result)
    # Trained on noise, the CNN knows nothing about real slices: no better than ignoring the image.
    assert noise_result.arm("synthetic").mean > 0.95 * noise_result.chance, table(noise_result)
    assert s["tstr_ratio"] < 0.8
    # Positive control: copies of real slices (of more subjects than the real subset) train as well as real ones.
    good = run_utility(CopyModel(demo_store.tensor("train")), demo_store, tiny_cfg(), probes=probes,
                       progress=False)
    assert summary(good)["tstr_ratio"] > 0.9, table(good)
    assert summary(good)["gain"] > s["gain"] and verdict(good, good.arm("real+synthetic", 90)) != "loss"


def test_table_reports_arms_chance_and_label_source(noise_result):
    text = table(noise_result)
    for arm in ("| real |", "| real+classic |", "| real+synthetic | 30 |", "| real+synthetic | 90 |",
                "| synthetic | 90 |", "chance"):
        assert arm in text
    assert "read back by the store's probes" in text and noise_result.label_source == "probe"
    assert [len(a.scores) for a in noise_result.arms] == [2] * 5


def test_arms_share_cnn_config_and_seeds_and_test_on_held_out_subjects(demo_store, probes, monkeypatch):
    calls = []
    real_fit = pool_module.fit_and_predict

    def spy(images, targets, known, test, **kw):
        calls.append({"n": images.shape[0], "images": images, "test": test, **kw})
        return real_fit(images, targets, known, test, **kw)

    monkeypatch.setattr(pool_module, "fit_and_predict", spy)
    cfg = tiny_cfg(steps=2)
    run_utility(NoiseModel(), demo_store, cfg, probes=probes, progress=False)
    assert len(calls) == cfg.seeds * 5
    test_x = demo_store.tensor("test")
    for seed in range(cfg.seeds):
        mine = [c for c in calls if c["seed"] == seed]
        assert len(mine) == 5 and all(c["cfg"] is cfg for c in mine)      # one CNN, one schedule for every arm
        real, classic, rs_small, rs_big, synth = mine
        assert real["augment"] is None and classic["augment"] is classic_augment
        assert torch.equal(real["images"], classic["images"])
        assert torch.equal(rs_small["images"][:real["n"]], real["images"])      # the same real slices + N
        assert rs_small["n"] == real["n"] + 30 and rs_big["n"] == real["n"] + 90 and synth["n"] == 90
        assert all(torch.equal(c["test"], test_x) for c in mine)                # scored on the test split only
    train_subjects = {r["subject"] for r in demo_store.slices("train")}
    idx, subjects = real_subset(demo_store.slices("train"), 0.25, 0)
    assert set(subjects) <= train_subjects and len(subjects) == round(0.25 * len(train_subjects))
    assert not train_subjects & {r["subject"] for r in demo_store.slices("test")}


def test_worker_processes_give_the_same_scores_as_one_process(demo_store, probes):
    """The trainings are independent and seeded: two worker processes (one thread each) score every arm and seed
    exactly as one process with one thread does, and the results come back in protocol order."""
    cfg = tiny_cfg(steps=6)
    model = CopyModel(demo_store.tensor("train"))
    serial = run_utility(model, demo_store, cfg, probes=probes, progress=False)
    parallel = run_utility(model, demo_store, cfg, probes=probes, progress=False, workers=2)
    assert [(a.arm, a.synthetic) for a in parallel.arms] == [(a.arm, a.synthetic) for a in serial.arms]
    assert [a.scores for a in parallel.arms] == [a.scores for a in serial.arms]
    assert len({s for a in serial.arms for s in a.scores}) > 2          # the arms do differ: not a constant
    with pytest.raises(ValueError, match="workers=0"):
        run_utility(model, demo_store, cfg, probes=probes, progress=False, workers=0)


def test_a_failing_training_in_a_worker_is_raised_not_swallowed(demo_store):
    from mrigen.utility.pool import FitData, FitJob, run_fits

    x = demo_store.tensor("train")[:20]
    t, k = torch.rand(20), torch.zeros(20, dtype=torch.bool)            # no labelled row: the CNN cannot train
    data = FitData(x, t, k, x[:0], t[:0], k[:0], x[:4], n_out=1, classification=False, cfg=tiny_cfg(steps=2))
    jobs = [FitJob(torch.arange(10), 0, seed) for seed in range(2)]
    with pytest.raises(ValueError, match="no labelled training slice"):
        run_fits(data, jobs, workers=2)


def test_same_seed_same_weights_different_seed_different(demo_store):
    x = demo_store.tensor("train")[:40]
    t, k = torch.rand(40), torch.ones(40, dtype=torch.bool)
    cfg = tiny_cfg(steps=3)
    kw = dict(n_out=1, classification=False, cfg=cfg)
    a = fit_and_predict(x, t, k, x[:5], seed=1, **kw)
    assert torch.equal(a, fit_and_predict(x, t, k, x[:5], seed=1, **kw))
    assert not torch.equal(a, fit_and_predict(x, t, k, x[:5], seed=2, **kw))


def test_refuses_a_store_whose_test_subjects_were_trained_on(demo_store, probes):
    class Leaky:
        path, image_size, digest = demo_store.path, demo_store.image_size, demo_store.digest

        def tensor(self, split, device="cpu"):
            return demo_store.tensor(split, device)

        def slices(self, split):
            rows = demo_store.slices(split)
            return [dict(r, subject=demo_store.slices("train")[0]["subject"]) for r in rows] if split == "test" \
                else rows

    with pytest.raises(ValueError, match="held-out subjects only"):
        run_utility(NoiseModel(), Leaky(), tiny_cfg(), probes=probes, progress=False)


def test_conditional_model_gets_rows_from_the_real_subset_and_its_labels(demo_store, probes):
    train_rows = demo_store.slices("train")
    model = ConditionalFake(demo_store.tensor("train"), train_rows)
    result = run_utility(model, demo_store, tiny_cfg(task="site", steps=5, seeds=1), probes=probes, progress=False)
    assert result.label_source == "requested" and result.model_conditions == ["slice_pos", "site"]
    assert len(model.requested) == 90
    idx, _ = real_subset(train_rows, 0.25, 0)
    pool = [train_rows[i] for i in idx.tolist()]
    assert all(r in pool for r in model.requested)             # conditions follow the real label distribution
    assert "requested conditions" in table(result)
    # A model not conditioned on the task's attribute: the probe labels its samples instead.
    other = run_utility(model, demo_store, tiny_cfg(task="age", steps=5, seeds=1), probes=probes, progress=False)
    assert other.label_source == "probe"


def test_tasks_share_one_synthetic_set_through_the_cache(demo_store, probes):
    """The synthetic slices do not depend on the task: with a shared cache the second task relabels the first
    task's slices (the requested rows, or the probe for an attribute the model is not conditioned on) instead of
    generating again."""
    from mrigen.utility.arms import generate_synthetic, synthetic_set

    train_rows = demo_store.slices("train")
    model = ConditionalFake(demo_store.tensor("train"), train_rows)
    cache: dict = {}
    first = run_utility(model, demo_store, tiny_cfg(task="site", steps=5, seeds=1), probes=probes, progress=False,
                        synthetic_cache=cache)
    asked = list(model.requested)
    second = run_utility(model, demo_store, tiny_cfg(task="age", steps=5, seeds=1), probes=probes, progress=False,
                         synthetic_cache=cache)
    assert model.requested == asked and len(cache) == 1          # generated once, for the first task
    assert (first.label_source, second.label_source) == ("requested", "probe")
    (images, requested), = cache.values()
    pool = [train_rows[i] for i in real_subset(train_rows, 0.25, 0)[0].tolist()]
    fresh_images, fresh_rows = generate_synthetic(ConditionalFake(demo_store.tensor("train"), train_rows),
                                                  len(images), pool=pool, seed=0, batch_size=tiny_cfg().sample_batch)
    assert torch.equal(fresh_images, images) and fresh_rows == requested   # the cache holds what a run makes
    relabelled = synthetic_set(model, len(images), task="age", pool=pool, probes=probes, seed=0,
                               generated=(images, requested))
    assert torch.equal(relabelled.images, images) and relabelled.rows == probes.labels(images)


def test_not_learnable_task_is_reported_as_such(noise_result):
    import copy

    flat = copy.deepcopy(noise_result)
    for a in flat.arms:
        a.scores = [flat.chance + 0.001 * (i % 2) for i in range(len(a.scores))]
    assert all(verdict(flat, a) == "not learnable" for a in flat.arms if a.arm != "real")
    assert "not learnable from these images" in table(flat)


def test_one_line_errors():
    rows = [{"subject": "a", "slice_pos": p / 4, "site": "HH", "age": None, "sex": None} for p in range(5)]
    with pytest.raises(ValueError, match="unknown task 'volume'.*slice_pos, site, age, sex"):
        get_task("volume", rows)
    with pytest.raises(ValueError, match="task 'age' needs the 'age' attribute.*carries: slice_pos"):
        get_task("age", rows, "store X")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"real_fraction=.* out of range \(allowed: 0 < F <= 1\)"):
            UtilityConfig(real_fraction=bad)
    with pytest.raises(ValueError, match="synthetic"):
        UtilityConfig(synthetic=(1000, 250))


def test_classic_augment_keeps_range_and_shape():
    x = torch.rand(6, 1, 32, 32)
    y = classic_augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1 and not torch.equal(x, y)
    assert torch.equal(y, classic_augment(x, torch.Generator().manual_seed(0)))


def test_paired_column_compares_seed_by_seed_and_leaves_the_verdict_alone(noise_result):
    import copy

    r = copy.deepcopy(noise_result)
    r.arms = [a for a in r.arms if a.arm in ("real", "real+synthetic", "synthetic", "real+classic")]
    real, rs = r.arm("real"), r.arm("real+synthetic", 90)
    real.scores = [0.20, 0.17]                    # MAE: lower is better; the seeds differ in difficulty
    rs.scores = [0.18, 0.16]                      # better by 0.02 and 0.01 in each seed
    pair = paired(r, rs)
    assert pair.wins == 2 and pair.seeds == 2
    assert pair.mean == pytest.approx(0.015) and pair.std == pytest.approx(0.00707, abs=1e-4)
    # Unpaired: gain 0.015 against a spread of max(std 0.0212, 0.0141): no clear change, whatever the pairing says.
    assert verdict(r, rs) == "no clear change"
    s = summary(r)
    assert s["seeds_better"] == 2 and s["gain_paired_std"] == pytest.approx(pair.std)
    assert "+0.0150 +- 0.0071, better in 2/2" in table(r)
    rs.scores = [0.18]
    with pytest.raises(ValueError, match="1 seed scores, real-only 2"):
        paired(r, rs)
