"""bench/utility.py still runs end to end and prints its table and target lines (tiny sizes; slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_utility_bench_trains_the_recipe_and_prints_the_table(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "utility.py"), "--mode", "cpu", "--subjects", "6",
                           "--epochs", "1", "--prior-steps", "5", "--task", "slice_pos", "--seeds", "2",
                           "--synthetic", "8,16", "--steps", "3", "--work", str(tmp_path / "work"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| slice_pos | mae |" in done.stdout and "target slice_pos: TSTR" in done.stdout
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["complete"] is True and not (tmp_path / "out" / "results.json.tmp").exists()
    results = written["results"]
    assert results["slice_pos"]["label_source"] == "requested"          # the default recipe is conditional
    assert results["slice_pos"]["n_synthetic"] == 16 and (tmp_path / "out" / "utility_slice_pos.png").is_file()
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
