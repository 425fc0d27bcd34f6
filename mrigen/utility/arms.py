"""The training sets of the four arms: a data-poor real subset, classic augmentation, and a synthetic set.

- `real_subset`: a seeded fraction F of the store's training **subjects** (all their slices), the data a
  data-poor user has;
- `classic_augment`: what users do today, per batch: left-right flips, a small affine (rotation +-8 degrees,
  scale 0.92-1.08, shift +-6% of the side), an intensity change (gamma 0.8-1.25, gain 0.9-1.1, Gaussian noise
  of std up to 0.02);
- `synthetic_set`: slices from the model under test with labels. A model conditioned on the task's attribute
  is asked for rows drawn from the real subset (so the synthetic labels follow the real label distribution)
  and labelled with what was asked; any other model samples freely and the probes (`mrigen.metrics.probe`)
  label its slices.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mrigen.generate import batch_seed

__all__ = ["SyntheticSet", "classic_augment", "generate_synthetic", "model_conditions", "real_subset",
           "synthetic_set"]


def real_subset(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Row indices of a seeded `fraction` of the subjects in `rows` (at least one subject), and those subjects."""
    subjects = sorted({str(r["subject"]) for r in rows})
    k = max(1, round(fraction * len(subjects)))
    order = sorted(subjects, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    chosen = set(order[:k])
    idx = torch.tensor([i for i, r in enumerate(rows) if str(r["subject"]) in chosen], dtype=torch.int64)
    return idx, sorted(chosen)


def classic_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip, small affine and intensity augmentation of a batch `(B, 1, H, W)` in [0, 1]; draws from `gen` (CPU)."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, generator=gen)).to(x.device)

    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    angle, scale = u(-8.0, 8.0) * math.pi / 180.0, u(0.92, 1.08)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = torch.cos(angle) / scale
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, 0, 2], theta[:, 1, 2] = u(-0.12, 0.12), u(-0.12, 0.12)      # +-6% of the side (grid spans 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = torch.exp(u(math.log(0.8), math.log(1.25)))[:, None, None, None]
    gain = u(0.9, 1.1)[:, None, None, None]
    noise = u(0.0, 0.02)[:, None, None, None] * torch.randn(x.shape, generator=gen).to(x.device)
    return (x.clamp(0, 1) ** gamma * gain + noise).clamp(0, 1)


def model_conditions(model: torch.nn.Module) -> tuple[str, ...]:
    """The attributes a model is conditioned on (empty for an unconditional one)."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    return tuple(getattr(cfg, "conditions", ()) or ())


@dataclass
class SyntheticSet:
    """Generated slices with their labels, and where the labels came from."""

    images: torch.Tensor                 # (N, 1, H, W) in [0, 1]
    rows: list[dict[str, Any]]           # labels, shaped like store.slices() rows
    label_source: str                    # "requested" (conditional on the task) or "probe"


@torch.no_grad()
def generate_synthetic(model: torch.nn.Module, n: int, *, pool: list[dict[str, Any]], seed: int,
                       batch_size: int = 128, device: torch.device | str = "cpu"
                       ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Generate `n` slices: `(images (n, 1, H, W) in [0, 1] on `device`, the rows requested of a conditional model
    (empty for an unconditional one))`. The draws depend only on the model, `pool`, `seed` and `batch_size`, not
    on a task: several tasks can share one set (`run_utility(..., synthetic_cache=)`).

    Args: as `synthetic_set`.
    """
    model.eval()
    conditions = model_conditions(model)
    pick = torch.Generator(device="cpu").manual_seed(int(seed) + 7_919)
    images, requested = [], []
    for k, start in enumerate(range(0, n, batch_size)):
        b = min(batch_size, n - start)
        gen = torch.Generator(device="cpu").manual_seed(batch_seed(seed, k))
        if conditions:
            rows = [dict(pool[int(i)]) for i in torch.randint(0, len(pool), (b,), generator=pick)]
            x = model.sample(b, generator=gen, conditions=rows)
            requested += rows
        else:
            x = model.sample(b, generator=gen)
        if x.ndim != 4 or x.shape[0] != b or x.shape[1] != 1:
            raise RuntimeError(f"model.sample({b}) returned shape {tuple(x.shape)}, expected ({b}, 1, H, W)")
        if not torch.isfinite(x).all():
            raise ValueError("the model generated non-finite values (did it diverge?)")
        images.append(x.float().clamp(0, 1).to(device))
    return torch.cat(images), requested


@torch.no_grad()
def synthetic_set(model: torch.nn.Module, n: int, *, task: str, pool: list[dict[str, Any]], probes, seed: int,
                  batch_size: int = 128, device: torch.device | str = "cpu",
                  generated: tuple[torch.Tensor, list[dict[str, Any]]] | None = None) -> SyntheticSet:
    """Generate `n` labelled slices.

    Args:
        model: the generator (eval mode is set); `sample(b, generator=g)` or, when conditioned,
            `sample(b, generator=g, conditions=rows)`.
        n: slice count.
        task: the attribute to label.
        pool: rows to draw requested conditions from (the real subset: matches its label distribution).
        probes: `mrigen.metrics.probe.Probes` (labels an unconditioned attribute).
        seed: batch k draws its noise from `batch_seed(seed, k)` (as `mrigen.generate` does) and its conditions
            from a generator seeded by `seed`.
        batch_size: slices per `sample` call.
        device: where the slices are kept.
        generated: what `generate_synthetic` returned for the same arguments (labels them instead of generating).

    Returns:
        SyntheticSet; `label_source` says whether the task label was requested or read back by the probe.
    """
    x, requested = generated if generated is not None else generate_synthetic(
        model, n, pool=pool, seed=seed, batch_size=batch_size, device=device)
    if task in model_conditions(model):
        return SyntheticSet(x, requested, "requested")
    return SyntheticSet(x, probes.labels(x), "probe")
