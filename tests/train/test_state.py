"""Checkpoints: tensors and nested optimiser state survive a save/load round trip without pickle."""

from __future__ import annotations

import threading

import pytest
import torch

import mrigen.train.state as state_mod
from mrigen.train.state import CheckpointError, CheckpointWriter, load_checkpoint, save_checkpoint


def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = model(torch.randn(8, 4)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt, meta={"epoch": 2, "history": [{"a": 1.0}]})
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("ckpt/*.pt"))

    torch.manual_seed(1)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    meta = load_checkpoint(tmp_path / "ckpt", model=model2, optimizer=opt2)
    assert meta == {"epoch": 2, "history": [{"a": 1.0}]}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])


def test_rewriting_a_checkpoint_replaces_it_atomically(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "c", model=model, optimizer=opt, meta={"epoch": 0})
    save_checkpoint(tmp_path / "c", model=model, optimizer=opt, meta={"epoch": 1})
    assert load_checkpoint(tmp_path / "c", model=model, optimizer=opt) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_resumed_optimizer_state_has_the_strides_of_channels_last_params(tmp_path):
    """CUDA's fused Adam needs state and params in one layout; safetensors stores tensors contiguous."""
    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 4, 3))
        m = m.to(memory_format=torch.channels_last)
        return m, torch.optim.Adam(m.parameters(), lr=1e-3)

    model, opt = make()
    x = torch.rand(2, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c", model=model, optimizer=opt, meta={})
    model2, opt2 = make()
    load_checkpoint(tmp_path / "c", model=model2, optimizer=opt2)
    for p in model2.parameters():
        for name in ("exp_avg", "exp_avg_sq"):
            state = opt2.state[p][name]
            assert state.stride() == p.stride()
            assert torch.equal(state, opt.state[dict(zip(model2.parameters(), model.parameters()))[p]][name])


def _trained_linear() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(8, 4)).pow(2).sum().backward()
    opt.step()
    return model, opt


def test_background_writer_saves_the_state_as_it_was_at_submit(tmp_path, monkeypatch):
    model, opt = _trained_linear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meta = {"epoch": 0, "history": [{"loss": 1.0}]}
    release = threading.Event()
    real_save = state_mod.save_file

    def held_save(*args, **kwargs):  # the write starts only once training has moved on
        assert release.wait(30)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(state_mod, "save_file", held_save)
    writer = CheckpointWriter()
    writer.submit(tmp_path / "c", model=model, optimizer=opt, meta=meta)
    with torch.no_grad():  # training goes on while the write runs: the checkpoint must not see it
        for p in model.parameters():
            p.add_(1.0)
    opt.state[next(model.parameters())]["exp_avg"].add_(1.0)
    meta["history"].append({"loss": 0.5})
    release.set()
    writer.wait()
    model2, opt2 = _trained_linear()
    assert load_checkpoint(tmp_path / "c", model=model2, optimizer=opt2) == {"epoch": 0, "history": [{"loss": 1.0}]}
    for k, v in model2.state_dict().items():
        assert torch.equal(v, before[k])
    p2 = next(model2.parameters())
    assert torch.equal(opt2.state[p2]["exp_avg"] + 1.0, opt.state[next(model.parameters())]["exp_avg"])
    writer.submit(tmp_path / "c", model=model, optimizer=opt, meta={"epoch": 1})  # the next one replaces it
    writer.wait()
    assert load_checkpoint(tmp_path / "c", model=model2, optimizer=opt2) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_background_write_failure_is_raised_by_wait(tmp_path, monkeypatch):
    model, opt = _trained_linear()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_mod, "save_file", full_disk)
    writer = CheckpointWriter()
    writer.submit(tmp_path / "c", model=model, optimizer=opt, meta={})
    with pytest.raises(CheckpointError, match="No space left on device"):
        writer.wait()
    writer.wait()  # reported once
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []
