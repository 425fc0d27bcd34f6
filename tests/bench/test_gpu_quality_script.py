"""bench/gpu_quality.sh (the device call's quality section): prepares once, then starts the three benchmarks side by
side under their own limits, shows each one's output and fails when one fails. Checked with a stand-in Python that
records its arguments, so the script's own logic runs in a second (the benchmarks have their own tests)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Stand-in for python3: logs "start <t> <args>" / "end <t> <script>"; the benchmarks print a line, sleep 1 s (so
# side-by-side runs overlap) and exit with $FAIL_<script stem> (default 0).
FAKE_PY = """#!/usr/bin/env bash
script=$(basename "$1" .py)
echo "start $(date +%s.%N) $*" >> "$CALLS"
[ "$script" = prepare ] && { echo "prepared"; exit "${FAIL_prepare:-0}"; }
echo "$script output: $*"
sleep "${SLEEP:-1}"
echo "end $(date +%s.%N) $script" >> "$CALLS"
fail="FAIL_$script"
exit "${!fail:-0}"
"""


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PY)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    full_env = {**os.environ, "PY": str(fake), "CALLS": str(calls), "OUT": str(tmp_path / "out"),
                "WORK": str(tmp_path / "work"), **env}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_quality.sh")], capture_output=True, text=True,
                          timeout=60, env=full_env, cwd=tmp_path)
    return done, [line.split() for line in calls.read_text().splitlines()] if calls.exists() else []


def test_prepares_once_then_runs_the_three_benchmarks_side_by_side(tmp_path):
    done, calls = _run(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    starts = [c for c in calls if c[0] == "start"]
    assert starts[0][2:] == ["bench/prepare.py", "--mode", "gpu", "--work", str(tmp_path / "work")]
    runs = {(c[2], c[c.index("--family") + 1] if "--family" in c else None): c for c in starts[1:]}
    assert set(runs) == {("bench/quality.py", "vqvae"), ("bench/quality.py", "vae"), ("bench/utility.py", None)}
    assert all(c[c.index("--mode") + 1] == "gpu" and "--autoguidance-sweep" not in c for c in runs.values())
    assert str(tmp_path / "out" / "utility") in runs[("bench/utility.py", None)]
    # side by side: every benchmark started before the first one ended
    first_end = min(float(c[1]) for c in calls if c[0] == "end")
    assert all(float(c[1]) < first_end for c in starts[1:])
    for name in ("quality-vqvae", "quality-vae", "utility"):            # each one's output is kept and shown
        assert (tmp_path / "out" / f"{name}.txt").read_text().startswith(("quality output", "utility output"))
        assert f"== {name}" in done.stdout


def test_a_failed_benchmark_fails_the_script_but_the_others_still_report(tmp_path):
    done, _ = _run(tmp_path, FAIL_utility="3")
    assert done.returncode == 1
    assert "quality output" in done.stdout and "utility output" in done.stdout


def test_a_benchmark_past_its_limit_is_stopped(tmp_path):
    done, calls = _run(tmp_path, SLEEP="20", LIMIT="2")
    assert done.returncode == 1
    assert not [c for c in calls if c[0] == "end"]                     # none ran its 20 s
    assert "all three done in" in done.stdout


def test_a_failed_preparation_starts_nothing(tmp_path):
    done, calls = _run(tmp_path, FAIL_prepare="1")
    assert done.returncode == 1 and "prepare failed" in done.stdout
    assert len(calls) == 1


def test_smoke_mode_passes_tiny_sizes(tmp_path):
    done, calls = _run(tmp_path, MODE="cpu", SMOKE="1")
    assert done.returncode == 0, done.stdout + done.stderr
    quality = [c for c in calls if c[0] == "start" and c[2] == "bench/quality.py"]
    assert len(quality) == 2 and all("--autoguidance-sweep" in c and "--mode" in c and "cpu" in c for c in quality)
