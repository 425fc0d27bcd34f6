"""What the command-line tools print when their output goes through a pipe (a log file, CI, `| tee`): the lines a
person reads, no carriage-return progress bars, no MLflow / Optuna INFO chatter, nothing twice; `-v` brings the
details back (issue 12, section 2). Real subprocesses with pipes, on the small session stores."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# `python -m mrigen.tune` with the final evaluation faked (as `fake_eval` does in-process): the real CLI, its real
# logging set-up and a real pipe, without training a feature network.
_TUNE_FAKE_EVAL = textwrap.dedent("""
    import sys
    import mrigen.metrics

    def evaluate(model, store, split="val", **kwargs):
        return {"ssim": 0.5, "psnr": 20.0, "fd": 1.0, "fd_real": 0.5, "fd_ratio": 2.0, "precision": 0.6,
                "recall": 0.5, "precision_real": 0.7, "recall_real": 0.7, "diversity": 0.3, "diversity_real": 0.3,
                "memorised": 0.0}

    mrigen.metrics.evaluate = evaluate
    from mrigen.tune.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")
MLFLOW_INFO = re.compile(r"\bINFO\b.*\bmlflow\b|\bINFO mlflow")       # MLflow's own format or ours with -v
OPTUNA_INFO = re.compile(r"^\[I \d{4}-")                              # Optuna's "[I 2026-11-27 ...] ..." lines


def _env() -> dict[str, str]:
    drop = ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "MLFLOW_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path, timeout: int = 300) -> str:
    """Run a command with stdout and stderr into one pipe, as `cmd 2>&1 | tee out.txt` does; return the text."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def _no_noise(out: str) -> None:
    lines = out.splitlines()
    assert "\r" not in out, "carriage-return progress bar in piped output"
    assert not [line for line in lines if MLFLOW_INFO.search(line)], out
    assert not [line for line in lines if OPTUNA_INFO.match(line)], out
    assert "Downloading artifacts" not in out


def test_data_demo_and_ingest_print_one_line_each(tmp_path: Path) -> None:
    out = _run(["-m", "mrigen.data", "demo", "--out", "ixi", "--subjects", "6", "--voxel-scale", "4"], tmp_path)
    out += _run(["-m", "mrigen.data", "ingest", "--ixi", "ixi", "--out", "store", "--size", "32"], tmp_path)
    _no_noise(out)
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert lines[0].startswith("demo: 6 T1 volumes") and lines[1].startswith("ingest: 6 T1 volumes")


def test_train_through_a_pipe_prints_epoch_lines_and_v_shows_mlflow(tune_store, tmp_path: Path) -> None:
    args = ["-m", "mrigen.train", "--data", str(tune_store.path), "--epochs", "2", "--set", "model.blocks=3",
            "--set", "train.batch_size=16", "--set", "train.final_eval=false"]
    out = _run([*args, "--out", "quiet", "--tracking-uri", f"sqlite:///{tmp_path / 'quiet.db'}"], tmp_path)
    _no_noise(out)
    lines = out.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert lines[-1].startswith("trained vae for 2 epochs") and len(lines) <= 6, out
    detailed = _run([*args, "--out", "verbose", "--tracking-uri", f"sqlite:///{tmp_path / 'verbose.db'}", "-v"],
                    tmp_path)
    assert "\r" not in detailed                          # -v shows details, not bars, in a pipe
    assert [line for line in detailed.splitlines() if MLFLOW_INFO.search(line)], detailed   # e.g. DB migration


def test_tune_through_a_pipe_prints_epochs_summary_and_next_steps(tiny_study, tune_store, tmp_path: Path) -> None:
    wrapper = tmp_path / "tune_fake_eval.py"
    wrapper.write_text(_TUNE_FAKE_EVAL)
    out = _run([str(wrapper), "--study", str(tiny_study), "--data", str(tune_store.path), "--work-dir", "work",
                "--n-trials", "2"], tmp_path, timeout=600)
    _no_noise(out)
    lines = out.splitlines()
    assert len([line for line in lines if re.match(r"\[w0\] trial \d/2 epoch 1/1 ", line)]) == 2, out
    assert any(line.split()[:2] == ["trial", "state"] for line in lines)              # the summary table
    assert any("python -m mrigen.generate --model models:/mrigen-tiny@champion" in line for line in lines)
    assert not [line for line in lines if "MLflow run" in line or "logged model" in line]   # per-run details: -v
    assert len(lines) <= 25, out


def test_feature_net_bar_is_not_drawn_into_a_pipe(tune_store, capsys) -> None:
    """The feature network trains inside the final evaluation, where no command passes `progress`."""
    from mrigen.metrics import FeatureNetConfig, train_feature_net

    train_feature_net(tune_store, FeatureNetConfig(steps=3))
    err = capsys.readouterr().err
    # no bar (tqdm draws "NN%|###|" and rewrites it with \r); the one-line summary may be logged when an earlier
    # in-process command has set up mrigen's log handler
    assert "\r" not in err and "%|" not in err


@pytest.mark.parametrize("flags, mrigen_level, library_level", [([], "INFO", "WARNING"), (["-v"], "INFO", "INFO"),
                                                                  (["--log-level", "debug"], "DEBUG", "DEBUG")])
def test_log_flags_set_the_levels(flags: list[str], mrigen_level: str, library_level: str, monkeypatch) -> None:
    import argparse
    import logging

    from mrigen import logs

    for var in ("MLFLOW_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.delenv(var, raising=False)
    saved = {n: logging.getLogger(n).level for n in ("", "mrigen", *logs.LIBRARIES)}
    parser = argparse.ArgumentParser()
    logs.add_arguments(parser)
    try:
        logs.setup(parser.parse_args(flags))
        assert logging.getLogger("mrigen.tune").getEffectiveLevel() == getattr(logging, mrigen_level)
        assert logging.getLogger("mlflow").level == getattr(logging, library_level)
        assert logging.getLogger("urllib3").getEffectiveLevel() == getattr(logging, library_level)
        # SQLAlchemy's mapper / engine INFO lines only when a level is asked for by name
        internals = "DEBUG" if "--log-level" in flags else "WARNING"
        assert logging.getLogger("sqlalchemy.orm.mapper.Mapper").getEffectiveLevel() == getattr(logging, internals)
        assert os.environ["MLFLOW_LOGGING_LEVEL"] == library_level
        assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == ("true" if flags == ["-v"] else "false")
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def test_quiet_loggers_are_details_only_for_the_command_that_asks() -> None:
    """`tune` hides per-run tracking lines; a later set-up in the same process (another command) shows them."""
    import logging

    from mrigen import logs

    try:
        logs.setup(None, quiet=("mrigen.tracking",))
        assert logging.getLogger("mrigen.tracking.hook").getEffectiveLevel() == logging.WARNING
        logs.setup(None)
        assert logging.getLogger("mrigen.tracking.hook").getEffectiveLevel() == logging.INFO
    finally:
        logging.getLogger("mrigen.tracking").setLevel(logging.NOTSET)
