"""MLflow tracking overhead: the same training with and without the MLflow hook, side by side.

Two figures: (1) the time the hook spends on the training thread per epoch (metrics queueing, image grids)
over the mean epoch time, and (2) the whole `train()` wall time with the hook against without it, so the
background logging thread's competition for the CPU shows too. The model itself is logged once at the end in
both the hook's and the plain run's figure (`--log-model`), or not at all (default, the per-epoch question). A warm-up tracked run creates the
SQLite tracking database first, so its one-off schema migrations are not counted.

    python bench/tracking_overhead.py --size 64 --epochs 4 --n 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from train_throughput import ResidentStore  # noqa: E402

from mrigen.train import Hook, TrainConfig, train  # noqa: E402
from mrigen.train.configs import build_configs  # noqa: E402


class Timed(Hook):
    """Wraps a hook and sums the seconds its per-epoch methods take on the training thread."""

    def __init__(self, inner: Hook) -> None:
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        fn(*args)
        self.seconds += time.perf_counter() - t0
        self.calls += 1

    def on_start(self, ctx):
        self.inner.on_start(ctx)

    def on_epoch_end(self, ctx, epoch, metrics):
        self._timed(self.inner.on_epoch_end, ctx, epoch, metrics)

    def on_images(self, ctx, epoch, grids):
        self._timed(self.inner.on_images, ctx, epoch, grids)

    def on_end(self, ctx, result):
        self.inner.on_end(ctx, result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--log-model", action="store_true")
    args = p.parse_args()
    from mrigen.tracking import MlflowHook

    store = ResidentStore(args.n, args.size)
    model_cfg, tcfg = build_configs("vae", {"model": {"image_size": args.size},
                                            "train": {"epochs": args.epochs, "batch_size": args.batch,
                                                      "final_eval": False, "grid_every": 1}})
    train(model_cfg, TrainConfig(**{**tcfg.__dict__, "epochs": 1}), store, progress=False)      # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        warm = TrainConfig(**{**tcfg.__dict__, "epochs": 1})        # creates the tracking DB (one-off migrations)
        train(model_cfg, warm, store, hooks=[MlflowHook(tracking_uri=uri, experiment="bench", log_model=False)],
              progress=False)
        t0 = time.perf_counter()
        plain = train(model_cfg, tcfg, store, progress=False)
        plain_s = time.perf_counter() - t0
        hook = Timed(MlflowHook(tracking_uri=uri, experiment="bench",
                                log_model=args.log_model, image_every=1))
        t0 = time.perf_counter()
        tracked = train(model_cfg, tcfg, store, hooks=[hook], progress=False)
        tracked_s = time.perf_counter() - t0
    epoch_s = sum(h["epoch_seconds"] for h in tracked.history) / len(tracked.history)
    row = {"size": args.size, "epochs": args.epochs, "n": args.n, "log_model": args.log_model,
           "hook_s_per_epoch": round(hook.seconds / args.epochs, 4), "epoch_s": round(epoch_s, 3),
           "hook_share_of_epoch": round(hook.seconds / args.epochs / epoch_s, 4),
           "wall_plain_s": round(plain_s, 2), "wall_tracked_s": round(tracked_s, 2),
           "wall_ratio": round(tracked_s / plain_s, 3)}
    assert len(plain.history) == len(tracked.history) == args.epochs
    print(json.dumps(row))


if __name__ == "__main__":
    main()
