"""Training throughput: mrigen's `train()` against a bare PyTorch loop of the same model, batch and loss.

Both run in this process, one after the other, on the same resident data, so the ratio is robust to a noisy
machine. The mrigen figure is the wall time of `train()` itself: batch sampling, per-epoch validation (loss,
SSIM/PSNR, active units or perplexity), the hooks (local logger by default) and checkpoints are all included;
only the final full evaluation is off (it is a one-off, not per-epoch work). Three mrigen figures are printed:
- `ratio`: the whole `train()` call, one-off costs included (model build, final checkpoint, model save, loss
  curves), so it depends on the number of epochs;
- `epoch_wall_ratio`: the steady state with validation and logging included: the median wall time between
  two consecutive ends of epoch (training, validation, every hook), against the bare loop;
- `head_s` / `tail_s`: the one-off seconds before the first epoch (model build, data to device: the first end
  of epoch minus one median interval) and after the last end of epoch (final checkpoint, model save, final
  grids, loss curves).

    python bench/train_throughput.py --device cpu --size 64 --batch 64 --n 2048 --epochs 2
    python bench/train_throughput.py --device cuda --size 128 --batch 256 --family vae --n 16384 --epochs 5
    python bench/train_throughput.py --device cpu --config experiments/configs/vqvae-recommended.yaml --batch 16 \
        --n 1024 [--contiguous]           # a recipe's model; --contiguous: NCHW instead of channels_last
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

from mrigen.device import pick_device
from mrigen.models import ModelConfig, build_model
from mrigen.models.losses import vae_loss, vq_vae_loss
from mrigen.train import Hook, LocalLogger, TrainConfig, train
from mrigen.train.configs import build_configs, load_config_file


class ResidentStore:
    """The slice-store contract over tensors already in memory (random smooth images in [0, 1])."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        low = torch.rand(n, 1, size // 8, size // 8, generator=g)
        self._x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        self._val = self._x[: max(64, n // 10)]
        self.image_size, self.digest, self.path = size, "bench", Path("<memory>")

    def tensor(self, split: str, device, dtype=torch.float32) -> torch.Tensor:
        return (self._x if split == "train" else self._val).to(device=device, dtype=dtype)

    def slices(self, split: str) -> list[dict]:
        return [{"subject": "bench", "slice_pos": 0.0, "site": "Guys"}] * len(self.tensor(split, "cpu"))


def bare_loop(model_cfg: ModelConfig, tcfg: TrainConfig, x: torch.Tensor, epochs: int) -> float:
    """The textbook loop: resident data, random batches, autocast/channels_last like mrigen. Returns img/s."""
    device = x.device
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)
    cuda = device.type == "cuda"
    if tcfg.channels_last:                              # as mrigen: NHWC on CUDA and on the CPU
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr, **({"fused": True} if cuda else {}))
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and tcfg.amp != "off" else contextlib.nullcontext
    nb = len(x) // tcfg.batch_size

    def epoch() -> None:
        perm = torch.randperm(len(x), device=device)
        for b in range(nb):
            xb = x[perm[b * tcfg.batch_size:(b + 1) * tcfg.batch_size]].float()
            if tcfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with amp():
                out = model(xb)
            out = type(out)(*(t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in out))
            if model_cfg.family == "vae":                # the run config's loss, as mrigen computes it
                loss = vae_loss(out, xb, recon=tcfg.recon, beta=tcfg.beta, kl_weight=1.0, free_bits=tcfg.free_bits,
                                ssim_weight=tcfg.ssim_weight, spectral_weight=tcfg.spectral_weight, sigma=tcfg.sigma,
                                log_sigma=model.log_sigma).total
            else:
                loss = vq_vae_loss(out, xb, recon=tcfg.recon, ssim_weight=tcfg.ssim_weight,
                                   spectral_weight=tcfg.spectral_weight).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    epoch()                                  # warm-up (cuDNN autotune, allocator)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    if cuda:
        torch.cuda.synchronize()
    return epochs * nb * tcfg.batch_size / (time.perf_counter() - t0)


