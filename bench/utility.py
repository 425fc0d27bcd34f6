"""Augmentation-utility benchmark: the champion recipe's synthetic slices, four arms, every task, one table.

Trains a recipe on the demo store with bench/quality.py's budget for the mode: the conditional flow-prior VAE
(`--recipe vae-conditional`, the default: experiments/configs/vae-conditional.yaml, conditioned on slice_pos and
site), the conditional VQ-VAE (`--recipe conditional`: experiments/configs/vqvae-conditional.yaml, conditioned on
slice_pos / site / age / sex) or the recommended unconditional VQ-VAE (`--recipe unconditional`: the probes label
its samples), or takes `--model` (a saved model directory or a models:/ / runs:/ URI). A conditional model's
synthetic slices are generated for the real label distribution and carry the requested labels; one synthetic set
serves every task. Then it runs `mrigen.utility`'s protocol for each task on the demo store's held-out test
subjects and prints the tables, a one-line summary per task and the issue's targets (F = 0.25: real + synthetic
beats real only on `site` and `slice_pos` by more than the seed spread; TSTR >= 80% of real only).

    python bench/utility.py --mode cpu                              # 64 px on the CPU (target <= 15 min)
    python bench/utility.py --mode cpu --recipe conditional         # the conditional VQ-VAE
    python bench/utility.py --mode cpu --recipe unconditional       # probe-labelled samples instead
    python bench/utility.py --mode gpu                              # 128 px on CUDA
    python bench/utility.py --mode cpu --model bench-work/utility/model --task site
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import MODES, recommended  # noqa: E402  (the champion recipe and the mode's size / device)

from mrigen.data import DEMO_SUBJECTS, build_demo_store  # noqa: E402
from mrigen.utility import TASKS, UtilityConfig, run_utility, summary, table  # noqa: E402
from mrigen.utility.pool import default_workers  # noqa: E402
from mrigen.utility.report import plot  # noqa: E402

TARGET_TASKS = ("site", "slice_pos")
TSTR_TARGET = 0.8


# --recipe -> (family, experiments/configs/<family>-<name>.yaml)
RECIPES = {"vae-conditional": ("vae", "conditional"), "conditional": ("vqvae", "conditional"),
           "unconditional": ("vqvae", "recommended")}


def train_recipe(store, mode: str, out: Path, epochs: int | None, prior_steps: int | None,
                 recipe: str = "vae-conditional", seed: int | None = None):
    """A recipe of `RECIPES` with the mode's budget (no final evaluation: bench/quality.py measures quality);
    `seed` overrides the recipe's training seed."""
    from mrigen.models import save_model
    from mrigen.train import train

    family, name = RECIPES[recipe]
    model_cfg, train_cfg = recommended(family, mode, name)
    overrides = {"epochs": epochs, "prior_steps": prior_steps, "final_eval": False, "seed": seed}
    train_cfg = dataclasses.replace(train_cfg, **{k: v for k, v in overrides.items() if v is not None})
    result = train(model_cfg, train_cfg, store, progress=False)
    save_model(result.model, out / "model")
    return result.model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(MODES), default="cpu", help="cpu: 64 px on CPU; gpu: 128 px on CUDA")
    p.add_argument("--model", help="a saved model directory or models:/ / runs:/ URI (default: train the recipe)")
    p.add_argument("--recipe", choices=list(RECIPES), default="vae-conditional",
                   help="model to train when no --model is given: conditional flow-prior VAE (default), "
                        "conditional VQ-VAE, unconditional VQ-VAE")
    p.add_argument("--task", action="append", choices=list(TASKS), help="task (repeatable; default all four)")
    p.add_argument("--real-fraction", type=float, default=0.25)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--synthetic", default="250,1000", help="comma-separated synthetic counts")
    p.add_argument("--steps", type=int, help="downstream CNN steps (default: UtilityConfig's)")
    p.add_argument("--subjects", type=int, default=DEMO_SUBJECTS, help="demo cohort size")
    p.add_argument("--work", type=Path, default=Path("bench-work"), help="demo store cache directory")
    p.add_argument("--out", type=Path, default=Path("bench-work/utility"), help="model, tables, plots, results.json")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (smoke runs)")
    p.add_argument("--prior-steps", type=int, help="override the recipe's prior steps (smoke runs)")
    p.add_argument("--train-seed", type=int,
                   help="the recipe's training seed (default the recipe's, 0): another generator, the same protocol")
    p.add_argument("--tracking-uri", help="for a models:/ or runs:/ --model")
    p.add_argument("--workers", type=int, help="processes for the downstream trainings, one thread each (default: "
                                               "one per CPU core up to 4 on the CPU, 1 on CUDA); same scores")
    args = p.parse_args(argv)
    mode = MODES[args.mode]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = build_demo_store(args.work / f"demo-{mode['size']}", subjects=args.subjects, size=mode["size"],
                             progress=False)
    print(f"demo store: {store} ({time.perf_counter() - t0:.0f} s)", flush=True)
    t1 = time.perf_counter()
    if args.model:
        from mrigen.generate import resolve_model

        model = resolve_model(args.model, tracking_uri=args.tracking_uri, device=mode["device"]).model
        source = args.model
    else:
        model = train_recipe(store, args.mode, args.out, args.epochs, args.prior_steps, args.recipe, args.train_seed)
        source = f"{args.recipe} recipe trained here ({time.perf_counter() - t1:.0f} s), saved to {args.out / 'model'}"
    print(f"model: {source}", flush=True)
    fidelity = {}
    if getattr(model.config, "conditions", ()):
        from mrigen.metrics.fidelity import conditioning_fidelity
        from mrigen.metrics.probe import get_probes

        fidelity = conditioning_fidelity(model, store, get_probes(store, device=mode["device"]), split="val")
        print("conditioning fidelity (500 samples under held-out val rows; probe on real val slices in brackets): "
              + ", ".join(f"{k[5:]} {v:.3f} ({fidelity[k + '_real']:.3f})" for k, v in fidelity.items()
                          if not k.endswith("_real")), flush=True)
        for key, kind, bound in (("cond_slice_pos_mae", "max", 1.5), ("cond_site_acc", "min", 0.9)):
            if key in fidelity:
                ratio = fidelity[key] / fidelity[key + "_real"]
                ok = ratio <= bound if kind == "max" else ratio >= bound
                print(f"target {key[5:]}: generated / real {ratio:.2f} {'<=' if kind == 'max' else '>='} {bound}: "
                      + ("met" if ok else "MISSED"), flush=True)
    if mode["device"] == "cpu":
        torch.set_num_threads(1)  # the downstream CNN's small tensors: one thread is faster (training above: all)
    workers = args.workers or default_workers(mode["device"])
    print(f"downstream trainings: {workers} worker process(es)", flush=True)
    counts = tuple(sorted({int(c) for c in args.synthetic.split(",")}))
    rows, tables = {}, []
    cache: dict = {}                       # one synthetic set for every task: generated once, relabelled per task
    for task in args.task or list(TASKS):
        cfg = UtilityConfig(task=task, real_fraction=args.real_fraction, seeds=args.seeds, synthetic=counts,
                            **({"steps": args.steps} if args.steps else {}))
        result = run_utility(model, store, cfg, device=mode["device"], progress=True, synthetic_cache=cache,
                             workers=workers)
        tables.append(table(result, f"{args.mode}, {mode['size']} px"))
        plot(result, args.out / f"utility_{task}.png")
        rows[task] = dict(summary(result), wall_s=result.wall_s)
        print(f"{task}: done in {result.wall_s:.0f} s", flush=True)
        # after each task: a run cut short (a device call's time limit) keeps the tasks it finished
        write_results(args.out, {"mode": args.mode, "model": source, "results": rows, "fidelity": fidelity,
                                 "complete": False})
    print()
    print("\n\n".join(tables))
    print()
    print("| task | metric | real only | real + N synth | synthetic only | real + classic | chance | verdict | "
          "per seed (paired) | TSTR ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for task, s in rows.items():
        print(f"| {task} | {s['metric']} | {s['real']:.4f} +- {s['real_std']:.4f} | {s['real_synthetic']:.4f} +- "
              f"{s['real_synthetic_std']:.4f} (N={s['n_synthetic']}) | {s['synthetic']:.4f} +- {s['synthetic_std']:.4f} "
              f"| {s['classic']:.4f} +- {s['classic_std']:.4f} | {s['chance']:.4f} | {s['verdict']} | "
              f"{s['gain']:+.4f} +- {s['gain_paired_std']:.4f}, better in {s['seeds_better']}/{s['seeds']} | "
              f"{s['tstr_ratio']:.3f} |")
    print()
    for task in TARGET_TASKS:
        if task in rows:
            s = rows[task]
            print(f"target {task}: real + synthetic beats real only by more than the seed spread: "
                  + ("met" if s["verdict"] == "gain" else f"MISSED ({s['verdict']}, gain {s['gain']:+.4f})")
                  + f"; better in {s['seeds_better']} of {s['seeds']} seeds")
            print(f"target {task}: TSTR >= {TSTR_TARGET:.0%} of real only: "
                  + ("met" if s["tstr_ratio"] >= TSTR_TARGET else f"MISSED ({s['tstr_ratio']:.3f})"))
    total = time.perf_counter() - t0
    print(f"\nwhole run {total:.0f} s ({total / 60:.1f} min)")
    write_results(args.out, {"mode": args.mode, "model": source, "results": rows, "fidelity": fidelity,
                             "wall_s": total, "complete": True})
    return 0


def write_results(out: Path, results: dict) -> None:
    """OUT/results.json (replaced atomically: a reader never sees half a file)."""
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out / "results.json")


if __name__ == "__main__":
    sys.exit(main())
