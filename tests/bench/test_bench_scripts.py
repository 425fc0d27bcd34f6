"""The benchmarks under bench/ still run and print well-formed figures (tiny sizes; timings are not checked)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.slow


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_train_throughput_prints_whole_steady_and_fixed_figures(tmp_path):
    out = tmp_path / "rows.jsonl"
    _run(str(BENCH / "train_throughput.py"), "--device", "cpu", "--size", "64", "--batch", "16", "--n", "64",
         "--epochs", "3", "--json", str(out))
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["device"] == "cpu" and row["epochs"] == 3
    for key in ("bare_img_s", "mrigen_img_s", "ratio", "epoch_wall_ratio", "epoch_ratio"):
        assert row[key] > 0, key
    assert math.isfinite(row["head_s"]) and row["tail_s"] > 0  # the tail holds at least the model save
    m, b = row["mrigen_img_s"], row["bare_img_s"]                 # rounded to whole img/s: a busy machine gives
    assert (m - 0.5) / (b + 0.5) <= row["ratio"] <= (m + 0.5) / (b - 0.5)   # single digits, so bound the rounding


def test_train_throughput_takes_a_recipe_and_a_layout(tmp_path):
    """--config: the recipe's model and loss in both loops; --contiguous: NCHW instead of channels_last."""
    out = tmp_path / "rows.jsonl"
    _run(str(BENCH / "train_throughput.py"), "--device", "cpu", "--size", "32", "--batch", "16", "--n", "32",
         "--epochs", "2", "--config", str(BENCH.parent / "experiments/configs/vae-recommended.yaml"), "--contiguous",
         "--json", str(out))
    row = json.loads(out.read_text().splitlines()[-1])
    assert (row["family"], row["layout"]) == ("vae", "contiguous") and row["config"].endswith("vae-recommended.yaml")
    assert row["bare_img_s"] > 0 and row["mrigen_img_s"] > 0


def test_ingest_bench_prints_the_target_ratio(tmp_path):
    text = _run(str(BENCH / "ingest.py"), "--volumes", "2", "--workers", "2", "--repeats", "1",
                "--cohort", str(tmp_path / "cohort"))
    ratio = [line for line in text.splitlines() if line.startswith("ratio ingest / (bare / workers)")]
    assert len(ratio) == 1 and float(ratio[0].split(":")[1].split()[0]) > 0
    assert "ISA-L" in text and len(list((tmp_path / "cohort").glob("IXI*-T1.nii.gz"))) == 2


def test_quality_bench_prints_the_table_and_checks_targets(tmp_path):
    text = _run(str(BENCH / "quality.py"), "--mode", "cpu", "--subjects", "6", "--epochs", "1", "--prior-steps", "5",
                "--samples", "20", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                "--autoguidance-sweep", "1,2")
    rows = [line for line in text.splitlines() if line.startswith(("| vqvae |", "| vae |"))]
    assert len(rows) == 2
    assert any(line.startswith("vqvae target: psnr") for line in text.splitlines())
    # each family's figures are printed (and results.json written) as soon as it is done: a run cut short keeps them
    assert any(line.startswith("vqvae: trained") and "fd_ratio" in line for line in text.splitlines())
    assert not (tmp_path / "out" / "results.json.tmp").exists()
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    for family in ("vqvae", "vae"):
        assert {"ssim", "psnr", "fd_ratio", "memorised", "wall_s"} <= set(results[family]), family
        assert (tmp_path / "out" / f"{family}.png").is_file()
    # the guided VAE is also evaluated at the sweep's other weights (2 is the recipe's own: its row is the table's)
    assert "autoguidance_sweep" not in results["vqvae"]
    sweep = results["vae"]["autoguidance_sweep"]
    assert [r["w"] for r in sweep] == [1.0] and 0 < sweep[0]["fd_ratio"] and (tmp_path / "out" / "vae-w1.png").is_file()
    assert "| 1 | " in text
    for family in ("vqvae", "vae"):                    # each prior's held-out curve, and where it was lowest
        curve = results[family]["prior_curve"]
        assert [r["step"] for r in curve] == [1, 2, 3, 4, 5] and all(math.isfinite(r["val_loss"]) for r in curve)
        assert any(line.startswith(f"{family} prior: held-out loss") for line in text.splitlines())


