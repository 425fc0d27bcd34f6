"""Settings of one augmentation-utility benchmark run: the protocol, the downstream CNN and its training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mrigen.config import config_from_dict

__all__ = ["UtilityConfig"]


@dataclass(frozen=True)
class UtilityConfig:
    """One benchmark: a task, a data-poor real training set, synthetic set sizes, and the downstream CNN.

    Every arm (real only, real + synthetic, synthetic only, real + classic augmentation) trains the same CNN
    for the same number of steps from the same seeded weights; only the training set differs.
    """

    task: str = "slice_pos"                     # one of mrigen.utility.tasks.TASKS
    real_fraction: float = 0.25                 # share of the store's training subjects the "user" has, (0, 1]
    seeds: int = 3                              # repeats (real subset, CNN init, batches); mean and spread over them
    synthetic: tuple[int, ...] = (250, 1000)    # synthetic set sizes added to the real set (the largest is TSTR's)
    steps: int = 300                            # Adam steps per downstream training (same for every arm)
    batch_size: int = 64                        # slices per step
    lr: float = 1e-3                            # Adam learning rate (cosine decay to 0)
    weight_decay: float = 1e-4                  # Adam weight decay
    input_size: int = 64                        # the CNN resizes every slice to this side
    channels: tuple[int, ...] = (16, 32, 64, 64)    # CNN conv stages, each halves the side
    sample_batch: int = 128                     # slices per model.sample call
    seed: int = 0                               # base seed: seed i of the protocol uses seed + i
    eval_split: str = "test"                    # held-out split the arms are scored on; studies select on "val"

    def __post_init__(self) -> None:
        if not 0.0 < float(self.real_fraction) <= 1.0:
            raise ValueError(f"real_fraction={self.real_fraction!r} is out of range (allowed: 0 < F <= 1)")
        for name in ("seeds", "steps", "batch_size", "input_size", "sample_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"UtilityConfig.{name}={getattr(self, name)!r} must be >= 1")
        if not self.synthetic or any(int(n) < 1 for n in self.synthetic):
            raise ValueError(f"synthetic={self.synthetic!r} must be one or more counts >= 1")
        if list(self.synthetic) != sorted(set(self.synthetic)):
            raise ValueError(f"synthetic={self.synthetic!r} must be distinct counts in increasing order")
        if not self.channels or any(int(c) < 1 for c in self.channels) or \
                self.input_size % 2 ** len(self.channels):
            raise ValueError(f"channels={self.channels!r} must be ints >= 1 and input_size={self.input_size} a "
                             f"multiple of 2**len(channels)")
        if self.eval_split not in ("val", "test"):
            raise ValueError(f"eval_split={self.eval_split!r} must be 'val' or 'test' (held-out subjects)")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"lr={self.lr!r} must be > 0 and weight_decay={self.weight_decay!r} >= 0")

    @property
    def max_synthetic(self) -> int:
        return int(max(self.synthetic))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UtilityConfig":
        return config_from_dict(cls, data)
