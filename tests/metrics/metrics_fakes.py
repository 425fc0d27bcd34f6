"""Stand-ins for the slice store and the models, so the metrics tests need no mrigen.data / mrigen.models."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mrigen.metrics import FeatureNetConfig

SITES = ("Guys", "HH", "IOP")
# A 40-step network: its embedding is one rough draw, and the fixture tests (pure noise below the real baseline's
# precision, say) were written against this draw; mirrored training changes the draw (it is tested on its own in
# test_metrics_features.py, and every default-config network in the suite trains mirrored).
TINY_FEATURES = FeatureNetConfig(input_size=32, channels=(16, 32, 64), feature_dim=32, steps=40, batch_size=32,
                                members=1, mirror=False)


def phantom(subject: int, pos: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A brain-like axial slice `(size, size)` in [0, 1]: head ellipse shrinking with `pos`, ventricles, texture."""
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    jitter = 1.0 + 0.06 * np.sin(subject * 1.7)
    head = (xx / (0.75 * jitter - 0.02 * pos)) ** 2 + (yy / (0.88 - 0.02 * pos)) ** 2 <= 1.0
    vent = (xx / (0.10 + 0.012 * pos)) ** 2 + ((yy + 0.05) / 0.25) ** 2 <= 1.0
    brightness = (0.55, 0.7, 0.85)[subject % 3]
    img = head * brightness * (0.85 + 0.15 * np.cos(6 * xx + subject) * np.sin(5 * yy))
    img = np.where(vent, 0.15, img) + rng.normal(0.0, 0.01, img.shape) * head
    return np.clip(img, 0.0, 1.0).astype(np.float32)


class SyntheticStore:
    """Duck-typed slice store: digest, path, image_size, splits, tensor(split, device), slices(split)."""

    def __init__(self, path: Path, size: int = 32, subjects: dict[str, int] | None = None, n_pos: int = 10,
                 seed: int = 0) -> None:
        subjects = subjects or {"train": 8, "val": 6}
        rng = np.random.default_rng(seed)
        self.path, self.image_size, self.splits = Path(path), size, tuple(subjects)
        self.path.mkdir(parents=True, exist_ok=True)
        self._images: dict[str, np.ndarray] = {}
        self._slices: dict[str, list[dict[str, Any]]] = {}
        first = 0
        for split, count in subjects.items():
            ids = range(first, first + count)
            first += count
            self._slices[split] = [{"subject": f"IXI{s:03d}", "site": SITES[s % 3], "slice_pos": p, "age": 40.0,
                                    "sex": 1 + s % 2} for s in ids for p in range(n_pos)]
            self._images[split] = np.stack([phantom(s, p, size, rng) for s in ids for p in range(n_pos)])
        digest = hashlib.sha256()
        for split in self.splits:
            digest.update(self._images[split].tobytes())
        self.digest = digest.hexdigest()

    def tensor(self, split: str, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.from_numpy(self._images[split][:, None]).to(device=device, dtype=dtype)

    def slices(self, split: str) -> list[dict[str, Any]]:
        return [dict(row) for row in self._slices[split]]


class MemoryModel(nn.Module):
    """Identity-like model: reconstructs perfectly, samples by drawing (noisy) copies of a bank of slices."""

    def __init__(self, bank: torch.Tensor, noise: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("bank", bank)
        self.noise = noise

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.randint(0, self.bank.shape[0], (n,), generator=generator, device=self.bank.device)
        noise = torch.randn((n, *self.bank.shape[1:]), generator=generator, device=self.bank.device)
        return (self.bank[idx] + self.noise * noise).clamp(0, 1)


class NoiseModel(MemoryModel):
    """A bad model: reconstructions and samples are uniform noise."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rand(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand((n, *self.bank.shape[1:]), generator=generator, device=self.bank.device)


class NoPriorModel(MemoryModel):
    """A VQ-VAE-like model whose prior was never trained."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise RuntimeError("the code prior has not been trained")
