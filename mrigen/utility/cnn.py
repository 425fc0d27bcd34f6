"""The downstream CNN every arm trains, and its seeded training and scoring loop.

One architecture and one schedule for every arm: the same seeded initial weights, the same number of Adam
steps, the same batch size. Only the training images (and, for classic augmentation, what is done to each
batch) differ, so score differences come from the data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import UtilityConfig

__all__ = ["DownstreamCNN", "fit_and_predict"]


class DownstreamCNN(nn.Module):
    """Stride-2 3x3 conv stages (GroupNorm, LeakyReLU), global average and max pooling, a linear head.

    Args:
        n_out: outputs (1 for a regression, the class count for a classification).
        input_size: every input is resized to this side.
        channels: conv widths.
    """

    def __init__(self, n_out: int, input_size: int = 64, channels: tuple[int, ...] = (16, 32, 64, 64)) -> None:
        super().__init__()
        self.input_size = input_size
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in channels:              # (B, c_in, s, s) -> (B, c_out, s/2, s/2)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(min(8, c_out), c_out),
                       nn.LeakyReLU(0.2)]
            c_in = c_out
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * c_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, 1, H, W)` in [0, 1] -> `(B, n_out)`."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"DownstreamCNN input must be (B, 1, H, W); got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x.float(), size=(self.input_size,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)
        h = self.trunk(x.float() - 0.5)                                    # (B, C, s, s)
        return self.head(torch.cat([h.mean((-2, -1)), h.amax((-2, -1))], 1))  # (B, 2C) -> (B, n_out)


@torch.enable_grad()
def fit_and_predict(images: torch.Tensor, targets: torch.Tensor, known: torch.Tensor, test: torch.Tensor,
                    *, n_out: int, classification: bool, cfg: UtilityConfig, seed: int,
                    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> torch.Tensor:
    """Train a fresh `DownstreamCNN` (weights seeded by `seed`) and return its outputs on `test`.

    Args:
        images: `(N, 1, H, W)` training slices in [0, 1] (already at `cfg.input_size` is fastest).
        targets: `(N,)` class indices (int64) or standardised values (float32).
        known: `(N,)` bool, rows with a label (others are never drawn).
        test: `(M, 1, H, W)` slices to predict.
        n_out, classification: the head and its loss (cross-entropy or mean squared error).
        cfg: steps, batch size, learning rate, architecture.
        seed: weights, batch order and augmentation draws (CPU generator: same on any device).
        augment: applied to each training batch, `(B, 1, H, W), generator -> (B, 1, H, W)`.

    Returns:
        `(M, n_out)` logits, or `(M,)` standardised predictions, on the CPU.
    """
    rows = known.nonzero().flatten()
    if len(rows) == 0:
        raise ValueError("no labelled training slice")
    device = images.device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    state = torch.random.get_rng_state()
    torch.manual_seed(int(seed))                        # weight init and dropout, without leaking into the caller
    net = DownstreamCNN(n_out, cfg.input_size, tuple(cfg.channels)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    net.train()
    try:
        for _ in range(cfg.steps):
            idx = rows[torch.randint(0, len(rows), (cfg.batch_size,), generator=gen)].to(device)
            x = images[idx]
            if augment is not None:
                x = augment(x, gen)
            out = net(x)
            y = targets[idx]
            loss = F.cross_entropy(out, y) if classification else F.mse_loss(out[:, 0], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.random.set_rng_state(state)
    net.eval()
    with torch.no_grad():
        out = torch.cat([net(test[i:i + 256]) for i in range(0, test.shape[0], 256)]).cpu()
    return out if classification else out[:, 0]