def _quality_module():
    sys.path.insert(0, str(BENCH))
    try:
        import quality
    finally:
        sys.path.remove(str(BENCH))
    return quality


def test_autoguidance_sweep_weights_are_parsed_and_checked():
    import argparse

    parse = _quality_module().parse_weights
    assert parse("1,1.5, 3") == (1.0, 1.5, 3.0) and parse("") == ()
    for bad in ("0.5", "1,x"):
        with pytest.raises(argparse.ArgumentTypeError, match=bad):
            parse(bad)


@pytest.mark.parametrize("family", ["vqvae", "vae"])
@pytest.mark.parametrize("mode", ["cpu", "gpu"])
def test_recommended_configs_build_for_every_mode(family, mode):
    sys.path.insert(0, str(BENCH))
    try:
        import quality
    finally:
        sys.path.remove(str(BENCH))
    model_cfg, train_cfg = quality.recommended(family, mode)
    assert model_cfg.family == family and model_cfg.image_size == quality.MODES[mode]["size"]
    assert train_cfg.final_eval and model_cfg.grid_size in (8, 16)


@pytest.mark.parametrize("recipe", ["conditional", "vae-conditional", "unconditional"])
def test_utility_recipes_build_and_the_conditional_ones_condition_only_their_prior(recipe):
    sys.path.insert(0, str(BENCH))
    try:
        import quality
        import utility
    finally:
        sys.path.remove(str(BENCH))
    family, name = utility.RECIPES[recipe]
    model_cfg, _ = quality.recommended(family, "cpu", name)
    assert model_cfg.family == family
    assert bool(model_cfg.conditions) == (recipe != "unconditional") and not model_cfg.autoencoder_conditioned


def test_metric_sensitivity_scores_every_degradation(tmp_path):
    from mrigen.data import build_demo_store
    from mrigen.metrics.pretext import DEGRADATIONS

    store = build_demo_store(tmp_path / "work", subjects=6, size=32, progress=False)
    text = _run(str(BENCH / "metric_sensitivity.py"), "--store", str(store.path), "--samples", "20")
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert set(DEGRADATIONS) <= set(rows)
    assert "precision_real" in text
    text = _run(str(BENCH / "metric_sensitivity.py"), "--store", str(store.path), "--samples", "20",
                "--failures", "test", "--seeds", "2")
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert {"clean", "blotches", "code_errors"} <= set(rows) and "+-" in rows["blotches"]


def test_metric_sensitivity_under_several_feature_networks(tmp_path, monkeypatch):
    """--feature-seeds: every row scored under each seed's network (mean +- half range), the ordering verdict
    printed, and the store's cached network left alone; a model directory gets a row of its own."""
    monkeypatch.setenv("MRIGEN_FEATURE_NET_STEPS", "40")          # the script's subprocess inherits it
    from mrigen.data import build_demo_store
    from mrigen.metrics import cache_path
    from mrigen.models import build_model
    from mrigen.models.config import ModelConfig
    from mrigen.models.io import save_model

    store = build_demo_store(tmp_path / "work", subjects=6, size=32, progress=False)
    model_dir = tmp_path / "untrained"
    save_model(build_model(ModelConfig(family="vae", image_size=32, blocks=3)), model_dir)
    text = _run(str(BENCH / "metric_sensitivity.py"), "--store", str(store.path), "--samples", "20",
                "--feature-seeds", "0,1", "--model", f"untrained={model_dir}")
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "untrained" in rows and all("+-" in rows[name] for name in ("clean", "blur", "untrained"))
    per_net = rows["blur"].rstrip(" |").rsplit("|", 1)[1].split(" / ")     # the last cell: one fd_ratio per network
    assert len(per_net) == 2 and all(float(v) > 0 for v in per_net)
    assert "seeds [0, 1]" in text and "than clean slices" in text
    assert not cache_path(store).exists()
    bad = subprocess.run([sys.executable, str(BENCH / "metric_sensitivity.py"), "--store", str(store.path),
                          "--feature-seeds", "0,0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "'0,0': a seed is repeated" in bad.stderr
