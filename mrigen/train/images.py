"""Image grids (real | reconstruction of the same slices | samples) and loss-curve figures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["make_grid", "save_png", "plot_loss_curves", "loss_figure"]


def make_grid(rows: list[torch.Tensor], pad: int = 2) -> np.ndarray:
    """Tile rows of images into one uint8 grid.

    Args:
        rows: each (N, 1, H, W) in [0, 1], all with the same N, H, W (row i of the grid is rows[i]).
        pad: pixels of black between tiles.

    Returns:
        (R*(H+pad)+pad, N*(W+pad)+pad) uint8 array.
    """
    if not rows:
        raise ValueError("make_grid needs at least one row")
    n, _, h, w = rows[0].shape
    for r in rows:
        if tuple(r.shape) != (n, 1, h, w):
            raise ValueError(f"make_grid: row shape {tuple(r.shape)} != {(n, 1, h, w)}")
    grid = np.zeros((len(rows) * (h + pad) + pad, n * (w + pad) + pad), dtype=np.uint8)
    for i, r in enumerate(rows):
        tiles = (r.detach().float().clamp(0, 1).cpu().numpy()[:, 0] * 255 + 0.5).astype(np.uint8)  # (N, H, W)
        for j in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = tiles[j]
    return grid


def save_png(path: Path, image: np.ndarray) -> None:
    """Save a uint8 (H, W) array as PNG, atomically."""
    import matplotlib.image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    matplotlib.image.imsave(tmp, image, cmap="gray", vmin=0, vmax=255)
    os.replace(tmp, path)


def loss_figure(history: list[dict[str, float]]):
    """A matplotlib Figure of train/val losses and their terms per epoch (caller closes it)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    groups = [("loss", ["train_loss", "val_loss"]),
              ("reconstruction", ["train_recon", "val_recon"]),
              ("KL / VQ", ["train_kl", "val_kl", "train_vq", "val_vq"]),
              ("validation quality", ["val_ssim"])]
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2))
    for ax, (title, keys) in zip(axes, groups):
        for key in keys:
            ys = [h.get(key) for h in history]
            if any(y is not None for y in ys):
                ax.plot(epochs, [np.nan if y is None else y for y in ys], label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_loss_curves(history: list[dict[str, float]], path: Path) -> None:
    """Write the loss-curve figure of `history` to `path` (PNG)."""
    import matplotlib.pyplot as plt

    fig = loss_figure(history)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
