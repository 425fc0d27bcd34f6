"""The feature network trained in a background process while a study's first trial trains (CPU):
mrigen.metrics.background and its use by mrigen.tune."""

from __future__ import annotations

import logging
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from mrigen.data import SliceStore
from mrigen.metrics import background, cache_path, features, get_feature_net, train_feature_net
from mrigen.metrics.features import default_config

STEPS = "40"       # feature network steps in these tests (MRIGEN_FEATURE_NET_STEPS, which the child inherits)


@pytest.fixture
def fresh_store(tune_store, tmp_path) -> SliceStore:
    """A copy of the tune tests' store without a cached feature network."""
    copy = tmp_path / "store"
    shutil.copytree(tune_store.path, copy, ignore=shutil.ignore_patterns("feature_net-*"))
    return SliceStore.open(copy)


@pytest.fixture
def two_threads(monkeypatch):
    """This process computes on two torch threads (a 2-core CPU); the tests' own count is restored after."""
    monkeypatch.setenv("MRIGEN_FEATURE_NET_STEPS", STEPS)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _never_train(*args, **kwargs):
    raise AssertionError("the feature network was trained in this process")


def test_the_background_network_is_the_one_trained_here_and_get_feature_net_waits_for_it(
        fresh_store, two_threads, monkeypatch):
    job = background.start_feature_net(fresh_store, "cpu")
    assert job is not None and job.running
    assert torch.get_num_threads() == 1                       # the child has the other core
    with monkeypatch.context() as m:
        m.setattr(features, "train_feature_net", _never_train)
        net = get_feature_net(fresh_store)                    # waits for the child, loads its file
    assert not job.running and torch.get_num_threads() == 2
    assert cache_path(fresh_store).is_file() and cache_path(fresh_store) not in features._PENDING
    here, _ = train_feature_net(fresh_store, default_config(), progress=False)   # this process, 2 threads
    cached = load_file(cache_path(fresh_store))
    assert cached.keys() == here.state_dict().keys()
    for name, value in here.state_dict().items():             # one thread in both: the same float sums
        assert torch.equal(cached[name], value), name
    assert {k: torch.equal(v, net.state_dict()[k]) for k, v in cached.items()} == dict.fromkeys(cached, True)


def test_poll_gives_the_threads_back_once_the_child_has_ended(fresh_store, two_threads):
    job = background.start_feature_net(fresh_store, "cpu")
    deadline = time.monotonic() + 600
    while job.running and time.monotonic() < deadline:
        background.poll()
        time.sleep(0.2)
    assert not job.running and job.cached and torch.get_num_threads() == 2


def test_nothing_starts_on_a_gpu_with_one_thread_or_when_cached(fresh_store, two_threads, monkeypatch):
    assert background.start_feature_net(fresh_store, "cuda") is None
    torch.set_num_threads(1)
    assert background.start_feature_net(fresh_store, "cpu") is None
    torch.set_num_threads(2)
    cache_path(fresh_store).write_bytes(b"")                  # any file there: get_feature_net reads it, not a child
    assert background.start_feature_net(fresh_store, "cpu") is None
    assert torch.get_num_threads() == 2 and not background._RUNNING


def test_a_failed_child_is_named_and_the_network_is_trained_here(fresh_store, two_threads, caplog):
    class OtherDigest:                                         # the child opens the store and finds another digest
        path, digest = fresh_store.path, "0" * 64
        tensor, slices = fresh_store.tensor, fresh_store.slices

    store = OtherDigest()
    job = background.start_feature_net(store, "cpu")
    assert job is not None
    with caplog.at_level(logging.INFO, logger="mrigen.metrics"):
        net = get_feature_net(store)
    assert not job.cached and job._process.returncode == 2
    assert "background process failed (exit code 2" in caplog.text
    assert cache_path(store).is_file() and net.cfg.steps == int(STEPS)    # trained here, then cached
    assert torch.get_num_threads() == 2


def test_close_stops_a_child_nothing_needed(fresh_store, two_threads, monkeypatch):
    monkeypatch.setenv("MRIGEN_FEATURE_NET_STEPS", "1000000")
    job = background.start_feature_net(fresh_store, "cpu")
    job.close()
    assert not job.running and job._process.returncode is not None and not job.cached
    assert not cache_path(fresh_store).exists() and cache_path(fresh_store) not in features._PENDING
    assert torch.get_num_threads() == 2


def test_a_cpu_study_trains_the_network_beside_its_first_trial(tiny_study, fresh_store, two_threads, tmp_path,
                                                              monkeypatch):
    """The real final evaluation (no fake): the network comes from the background process, not this one."""
    from mrigen.tune.__main__ import main

    jobs = []

    def start(store, device, members=None):
        jobs.append(start_feature_net(store, device, members))
        return jobs[-1]

    start_feature_net = background.start_feature_net
    monkeypatch.setattr(background, "start_feature_net", start)
    monkeypatch.setattr(features, "train_feature_net", _never_train)
    for var in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    code = main(["--study", str(tiny_study), "--data", str(fresh_store.path), "--work-dir", str(tmp_path / "w"),
                 "--n-trials", "1"])
    assert code == 0 and len(jobs) == 1
    assert jobs[0].cached and not jobs[0].running and not background._RUNNING
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("set_layer, members", [({}, None), ({"train.eval_feature_nets": 2}, 2)])
def test_the_background_network_has_the_members_the_budget_evaluates_with(tiny_study, fresh_store, monkeypatch,
                                                                         set_layer, members):
    """A demo budget that evaluates with one network (`train.eval_feature_nets: 1`) trains one beside its first
    trial, not the default three; 0 (unset) leaves the default to the child."""
    import dataclasses

    from mrigen.tune.runner import _feature_net_in_background
    from mrigen.tune.study import load_study

    spec = load_study(tiny_study)
    budget = dataclasses.replace(spec.demo_budget, overrides=tuple(set_layer.items()))
    asked = []
    monkeypatch.setattr(background, "start_feature_net", lambda store, device, k=None: asked.append(k))
    _feature_net_in_background(spec, budget, fresh_store, "cpu")
    assert asked == [members]


def test_the_shipped_demo_budgets_evaluate_with_one_feature_network() -> None:
    """Three networks take ~3 min of one core to train on the 2-core CPU: the whole `make tune` budget."""
    from mrigen.train.configs import build_configs
    from mrigen.tune.study import list_studies, load_study

    for name in list_studies():
        spec = load_study(name)
        _, train_cfg = build_configs(spec.family, spec.base, spec.demo_budget.layer())
        assert train_cfg.eval_feature_nets == 1, name


def test_the_train_command_trains_the_network_beside_the_model(fresh_store, two_threads, tmp_path, monkeypatch):
    """`python -m mrigen.train` with a final evaluation on a CPU: the network comes from the background process."""
    from mrigen.train.__main__ import main

    jobs = []
    start_feature_net = background.start_feature_net

    def start(store, device, members=None):
        jobs.append(start_feature_net(store, device, members))
        return jobs[-1]

    monkeypatch.setattr(background, "start_feature_net", start)
    monkeypatch.setattr(features, "train_feature_net", _never_train)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(["--data", str(fresh_store.path), "--model", "vae", "--epochs", "1", "--out", str(tmp_path / "run"),
                 "--set", "model.blocks=3", "--set", "train.batch_size=16", "--set", "train.eval_samples=40"])
    assert code == 0 and len(jobs) == 1 and jobs[0].cached and not jobs[0].running
    assert cache_path(fresh_store).is_file() and torch.get_num_threads() == 2
