"""Second stage of a VQ-VAE: fit its autoregressive code prior on the training split's code grids."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mrigen.train.config import TrainConfig

__all__ = ["encode_split", "train_prior"]


@torch.no_grad()
def encode_split(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Nearest-code indices of every image.

    Args:
        images: (N, 1, H, W) in [0, 1] on the model's device.

    Returns:
        (N, h, w) int64 code grid.
    """
    was_training = model.training
    model.eval()
    out = torch.cat([model.encode_indices(images[i:i + batch_size].float())
                     for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


def train_prior(model: torch.nn.Module, train_x: torch.Tensor, cfg: TrainConfig,
                progress: bool = True) -> list[float]:
    """Train `model.prior` by maximum likelihood on the code grids of `train_x`; mark it trained.

    Returns:
        Mean cross-entropy (nats per code) of each prior epoch.
    """
    device = train_x.device
    codes = encode_split(model, train_x, cfg.eval_batch_size)                  # (N, h, w)
    prior = model.prior
    prior.train()
    optimizer = torch.optim.Adam(prior.parameters(), lr=cfg.prior_lr)
    batch = min(cfg.prior_batch_size, len(codes))
    n_batches = max(1, len(codes) // batch)
    history = []
    bar = tqdm(range(cfg.prior_epochs), desc="train code prior", unit="epoch", disable=not progress)
    for epoch in bar:
        gen = torch.Generator(device=device).manual_seed(cfg.seed + 10_000 + epoch)
        perm = torch.randperm(len(codes), device=device, generator=gen)
        total = torch.zeros((), device=device)
        for b in range(n_batches):
            loss = prior.loss(codes[perm[b * batch:(b + 1) * batch]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        history.append(float(total / n_batches))
        bar.set_postfix(nll=f"{history[-1]:.3f}")
    prior.eval()
    model.mark_prior_trained()
    return history
