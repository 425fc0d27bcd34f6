"""Generation-quality benchmark: train each family's recommended config on the demo store, evaluate, print one table.

For each family (VQ-VAE, VAE) it trains `experiments/configs/<family>-recommended.yaml` with the mode's budget,
runs the full evaluation on the held-out (val) subjects, writes the real / reconstruction / sample grid PNGs, and
prints: held-out recon SSIM / PSNR / MS-SSIM, fd_ratio, precision / recall beside their real baselines, diversity
beside real, the samples' and reconstructions' fine detail (hf_ratio beside real, recon hf), memorised share and
wall time, with the issue's targets beside each figure.

    python bench/quality.py --mode cpu                 # 64 px on the CPU (target: <= 15 min for both families)
    python bench/quality.py --mode gpu                 # 128 px on CUDA
    python bench/quality.py --mode cpu --family vqvae --out /tmp/quality
    python bench/quality.py --mode cpu --family vae --autoguidance-sweep 1,1.5,2.5

A VAE whose flow prior keeps a guide is then also evaluated at the other autoguidance weights of
`--autoguidance-sweep` (sampling only, same trained model; GPU mode default 1,1.5,2.5,3, CPU mode none): the recipe's
row keeps the recipe's weight, the sweep is printed below the table and saved with the VAE's results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from mrigen.data import DEMO_SUBJECTS, build_demo_store
from mrigen.metrics.background import start_feature_net
from mrigen.train import train
from mrigen.train.configs import build_configs, load_config_file
from mrigen.train.hooks import ThreadHandBack
from mrigen.train.images import make_grid

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
MODES = {"cpu": {"size": 64, "device": "cpu"}, "gpu": {"size": 128, "device": "cuda"}}
# Autoguidance weights a guided flow-prior VAE is also evaluated at, per mode (`--autoguidance-sweep` overrides):
# the best weight on the CPU (2.0, the recipe's) is not known at 128 px, where the flow and its guide train 4x longer.
SWEEPS = {"cpu": (), "gpu": (1.0, 1.5, 2.5, 3.0)}
SWEEP_KEYS = ("fd_ratio", "precision", "recall", "diversity", "hf_ratio", "memorised")
# Budget per (mode, family), layered over the recipe in the config file (which holds the GPU budget). The CPU
# VQ-VAE prior is smaller: over a 16x16 grid the 128-wide prior costs ~2 s a step on one core. The VAE's flow prior
# trains 2,500 steps, not 4,000 (fd_ratio 1.48 vs 1.32, 2.5 min less: the whole run stays within 15 min), under
# bf16 autocast (the VAE 355 s instead of 472-480 s, fd_ratio 1.17 vs 1.13; bench/RESULTS.md, session 22).
BUDGETS = {
    ("cpu", "vqvae"): {"model": {"prior_channels": 64, "prior_layers": 3},
                       "train": {"epochs": 8, "prior_steps": 1000, "prior_batch_size": 32, "early_stop_patience": 0}},
    ("cpu", "vae"): {"train": {"epochs": 8, "prior_steps": 2500, "early_stop_patience": 0, "prior_amp": "bf16"}},
    ("gpu", "vqvae"): {},
    ("gpu", "vae"): {},
}
# (key, target, "min" if the figure must reach it from below, "max" if it must stay under it), per mode and family
TARGETS = {
    ("gpu", "vqvae"): [("psnr", 30.0, "min"), ("ssim", 0.92, "min")],
    ("gpu", "vae"): [("ssim", 0.85, "min")],
    ("cpu", "vqvae"): [("psnr", 27.0, "min"), ("ssim", 0.88, "min"), ("fd_ratio", 2.5, "max")],
    ("cpu", "vae"): [],
}
SAMPLE_TARGETS = {"gpu": [("fd_ratio", 2.0, "max"), ("precision", 0.7, "min"), ("recall", 0.5, "min"),
                          ("memorised", 0.0, "max")], "cpu": []}


def recommended(family: str, mode: str, recipe: str = "recommended"):
    """(ModelConfig, TrainConfig) of `experiments/configs/<family>-<recipe>.yaml` with the mode's image size,
    device and budget."""
    layers = load_config_file(CONFIGS / f"{family}-{recipe}.yaml")
    budget = BUDGETS[(mode, family)]
    budget_layer = {"model": {**budget.get("model", {}), "image_size": MODES[mode]["size"]},
                    "train": {**budget.get("train", {}), "device": MODES[mode]["device"], "final_eval": True}}
    return build_configs(family, layers, budget_layer)


def check(metrics: dict[str, float], targets) -> list[str]:
    """'met' / 'MISSED by X' per target."""
    out = []
    for key, target, kind in targets:
        v = metrics.get(key)
        if v is None:
            out.append(f"{key}: not measured")
            continue
        ok = v >= target if kind == "min" else v <= target
        out.append(f"{key} {v:.3f} {'>=' if kind == 'min' else '<='} {target}: "
                   + ("met" if ok else f"MISSED by {abs(v - target):.3f}"))
    return out


def save_grids(model, store, out: Path, family: str) -> Path:
    """Real val slices over their reconstructions, then two rows of samples: one PNG."""
    val = store.tensor("val", next(model.parameters()).device)
    idx = torch.linspace(0, len(val) - 1, 8).long()
    samples = model.sample(16, generator=torch.Generator(device=val.device).manual_seed(0))
    grid = make_grid([val[idx].float(), model.reconstruct(val[idx].float()), samples[:8], samples[8:]])
    path = out / f"{family}.png"
    Image.fromarray(grid).save(path)
    return path


def autoguidance_sweep(model, store, weights: tuple[float, ...], out: Path, samples: int | None) -> list[dict]:
    """Evaluate a guided flow-prior VAE's samples at each autoguidance weight (held-out val split, seed 0, the
    model's own weight skipped: it is the main row) and save a grid of 16 samples per weight; the model's config is
    restored. Returns one row per weight: {"w", "seconds", SWEEP_KEYS...}."""
    from mrigen.metrics import evaluate

    base = model.config
    rows = []
    try:
        for w in weights:
            if w == base.sample_autoguidance:
                continue
            model.config = dataclasses.replace(base, sample_autoguidance=w)
            t0 = time.perf_counter()
            m = evaluate(model, store, "val", n_samples=samples)
            rows.append({"w": w, "seconds": time.perf_counter() - t0, **{k: m[k] for k in SWEEP_KEYS}})
            samples16 = model.sample(16, generator=torch.Generator(device=model_device(model)).manual_seed(0))
            Image.fromarray(make_grid([samples16[:8], samples16[8:]])).save(out / f"vae-w{w:g}.png")
            print(f"vae autoguidance w {w:g}: " + ", ".join(f"{k} {rows[-1][k]:.3f}" for k in SWEEP_KEYS), flush=True)
    finally:
        model.config = base
    return rows


def prior_line(family: str, curve: list[dict[str, float]], kept_step: int | None) -> str:
    """One line on the prior's held-out curve: where it was lowest, against where it ended (a prior that fits its
    training grids rather than their distribution ends above its lowest point), and which weights were kept."""
    best = min(curve, key=lambda r: r["val_loss"])
    last = curve[-1]
    kept = "the last step's" if kept_step is None else f"step {kept_step}'s (train.prior_keep_best)"
    return (f"{family} prior: held-out loss {last['val_loss']:.4f} at its last step ({last['step']}), lowest "
            f"{best['val_loss']:.4f} at step {best['step']}; training loss {last['train_loss']:.4f}; kept {kept} "
            f"weights")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def parse_weights(text: str) -> tuple[float, ...]:
    """'1,1.5,2.5' -> (1.0, 1.5, 2.5); each weight must be a number >= 1 (argparse type)."""
    try:
        weights = tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(w >= 1.0 for w in weights):
        raise argparse.ArgumentTypeError(f"{text!r}: every autoguidance weight must be >= 1 (1 = off)")
    return weights


def run_families(args: argparse.Namespace, store, sweep: tuple[float, ...], rows: dict[str, dict]) -> None:
    """Train and evaluate each family's recipe in turn, filling `rows` and OUT/results.json as each ends."""
    for family in args.family or ["vqvae", "vae"]:
        model_cfg, train_cfg = recommended(family, args.mode)
        overrides = {"epochs": args.epochs, "prior_steps": args.prior_steps, "eval_samples": args.samples}
        train_cfg = dataclasses.replace(train_cfg, **{k: v for k, v in overrides.items() if v is not None})
        t0 = time.perf_counter()
        result = train(model_cfg, train_cfg, store, progress=False, hooks=[ThreadHandBack()])
        wall = time.perf_counter() - t0
        m = dict(result.val_metrics, wall_s=wall, epochs=result.epochs_run)
        grid = save_grids(result.model, store, args.out, family)
        rows[family] = m
        if result.prior_curve and "val_loss" in result.prior_curve[-1]:
            m["prior_curve"], m["prior_kept_step"] = result.prior_curve, result.extra.get("prior_kept_step")
            print(prior_line(family, result.prior_curve, m["prior_kept_step"]), flush=True)
        if sweep and getattr(result.model.config, "flow_guide", False):
            m["autoguidance_sweep"] = autoguidance_sweep(result.model, store, sweep, args.out, args.samples)
        print(f"{family}: trained {result.epochs_run} epochs in {wall:.0f} s; grid {grid}; "
              + ", ".join(f"{k} {m[k]:.3f}" for k in ("ssim", "psnr", "fd_ratio", "hf_ratio", "memorised")
                            if k in m), flush=True)
        write_results(args, rows)  # after each family: a run cut short (a device call's time limit) keeps it


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(MODES), default="cpu", help="cpu: 64 px on CPU; gpu: 128 px on CUDA")
    p.add_argument("--family", choices=["vqvae", "vae"], action="append",
                   help="family to run (repeatable; default both)")
    p.add_argument("--subjects", type=int, default=DEMO_SUBJECTS, help="demo cohort size")
    p.add_argument("--work", type=Path, default=Path("bench-work"), help="demo store cache directory")
    p.add_argument("--out", type=Path, default=Path("bench-work/quality"), help="grids and results.json")
    p.add_argument("--epochs", type=int, help="override the mode's epochs (smoke runs)")
    p.add_argument("--prior-steps", type=int,
                   help="override the mode's prior steps: VQ-VAE code prior, VAE flow prior (smoke runs)")
    p.add_argument("--samples", type=int, help="samples per evaluation (default: the metrics' default, 500)")
    p.add_argument("--autoguidance-sweep", type=parse_weights, metavar="W,W,...",
                   help="also evaluate the VAE's samples at these autoguidance weights (>= 1; '' = none; default: "
                        + "; ".join(f"{m} {','.join(f'{w:g}' for w in ws) or 'none'}" for m, ws in SWEEPS.items())
                        + ")")
    args = p.parse_args(argv)
    sweep = SWEEPS[args.mode] if args.autoguidance_sweep is None else args.autoguidance_sweep
    mode = MODES[args.mode]
    args.out.mkdir(parents=True, exist_ok=True)
    store = build_demo_store(args.work / f"demo-{mode['size']}", subjects=args.subjects, size=mode["size"],
                             progress=False)
    print(f"demo store: {args.subjects} subjects, {len(store.slices('train'))} train / "
          f"{len(store.slices('val'))} held-out (val) slices at {mode['size']} px", flush=True)
    rows = {}
    # On a CPU the store's feature networks (3 x ~65 s on one core, once per store) train in a child process
    # beside the first model, which gets both cores back at its first epoch end after the child is done.
    features = start_feature_net(store, mode["device"])
    try:
        run_families(args, store, sweep, rows)
    finally:
        if features is not None:
            features.close()
    print()
    cols = [("ssim", "SSIM"), ("psnr", "PSNR dB"), ("ms_ssim", "MS-SSIM"), ("fd_ratio", "fd_ratio"),
            ("precision", "prec"), ("precision_real", "prec real"), ("recall", "recall"),
            ("recall_real", "recall real"), ("diversity", "div"), ("diversity_real", "div real"),
            ("hf_ratio", "hf_ratio"), ("hf_ratio_real", "hf real"), ("recon_hf_ratio", "recon hf"),
            ("memorised", "memorised"), ("wall_s", "wall s")]
    print("| family | " + " | ".join(c[1] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for family, m in rows.items():
        cells = [f"{m[k]:.3f}" if isinstance(m.get(k), float) else str(m.get(k, "-")) for k, _ in cols]
        print(f"| {family} | " + " | ".join(cells) + " |")
    for family, m in rows.items():
        if m.get("autoguidance_sweep"):
            print(f"\n{family} samples by autoguidance weight (the recipe's: "
                  f"{recommended(family, args.mode)[0].sample_autoguidance:g}, in the table above)")
            print("| w | " + " | ".join(SWEEP_KEYS) + " | seconds |")
            print("|---" * (len(SWEEP_KEYS) + 2) + "|")
            for r in m["autoguidance_sweep"]:
                print(f"| {r['w']:g} | " + " | ".join(f"{r[k]:.3f}" for k in SWEEP_KEYS) + f" | {r['seconds']:.0f} |")
    print()
    for family, m in rows.items():
        for line in check(m, TARGETS[(args.mode, family)]):
            print(f"{family} target: {line}")
    best = min(rows.items(), key=lambda kv: kv[1].get("fd_ratio", float("inf")))
    for line in check(best[1], SAMPLE_TARGETS[args.mode]):
        print(f"best sampler ({best[0]}) target: {line}")
    write_results(args, rows)
    return 0


def write_results(args: argparse.Namespace, rows: dict[str, dict]) -> None:
    """OUT/results.json with the families measured so far (replaced atomically)."""
    tmp = args.out / "results.json.tmp"
    tmp.write_text(json.dumps({"mode": args.mode, "subjects": args.subjects, "results": rows}, indent=2))
    tmp.replace(args.out / "results.json")


if __name__ == "__main__":
    sys.exit(main())
