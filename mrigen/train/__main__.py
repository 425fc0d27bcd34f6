"""`python -m mrigen.train`: train one VAE or VQ-VAE on a slice store and write metrics, grids and the model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mrigen import logs

from mrigen.train.configs import build_configs, load_config_file, parse_overrides
from mrigen.train.hooks import Hook


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mrigen.train",
        description="Train a VAE or VQ-VAE on a slice store (made by `python -m mrigen.data ingest`). Writes "
                    "OUT/metrics.json (final validation metrics), OUT/history.json (per epoch), OUT/prior_history.json "
                    "(the code or flow prior's training and held-out loss by step), OUT/loss_curves.png, "
                    "OUT/grids/*.png (real vs reconstruction of the same slices, samples), OUT/model/ "
                    "(safetensors + config) and a resumable OUT/checkpoint/.")
    p.add_argument("--data", required=True,
                   help="slice store directory, or 'demo' to generate and ingest the demo cohort under --out")
    p.add_argument("--model", choices=["vae", "vqvae"], default=None,
                   help="model family (default: the config file's, else vae)")
    p.add_argument("--config", type=Path, help="YAML run config with 'model:' and 'train:' sections")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one field, e.g. --set model.kernel_size=3 --set train.lr=1e-4 (repeatable)")
    p.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=N")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="output directory (default runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint with the same config")
    p.add_argument("--tracking-uri", help="also log to this MLflow tracking server (or set MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", default="mrigen-train", help="MLflow experiment name when tracking")
    logs.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mrigen.data import StoreError

    logs.setup(args)
    try:
        file_layer = load_config_file(args.config) if args.config else {}
        cli_layer = parse_overrides(args.overrides)
        if args.epochs is not None:
            cli_layer["train"]["epochs"] = args.epochs
        if args.device is not None:
            cli_layer["train"]["device"] = args.device
        size_set = "image_size" in file_layer.get("model", {}) or "image_size" in cli_layer["model"]
        if args.data != "demo" and not size_set:  # the store decides the image size unless the user does
            store = _open_store(args.data, args.out, 0)
            cli_layer["model"]["image_size"] = store.image_size
        model_cfg, train_cfg = build_configs(args.model, file_layer, cli_layer)
        if args.data == "demo" or size_set:
            store = _open_store(args.data, args.out, model_cfg.image_size)
    except (ValueError, OSError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from mrigen.train.hooks import LocalLogger, ThreadHandBack
    from mrigen.train.loop import train

    progress = logs.progress()
    hooks = [LocalLogger(args.out), ThreadHandBack()] + ([] if progress else [EpochLine()])
    tracking = _tracking_hook(args)
    if tracking is not None:
        hooks.append(tracking)
    features = None
    try:
        features = _feature_net_in_background(store, train_cfg)
        result = train(model_cfg, train_cfg, store, out_dir=args.out, hooks=hooks, resume=args.resume,
                       progress=progress)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if features is not None:
            features.close()
    summary = {k: round(v, 4) for k, v in result.val_metrics.items() if isinstance(v, float)}
    print(f"trained {model_cfg.family} for {result.epochs_run} epochs -> {args.out}/model; "
          f"validation: {json.dumps(summary)}")
    return 0


class EpochLine(Hook):
    """One printed line per epoch, for output that is not a terminal (where no progress bar is drawn)."""

    KEYS = ("train_loss", "val_loss", "val_ssim", "val_psnr")

    def on_epoch_end(self, ctx, epoch: int, metrics: dict[str, float]) -> None:
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in self.KEYS if k in metrics)
        print(f"epoch {epoch + 1}/{ctx.train_cfg.epochs} {shown} ({metrics.get('img_per_s', 0):.0f} img/s on "
              f"{ctx.device})", flush=True)


def _feature_net_in_background(store, train_cfg):
    """On a CPU, the store's feature networks (for the final evaluation; 3 take ~3 min of one core at 64 px, once
    per store) train in a child process beside the model (mrigen.metrics.background); None when they are cached,
    on a GPU, or without a final evaluation."""
    if not train_cfg.final_eval:
        return None
    from mrigen.device import pick_device
    from mrigen.metrics.background import start_feature_net

    return start_feature_net(store, pick_device(train_cfg.device), train_cfg.eval_feature_nets or None)


def _open_store(data: str, out: Path, size: int):
    from mrigen.data import SliceStore, build_demo_store

    if data == "demo":
        return build_demo_store(out / "demo", size=size, progress=logs.progress())
    return SliceStore.open(Path(data))


def _tracking_hook(args):
    import os

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    from mrigen.tracking import MlflowHook

    return MlflowHook(tracking_uri=uri, experiment=args.experiment)


if __name__ == "__main__":
    sys.exit(main())