class EpochClock(Hook):
    """Last hook of the run: the wall clock at each end of epoch, after validation and every other hook."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_epoch_end(self, ctx, epoch: int, metrics: dict[str, float]) -> None:
        self.ends.append(time.perf_counter())


def mrigen_loop(model_cfg: ModelConfig, tcfg: TrainConfig, store: ResidentStore,
                epochs: int) -> dict[str, float]:
    """`train()` with validation every epoch, the local logger, a checkpoint and the final model save.

    Returns:
        whole_img_s (over the whole `train()` wall time), epoch_wall_img_s (median end-to-end epoch interval:
        training, validation and hooks), epoch_img_s (median training part of an epoch), head_s and tail_s.
    """
    clock = EpochClock()
    with tempfile.TemporaryDirectory() as tmp:
        warm = train(model_cfg, TrainConfig(**{**tcfg.__dict__, "epochs": 1}), store, progress=False)
        del warm
        t0 = time.perf_counter()
        result = train(model_cfg, tcfg, store, out_dir=Path(tmp), hooks=[LocalLogger(Path(tmp)), clock],
                       progress=False)
        seconds = time.perf_counter() - t0
    images = (len(store.tensor("train", "cpu")) // tcfg.batch_size) * tcfg.batch_size
    assert result.epochs_run == epochs
    per_epoch = sorted(h["img_per_s"] for h in result.history)
    gaps = sorted(b - a for a, b in zip(clock.ends, clock.ends[1:])) or [clock.ends[0] - t0]
    interval = gaps[len(gaps) // 2]
    return {"whole_img_s": epochs * images / seconds, "epoch_wall_img_s": images / interval,
            "epoch_img_s": per_epoch[len(per_epoch) // 2], "head_s": clock.ends[0] - t0 - interval,
            "tail_s": t0 + seconds - clock.ends[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--family", choices=["vae", "vqvae"], default="vae")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--n", type=int, default=2048, help="training images")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json", type=Path, help="append the result as one JSON line to this file")
    p.add_argument("--config", type=Path, help="take the model (and loss settings) of this run config, e.g. "
                                               "experiments/configs/vae-recommended.yaml; default: thesis ladder")
    p.add_argument("--contiguous", action="store_true", help="NCHW tensors instead of channels_last (both loops)")
    args = p.parse_args()
    device = pick_device(args.device)
    if args.config:
        layer = load_config_file(args.config)
        family = layer["model"].get("family", args.family)
        model_cfg, file_tcfg = build_configs(family, layer, {"model": {"image_size": args.size}})
    else:
        family = args.family
        model_cfg, file_tcfg = build_configs(family, {"model": {"image_size": args.size,
                                                                "blocks": 5 if family == "vae" else 3}})
    tcfg = TrainConfig(**{**file_tcfg.__dict__, "epochs": args.epochs, "batch_size": args.batch,
                          "device": str(device), "final_eval": False, "prior_steps": 0, "grid_every": 0,
                          "early_stop_patience": 0, "channels_last": not args.contiguous})
    store = ResidentStore(args.n, args.size)
    bare = bare_loop(model_cfg, tcfg, store.tensor("train", device, torch.float16 if device.type == "cuda"
                                                   else torch.float32), args.epochs)
    ours = mrigen_loop(model_cfg, tcfg, store, args.epochs)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    row = {"device": name, "family": family, "config": str(args.config or "thesis"),
           "layout": "contiguous" if args.contiguous else "channels_last", "size": args.size, "batch": args.batch, "n": args.n,
           "epochs": args.epochs, "bare_img_s": round(bare), "mrigen_img_s": round(ours["whole_img_s"]),
           "ratio": round(ours["whole_img_s"] / bare, 3),
           "epoch_wall_ratio": round(ours["epoch_wall_img_s"] / bare, 3),
           "head_s": round(ours["head_s"], 2), "tail_s": round(ours["tail_s"], 2), "mrigen_epoch_img_s": round(ours["epoch_img_s"]),
           "epoch_ratio": round(ours["epoch_img_s"] / bare, 3)}
    print(json.dumps(row))
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
