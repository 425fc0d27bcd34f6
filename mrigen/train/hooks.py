"""The hook interface through which training reports progress, and the local (file) logger.

Tracking (MLflow) and tuning (Optuna pruning) plug in here instead of living inside the training loop.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from mrigen.train.loop import TrainResult

__all__ = ["Hook", "TrainContext", "StopTraining", "LocalLogger", "ThreadHandBack", "write_json_atomic"]


class StopTraining(Exception):
    """Raised by a hook's `on_epoch_end` to end training early (e.g. an Optuna pruner); carries the reason."""


@dataclass
class TrainContext:
    """What every hook may read about the run in progress."""

    model: torch.nn.Module
    model_cfg: Any                        # mrigen.models.ModelConfig
    train_cfg: Any                        # mrigen.train.TrainConfig
    device: torch.device
    data_digest: str                      # sha256 of the slice store's arrays
    data_path: str                        # where the store lives
    out_dir: Path | None                  # local output directory, if any
    n_train: int                          # training slices
    n_val: int                            # validation slices
    extra: dict[str, Any] = field(default_factory=dict)   # free space for hooks (run ids, trial numbers)

    def params(self) -> dict[str, Any]:
        """Flat `model.*` / `train.*` parameters: the one source of truth for logged params."""
        out = {f"model.{k}": v for k, v in asdict(self.model_cfg).items()}
        out.update({f"train.{k}": v for k, v in asdict(self.train_cfg).items()})
        return out


class Hook:
    """Base class: override any of these; the defaults do nothing."""

    def on_start(self, ctx: TrainContext) -> None:
        """Called once before the first epoch (also on resume)."""

    def on_epoch_end(self, ctx: TrainContext, epoch: int, metrics: dict[str, float]) -> None:
        """Called after each epoch with that epoch's train/val metrics; may raise `StopTraining`."""

    def on_images(self, ctx: TrainContext, epoch: int, grids: dict[str, np.ndarray]) -> None:
        """Called with named uint8 image grids (H, W) every `grid_every` epochs and at the end."""

    def on_end(self, ctx: TrainContext, result: "TrainResult") -> None:
        """Called once after training, the prior and the final evaluation, with the saved model dir if any."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` via a temporary file + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


class ThreadHandBack(Hook):
    """Each epoch, gives the training back the threads of a feature network that has finished training in a
    background process (`mrigen.metrics.background.poll`; started by `mrigen.tune`, `python -m mrigen.train` or
    `bench/quality.py` on a CPU)."""

    def on_epoch_end(self, ctx: TrainContext, epoch: int, metrics: dict[str, float]) -> None:
        from mrigen.metrics import background

        background.poll()


class LocalLogger(Hook):
    """Writes `metrics.json`, `history.json`, `prior_history.json` (models with a trained prior), `loss_curves.png`
    and `grids/<name>_epoch_NNN.png` to a dir."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.history: list[dict[str, float]] = []

    def on_epoch_end(self, ctx: TrainContext, epoch: int, metrics: dict[str, float]) -> None:
        self.history.append({"epoch": epoch, **metrics})
        write_json_atomic(self.out_dir / "history.json", self.history)

    def on_images(self, ctx: TrainContext, epoch: int, grids: dict[str, np.ndarray]) -> None:
        from mrigen.train.images import save_png

        for name, grid in grids.items():
            save_png(self.out_dir / "grids" / f"{name}_epoch_{epoch:03d}.png", grid)

    def on_end(self, ctx: TrainContext, result: "TrainResult") -> None:
        from mrigen.train.images import plot_loss_curves

        write_json_atomic(self.out_dir / "history.json", result.history)
        if result.prior_curve:                     # the second stage (code / flow prior), one row per report
            write_json_atomic(self.out_dir / "prior_history.json", result.prior_curve)
        write_json_atomic(self.out_dir / "metrics.json", {
            "val": result.val_metrics,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "stop_reason": result.stop_reason,
            "params": ctx.params(),
            "data_digest": ctx.data_digest,
        })
        if result.history:
            plot_loss_curves(result.history, self.out_dir / "loss_curves.png")
