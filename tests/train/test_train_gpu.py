"""GPU path of the trainer: bf16 autocast + channels_last + resident data give finite, improving training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mrigen.train import TrainConfig, train
from mrigen.train.configs import build_configs

pytestmark = pytest.mark.gpu


class MemoryStore:
    """The slice-store contract over smooth random images (no nibabel / nilearn needed)."""

    def __init__(self, n: int = 256, size: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        low = torch.rand(n, 1, size // 8, size // 8, generator=g)
        self.x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")
        self.image_size, self.digest, self.path = size, "memory", Path("<memory>")

    def tensor(self, split, device, dtype=torch.float32):
        x = self.x if split == "train" else self.x[:64]
        return x.to(device=device, dtype=dtype)

    def slices(self, split):
        return [{"subject": str(i % 4), "site": "Guys", "slice_pos": 0.0} for i in range(len(self.tensor(split, "cpu")))]


@pytest.mark.parametrize("family", ["vae", "vqvae"])
def test_gpu_training_is_finite_and_improves(family, tmp_path):
    model_cfg, train_cfg = build_configs(family, {"model": {"image_size": 32, "blocks": 3},
                                                  "train": {"epochs": 3, "batch_size": 32, "device": "cuda",
                                                            "final_eval": False, "prior_steps": 5}})
    result = train(model_cfg, train_cfg, MemoryStore(), out_dir=tmp_path, progress=False)
    assert next(result.model.parameters()).is_cuda
    losses = [h["train_loss"] for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    resumed = train(model_cfg, TrainConfig(**{**train_cfg.__dict__, "epochs": 4}), MemoryStore(), out_dir=tmp_path,
                    resume=True, progress=False)
    assert resumed.epochs_run == 4
