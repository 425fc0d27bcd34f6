"""Study wall time: `python -m mrigen.tune` for N trials against N x the bare time of one trial.

The bare figure is one `mrigen.train.train()` call with the study's base config (first choice of every
categorical, geometric middle of every range), no Optuna, no MLflow, timed after a warm-up call in the same
process. The study figure is the whole command's wall time (process start, imports, Optuna storage, MLflow
parent/child runs, image grids, final evaluations, model logging and registration). Ratio = study / (N x bare);
with `--trials-per-gpu K > 1` trials run K at a time per GPU, so the ratio can drop below 1.

    python bench/study_wall.py --study vae-kernels --n-trials 3 --epochs 2 --size 64
    python bench/study_wall.py --study vae-kernels --data STORE --n-trials 20 --full --trials-per-gpu 1,4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mrigen.train import TrainConfig, train
from mrigen.train.configs import build_configs
from mrigen.tune.study import load_study


def middle_params(spec) -> dict[str, dict]:
    layer: dict[str, dict] = {"model": {}, "train": {}}
    for p in spec.space:
        if p.type == "categorical":
            value = p.choices[0]
        else:
            value = math.sqrt(p.low * p.high) if p.log else (p.low + p.high) / 2
            value = int(round(value)) if p.type == "int" else value
        section, _, name = p.name.partition(".")
        layer[section][name] = value
    return layer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="vae-kernels")
    p.add_argument("--data", type=Path, help="slice store (default: the demo cohort at --size)")
    p.add_argument("--size", type=int, help="image size (default: the budget's)")
    p.add_argument("--n-trials", type=int, default=3)
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the budget's)")
    p.add_argument("--full", action="store_true", help="use the study's full budget rather than demo_budget")
    p.add_argument("--trials-per-gpu", default="1", help="comma-separated K values to compare (GPU only)")
    p.add_argument("--no-tracking", action="store_true", help="run the study without MLflow")
    p.add_argument("--json", type=Path, help="append result rows as JSON lines to this file")
    args = p.parse_args()

    spec = load_study(args.study)
    budget = spec.budget if args.full else spec.demo_budget
    size = args.size or budget.image_size
    epochs = args.epochs or budget.epochs
    work = Path(tempfile.mkdtemp(prefix="study-wall-"))
    if args.data is None:
        from mrigen.data import build_demo_store

        store = build_demo_store(work / f"demo-{size}", size=size)
    else:
        from mrigen.data import SliceStore

        store = SliceStore.open(args.data)
    layer = middle_params(spec)
    layer["model"]["image_size"] = size
    layer["train"]["epochs"] = epochs
    model_cfg, train_cfg = build_configs(spec.family, spec.base, layer)
    train(model_cfg, TrainConfig(**{**train_cfg.__dict__, "epochs": 1}), store, progress=False)   # warm-up
    t0 = time.perf_counter()
    train(model_cfg, train_cfg, store, progress=False)
    bare = time.perf_counter() - t0

    cuda = torch.cuda.is_available()
    ks = [int(k) for k in args.trials_per_gpu.split(",")] if cuda else [1]
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    for k in ks:
        run_dir = work / f"k{k}"
        cmd = [sys.executable, "-m", "mrigen.tune", "--study", args.study, "--data", str(store.path),
               "--n-trials", str(args.n_trials), "--epochs", str(epochs), "--work-dir", str(run_dir)]
        if args.full:
            cmd.append("--full-budget")
        if cuda:
            cmd += ["--gpus", "0", "--trials-per-gpu", str(k)]
        env = {k_: v for k_, v in os.environ.items() if k_ not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")}
        if args.no_tracking:
            cmd.append("--no-tracking")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"study failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        row = {"device": device, "study": args.study, "size": size, "epochs": epochs, "n_trials": args.n_trials,
               "trials_per_gpu": k, "tracking": not args.no_tracking, "bare_trial_s": round(bare, 2),
               "study_wall_s": round(wall, 2), "ratio_vs_n_bare": round(wall / (args.n_trials * bare), 3)}
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
