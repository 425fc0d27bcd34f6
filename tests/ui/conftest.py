"""Fixtures for the MLflow UI browser test: Debian's chromium driven by Playwright, and a small study tracked on the
session's servers (`stack`: PostgreSQL + S3 + MLflow on loopback, from tests/conftest.py).

`MRIGEN_UI_SCREENSHOTS=DIR` makes the test save the screenshots shown in the README into DIR; the study then runs
with the real final evaluation at 64 px (slower, real numbers on screen) instead of 32 px and a fixed one.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

STUDY = "ui-demo"
STUDY_YAML = """
description: two tiny trials for the MLflow UI browser test
family: vae
base:
  model: {{blocks: 3}}
  train: {{batch_size: 16, grid_every: 1, eval_samples: 32}}
search_space:
  train.lr: {{type: float, low: 5.0e-4, high: 3.0e-3, log: true}}
objective: {{metric: val_ssim, direction: maximize}}
pruner: {{type: none}}
demo_budget: {{trials: {trials}, epochs: {epochs}, image_size: {size}}}
"""
# What the trials' final evaluation returns in the default (fast) mode: plausible values, no feature network.
FIXED_METRICS = {"ssim": 0.5, "psnr": 20.0, "fd": 1.0, "fd_real": 0.5, "fd_ratio": 2.0, "precision": 0.6,
                 "recall": 0.5, "precision_real": 0.7, "recall_real": 0.7, "diversity": 0.3, "diversity_real": 0.3,
                 "memorised": 0.0}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Record on the test item whether its call failed (the `page` fixture then keeps what the browser showed)."""
    report = yield
    if report.when == "call" and report.failed:
        item.failed = True
    return report


@pytest.fixture(scope="session")
def screenshot_dir() -> Path | None:
    """Where to save the README's screenshots (`MRIGEN_UI_SCREENSHOTS`), or None."""
    where = os.environ.get("MRIGEN_UI_SCREENSHOTS")
    return Path(where).resolve() if where else None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of the system Chromium; the browser tests skip (saying how to install it) when there is none."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on PATH: install Debian's package (apt-get install -y chromium; `make test` does "
                    "it when run as root); a browser downloaded by a Python package does not run here")
    return path


@dataclass(frozen=True)
class UiStudy:
    """A finished study on the session's MLflow server, and what the UI must show of it."""

    study: str                  # the study's name
    base_url: str               # http://127.0.0.1:PORT
    runs_page: str              # the "open ..." link `python -m mrigen.tune` printed
    experiment_id: str
    parent_id: str
    trial_ids: tuple[str, ...]
    store_name: str             # the slice store's dataset name, as the trials logged it
    grid: str                   # artifact path of a trial's last reconstruction grid
    grid_size: tuple[int, int]  # its (width, height) in pixels
    model_name: str
    champion_version: str


@pytest.fixture(scope="module")
def ui_study(chromium, stack, screenshot_dir, tmp_path_factory) -> UiStudy:
    """Run a study in-process against the session's MLflow server (`chromium` first: no browser, no study)."""
    from mlflow import MlflowClient
    from PIL import Image

    from mrigen.data import build_demo_store
    from mrigen.tune.__main__ import main

    real = screenshot_dir is not None
    size = 64 if real else 32
    tmp = tmp_path_factory.mktemp("ui-study")
    store = build_demo_store(tmp / "store", subjects=6, size=size, seed=0)
    study = tmp / f"{STUDY}.yaml"
    study.write_text(textwrap.dedent(STUDY_YAML.format(trials=3 if real else 2, epochs=3 if real else 1, size=size)))
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        for var in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "MLFLOW_REGISTRY_URI"):
            mp.delenv(var, raising=False)
        if not real:
            mp.setattr("mrigen.metrics.evaluate", lambda *args, **kwargs: dict(FIXED_METRICS))
        rc = main(["--study", str(study), "--data", str(store.path), "--work-dir", str(tmp / "work"),
                   "--storage", f"sqlite:///{tmp / 'work' / 'optuna.db'}", "--tracking-uri", stack.tracking_uri])
    printed = out.getvalue()
    assert rc == 0, printed[-3000:]
    link = re.search(r"compare trials:\s+open (\S+)", printed)
    assert link, f"no 'compare trials: open URL' line in the output:\n{printed[-2000:]}"

    client = MlflowClient(stack.tracking_uri, registry_uri=stack.tracking_uri)
    exp = client.get_experiment_by_name(f"mrigen-{STUDY}")
    parent = client.search_runs([exp.experiment_id], "tags.`mrigen.role` = 'study-parent'")[0]
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                order_by=["attributes.start_time ASC"])
    grids = sorted((a.path for a in client.list_artifacts(trials[0].info.run_id, "images")
                    if a.path.startswith("images/reconstruction+") and a.path.endswith(".png")),
                   key=lambda p: int(p.split("+step+")[1].split("+")[0]))
    assert grids, "the first trial logged no reconstruction grid"
    with Image.open(client.download_artifacts(trials[0].info.run_id, grids[-1], str(tmp))) as png:
        grid_size = png.size
    champion = client.get_model_version_by_alias(f"mrigen-{STUDY}", "champion")
    return UiStudy(study=STUDY, base_url=stack.tracking_uri.rstrip("/"), runs_page=link.group(1), experiment_id=exp.experiment_id,
                   parent_id=parent.info.run_id, trial_ids=tuple(t.info.run_id for t in trials),
                   store_name=trials[0].inputs.dataset_inputs[0].dataset.name, grid=grids[-1], grid_size=grid_size,
                   model_name=f"mrigen-{STUDY}", champion_version=champion.version)
