"""Training loop: validation, hooks, early stop, exact resume, VQ-VAE prior stage, CLI outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import math

import pytest
import torch

from mrigen.train import Hook, StopTraining, TrainConfig, train
from mrigen.train.configs import build_configs, parse_overrides
from mrigen.train.state import CheckpointError

SMALL = {"image_size": 32, "blocks": 3}
FAST = {"batch_size": 16, "final_eval": False, "grid_every": 0, "prior_steps": 40, "lr": 1e-3}


def configs(family="vae", epochs=2, **train_kw):
    return build_configs(family, {"model": SMALL, "train": {**FAST, "epochs": epochs, **train_kw}})


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("beta", -1.0),
                                         ("recon", "huber"), ("amp", "fp8"), ("free_bits", -0.1),
                                         ("prior_steps", -1), ("spectral_weight", -0.5),
                                         ("eval_feature_nets", -1)])
def test_invalid_train_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_unknown_config_key_is_refused():
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="SECTION.FIELD"):
        parse_overrides(["lr=1"])


def test_overrides_read_exponent_floats_and_text_in_a_number_field_is_named(tmp_path):
    """`--set train.lr=1e-4` (the --help example; PyYAML alone reads '1e-4' as text) is a float, in a run config
    file too; a word where a number belongs is a ValueError naming the field, not a TypeError from a comparison."""
    from mrigen.train.configs import load_config_file

    layer = parse_overrides(["train.lr=1e-4", "train.beta=2E-1", "model.kernel_size=3"])
    assert layer == {"model": {"kernel_size": 3}, "train": {"lr": 1e-4, "beta": 0.2}}
    (tmp_path / "run.yaml").write_text("train: {lr: 5e-4, prior_lr: 2.0e-3}\n")
    _, train_cfg = build_configs("vae", load_config_file(tmp_path / "run.yaml"), layer)
    assert (train_cfg.lr, train_cfg.prior_lr, train_cfg.beta) == (1e-4, 2e-3, 0.2)
    with pytest.raises(ValueError, match=r"TrainConfig.lr='fast' must be a number"):
        build_configs("vae", parse_overrides(["train.lr=fast"]))
    with pytest.raises(ValueError, match=r"ModelConfig.kernel_size='3x3' must be an integer"):
        build_configs("vae", parse_overrides(["model.kernel_size=3x3"]))
    with pytest.raises(ValueError, match=r"--set 'train.lr=\[': the value is not a YAML"):
        parse_overrides(["train.lr=["])
    with pytest.raises(ValueError, match="not a YAML"):                  # still a safe loader: no Python objects
        parse_overrides(["train.lr=!!python/object/apply:os.getcwd []"])


def test_vae_validation_loss_decreases_and_metrics_are_finite(demo_store):
    model_cfg, train_cfg = configs(epochs=3)
    result = train(model_cfg, train_cfg, demo_store, progress=False)
    losses = [h["val_loss"] for h in result.history]
    assert len(losses) == 3
    assert losses[-1] < losses[0]
    for h in result.history:
        assert all(torch.isfinite(torch.tensor(v)) for v in h.values())
        assert 0.0 <= h["val_ssim"] <= 1.0
        assert 0 <= h["active_units"] <= model_cfg.latent_dim


def test_resume_continues_the_same_loss_curve(demo_store, tmp_path):
    model_cfg, train_cfg = configs(epochs=3)
    straight = train(model_cfg, train_cfg, demo_store, out_dir=tmp_path / "a", progress=False)
    _, two = configs(epochs=2)
    train(model_cfg, two, demo_store, out_dir=tmp_path / "b", progress=False)
    resumed = train(model_cfg, train_cfg, demo_store, out_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed.epochs_run == 3
    for a, b in zip(straight.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_a_crash_mid_run_leaves_the_last_checkpoint_whole_and_resumable(demo_store, tmp_path):
    """Checkpoints are written in the background; a failure in training waits for the write, then propagates."""
    class Crash(Hook):
        def on_epoch_end(self, ctx, epoch, metrics):
            if epoch == 1:
                raise RuntimeError("power cut")

    model_cfg, train_cfg = configs(epochs=3, checkpoint_every_s=0)
    with pytest.raises(RuntimeError, match="power cut"):
        train(model_cfg, train_cfg, demo_store, out_dir=tmp_path, hooks=[Crash()], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temporary directory left behind
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["state.json", "state.safetensors"]
    resumed = train(model_cfg, train_cfg, demo_store, out_dir=tmp_path, resume=True, progress=False)
    straight = train(model_cfg, train_cfg, demo_store, progress=False)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    for a, b in zip(straight.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_a_failed_background_write_does_not_hide_the_training_error(demo_store, tmp_path, monkeypatch):
    import mrigen.train.state as state_mod

    class Crash(Hook):
        def on_epoch_end(self, ctx, epoch, metrics):
            if epoch == 1:
                raise RuntimeError("power cut")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_mod, "save_file", full_disk)
    model_cfg, train_cfg = configs(epochs=3, checkpoint_every_s=0)
    with pytest.raises(RuntimeError, match="power cut") as err:
        train(model_cfg, train_cfg, demo_store, out_dir=tmp_path, hooks=[Crash()], progress=False)
    assert any("No space left on device" in note for note in err.value.__notes__)
    with pytest.raises(CheckpointError, match="No space left on device"):  # without a crash, the write error itself
        train(model_cfg, train_cfg, demo_store, out_dir=tmp_path / "b", progress=False)


def test_resume_with_another_config_is_refused(demo_store, tmp_path):
    model_cfg, train_cfg = configs(epochs=1)
    train(model_cfg, train_cfg, demo_store, out_dir=tmp_path, progress=False)
    _, other = configs(epochs=2, lr=3e-4)
    with pytest.raises(CheckpointError, match="another config"):
        train(model_cfg, other, demo_store, out_dir=tmp_path, resume=True, progress=False)


def test_resume_without_checkpoint_is_a_clear_error(demo_store, tmp_path):
    model_cfg, train_cfg = configs(epochs=1)
    with pytest.raises(CheckpointError, match="no state.json"):
        train(model_cfg, train_cfg, demo_store, out_dir=tmp_path, resume=True, progress=False)


def test_hook_can_stop_training_early(demo_store):
    class StopAtFirst(Hook):
        seen: list = []

        def on_epoch_end(self, ctx, epoch, metrics):
            self.seen.append(epoch)
            raise StopTraining("enough")

        def on_end(self, ctx, result):
            self.ended = result

    hook = StopAtFirst()
    model_cfg, train_cfg = configs(epochs=5)
    result = train(model_cfg, train_cfg, demo_store, hooks=[hook], progress=False)
    assert result.stopped_early and result.stop_reason == "enough"
    assert result.epochs_run == 1 and hook.seen == [0]
    assert hook.ended is result


def test_vqvae_trains_its_prior_and_can_sample(demo_store, tmp_path):
    from mrigen.train import LocalLogger

    model_cfg, train_cfg = configs("vqvae", epochs=1)
    result = train(model_cfg, train_cfg, demo_store, hooks=[LocalLogger(tmp_path)], progress=False)
    assert len(result.extra["prior_loss"]) == 20                  # one point per twentieth of prior_steps
    assert result.extra["prior_loss"][-1] < result.extra["prior_loss"][0]
    assert result.extra["prior_val_nll"] is not None and math.isfinite(result.extra["prior_val_nll"])
    # the prior's curves go to the hooks: by prior step, training and held-out loss, next to the epoch history
    rows = json.loads((tmp_path / "prior_history.json").read_text())
    assert rows == result.prior_curve and [r["step"] for r in rows] == list(range(2, 41, 2))
    assert [r["train_loss"] for r in rows] == result.extra["prior_loss"]
    kept = result.extra["prior_kept_step"]                       # train.prior_keep_best (on by default)
    held_out = {r["step"]: r["val_loss"] for r in rows}
    assert result.extra["prior_val_nll"] == held_out[kept if kept is not None else 40]
    samples = result.model.sample(4, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 1, 32, 32)
    assert float(samples.min()) >= 0.0 and float(samples.max()) <= 1.0
    assert "val_perplexity" in result.history[0]


@pytest.mark.parametrize("family", ["vae", "vqvae"])
def test_the_local_spectrum_term_reaches_the_training_loss(demo_store, family):
    plain = train(*configs(family, epochs=1, prior_steps=0), demo_store, progress=False)
    spectral = train(*configs(family, epochs=1, prior_steps=0, spectral_weight=0.05), demo_store, progress=False)
    first, second = plain.history[0]["train_loss"], spectral.history[0]["train_loss"]
    assert math.isfinite(second) and second > first       # the same seed and batches, plus a term >= 0


def test_image_size_mismatch_is_refused(demo_store):
    model_cfg, train_cfg = build_configs("vae", {"model": {"image_size": 64, "blocks": 3}})
    with pytest.raises(ValueError, match="image_size=64"):
        train(model_cfg, train_cfg, demo_store, progress=False)


def test_final_evaluation_reports_quality_metrics(demo_store):
    model_cfg, train_cfg = configs(epochs=1, final_eval=True)
    result = train(model_cfg, train_cfg, demo_store, progress=False)
    for key in ("ssim", "psnr", "fd", "fd_real", "precision", "recall", "diversity"):
        assert key in result.val_metrics


def test_final_evaluation_averages_the_configured_number_of_feature_networks(demo_store, monkeypatch):
    """`train.eval_feature_nets` reaches `evaluate` (0 = the default ensemble: None)."""
    import mrigen.metrics

    asked = []

    def fake_evaluate(model, store, split, **kwargs):
        asked.append(kwargs["feature_nets"])
        return {"ssim": 0.5}

    monkeypatch.setattr(mrigen.metrics, "evaluate", fake_evaluate)
    for nets in (0, 2):
        model_cfg, train_cfg = configs(epochs=1, final_eval=True, eval_feature_nets=nets)
        assert train(model_cfg, train_cfg, demo_store, progress=False).val_metrics == {"ssim": 0.5}
    assert asked == [None, 2]


def test_cli_writes_metrics_model_grids_and_curves(demo_store, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mrigen.train", "--data", str(demo_store.path), "--model", "vae",
           "--epochs", "2", "--out", str(out), "--set", "model.blocks=3",           # image size from the store
           "--set", "train.batch_size=16", "--set", "train.grid_every=1", "--set", "train.final_eval=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and "val_ssim" in metrics["val"]
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "loss_curves.png").is_file()
    assert (out / "grids" / "reconstruction_epoch_000.png").is_file()
    assert (out / "grids" / "samples_epoch_001.png").is_file()


def test_cli_explicit_image_size_must_match_the_store(demo_store, tmp_path):
    cmd = [sys.executable, "-m", "mrigen.train", "--data", str(demo_store.path), "--set", "model.image_size=64",
           "--set", "model.blocks=3", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "image_size=64" in proc.stderr and "32x32" in proc.stderr


def test_cli_bad_override_is_one_line_error(demo_store, tmp_path):
    cmd = [sys.executable, "-m", "mrigen.train", "--data", str(demo_store.path), "--set", "model.kernel_size=7",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "kernel_size" in proc.stderr
    cmd = [sys.executable, "-m", "mrigen.train", "--data", str(demo_store.path), "--set", "train.lr=fast",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: TrainConfig.lr='fast' must be a number"


@pytest.mark.parametrize("family", ["vae", "vqvae"])
def test_conditional_training_banks_the_training_rows_and_samples_under_conditions(demo_store, family):
    names = ("slice_pos", "site", "age", "sex")
    model_cfg, train_cfg = build_configs(family, {"model": {**SMALL, "conditions": list(names)},
                                                  "train": {**FAST, "epochs": 1, "grid_every": 1}})
    grids = []

    class Grids(Hook):
        def on_images(self, ctx, epoch, images):
            grids.append(images)

    result = train(model_cfg, train_cfg, demo_store, hooks=[Grids()], progress=False)
    emb = result.model.condition_embedding
    from mrigen.models.condition import encode_rows

    banked = emb.training_rows()
    expected = encode_rows(names, demo_store.slices("train"))
    assert torch.equal(banked, expected)                       # small store: every training row is banked
    assert "samples" in grids[-1]
    x = result.model.sample(3, generator=torch.Generator().manual_seed(0),
                            conditions=[{"slice_pos": 0.5, "site": "HH", "age": None, "sex": None}] * 3)
    assert x.shape == (3, 1, 32, 32) and torch.isfinite(x).all()


def test_conditioning_on_an_attribute_the_store_lacks_is_refused(demo_store):
    class NoAges:
        def __getattr__(self, name):
            return getattr(demo_store, name)

        def slices(self, split):
            return [{**row, "age": None} for row in demo_store.slices(split)]

    model_cfg, train_cfg = build_configs("vae", {"model": {**SMALL, "conditions": ["age"]},
                                                 "train": {**FAST, "epochs": 1}})
    with pytest.raises(ValueError, match="conditions includes age but no training slice .* has a value"):
        train(model_cfg, train_cfg, NoAges(), progress=False)
