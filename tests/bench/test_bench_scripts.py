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
    assert row["ratio"] == pytest.approx(row["mrigen_img_s"] / row["bare_img_s"], rel=0.05)  # of rounded figures


def test_ingest_bench_prints_the_target_ratio(tmp_path):
    text = _run(str(BENCH / "ingest.py"), "--volumes", "2", "--workers", "2", "--repeats", "1",
                "--cohort", str(tmp_path / "cohort"))
    ratio = [line for line in text.splitlines() if line.startswith("ratio ingest / (bare / workers)")]
    assert len(ratio) == 1 and float(ratio[0].split(":")[1].split()[0]) > 0
    assert "ISA-L" in text and len(list((tmp_path / "cohort").glob("IXI*-T1.nii.gz"))) == 2
