"""Copy detection: how close samples sit to their nearest training slice, against held-out real slices.

Generators trained on slices of few subjects can reproduce training images (brief: Akbar et al. 2025). A sample
counts as memorised when its nearest training slice is closer (pixel-space L2, on a copy downsampled to at most
`MEMO_SIZE` px) than the closest any real slice of an unseen subject comes to the training set: no real image of
a new brain is that close, so such a sample is (nearly) a copy.

"Unseen subjects" are the held-out reference and, leave-one-subject-out, every training subject against the
other training subjects. With the reference alone (12 subjects on the demo store) the minimum is a poor tail
estimate: 19% of the slices of 12 other held-out subjects fell below it; with the leave-one-subject-out
distances added (96 more subjects) none did, while exact copies still score 1.

The training set includes each training slice's left-right mirror image (`mirror=True`, the default): a mirrored
training slice is no new brain either, and models whose autoencoder (`train.augment`) or prior
(`train.prior_mirror`) trained on mirrors can draw one (before: 0.002 of 500 mirrored training slices flagged,
now 1.000). The threshold then comes from the same mirror-augmented set, so unseen slices still score ~0, except
the slices of a near-mirror twin of a training subject (one test subject of the demo store: 0.014; docs/METRICS.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["LOSO_QUERIES", "MEMO_SIZE", "downsample", "memorisation", "nn_distances"]

MEMO_SIZE = 32      # images are average-pooled to at most this side before distances (cheap, keeps anatomy)
LOSO_QUERIES = 4096  # training slices (seeded draw) whose leave-one-subject-out distance enters the threshold


def downsample(images: torch.Tensor, max_side: int = MEMO_SIZE) -> torch.Tensor:
    """`(N, 1, H, W)` -> `(N, H' * W')` float32 rows, average-pooled by an integer factor to sides <= max_side.

    Distances are divided by sqrt(pixels) later, so they read as an RMS intensity difference at any size.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W); got shape {tuple(images.shape)}")
    if max_side < 1:
        raise ValueError(f"max_side={max_side!r} must be >= 1")
    factor = math.ceil(max(images.shape[-2:]) / max_side)
    x = images.float()
    if factor > 1:
        x = F.avg_pool2d(x, factor, stride=factor, ceil_mode=True)
    return x.flatten(1)


def nn_distances(query: torch.Tensor, bank: torch.Tensor, *, chunk: int = 512, query_groups: torch.Tensor | None = None,
                 bank_groups: torch.Tensor | None = None) -> torch.Tensor:
    """RMS pixel distance of each query row to its nearest bank row: `(N, P), (M, P) -> (N,)`.

    Args:
        query: `(N, P)` rows (see `downsample`).
        bank: `(M, P)` rows, same width, M >= 1.
        chunk: query rows per distance block (memory: chunk x M floats).
        query_groups, bank_groups: optional `(N,)`, `(M,)` int64 labels (e.g. subjects); a bank row of the query
            row's own group is not a neighbour (inf when no other group exists).
    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1] or bank.shape[0] == 0:
        raise ValueError(f"query (N, P) and a non-empty bank (M, P) must share P; got {tuple(query.shape)} "
                         f"and {tuple(bank.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be >= 1")
    if (query_groups is None) != (bank_groups is None):
        raise ValueError("query_groups and bank_groups must be given together")
    bank = bank.to(query.device, torch.float32)
    out = []
    for i in range(0, query.shape[0], chunk):
        d = torch.cdist(query[i:i + chunk].float(), bank)                # (chunk, M)
        if query_groups is not None:
            same = query_groups[i:i + chunk, None].to(d.device) == bank_groups[None, :].to(d.device)
            d = d.masked_fill(same, float("inf"))
        out.append(d.min(dim=1).values)
    return torch.cat(out).clamp_min(0.0) / math.sqrt(query.shape[1])


@torch.no_grad()
def memorisation(samples: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor, *,
                 train_groups: torch.Tensor | None = None, max_side: int = MEMO_SIZE, seed: int = 0,
                 mirror: bool = True) -> dict[str, float]:
    """Copy detector: share of samples nearer to the training set than any real slice of an unseen subject.

    Threshold = min of (each held-out slice's NN distance to `train`) and, when `train_groups` is given, (the
    NN distance of up to `LOSO_QUERIES` training slices to the training slices of OTHER subjects). With `mirror`,
    "the training slices" (what samples and held-out slices are compared against) include each one's left-right
    mirror image, a mirror taking its slice's subject.

    Args:
        samples: `(N, 1, H, W)` generated images in [0, 1].
        train: `(M, 1, H, W)` the training slices the model saw.
        heldout: `(R, 1, H, W)` real slices of subjects the model never saw (the evaluated split).
        train_groups: `(M,)` int64 subject ids of the training slices (None: held-out slices only).
        max_side: side the images are pooled down to before distances.
        seed: seeds the draw of leave-one-subject-out queries when there are more than `LOSO_QUERIES`.
        mirror: also count a sample near a mirrored training slice as a copy (False: the slices as given).

    Returns:
        `memorised` (share of samples below the threshold), `nn_train_dist` (median sample NN distance to
        train, RMS intensity) and `nn_train_dist_real` (the same median for the held-out slices).
    """
    if train_groups is not None and tuple(train_groups.shape) != (train.shape[0],):
        raise ValueError(f"train_groups must be ({train.shape[0]},) labels; got shape {tuple(train_groups.shape)}")
    bank = downsample(train, max_side)
    queries = bank                                         # leave-one-subject-out queries: the slices as given
    if mirror:
        bank = torch.cat([bank, downsample(train.flip(-1), max_side)])
        train_groups = None if train_groups is None else torch.cat([train_groups, train_groups])
    d_fake = nn_distances(downsample(samples, max_side), bank)
    d_real = nn_distances(downsample(heldout, max_side), bank)
    threshold = d_real.min()
    if train_groups is not None and len(torch.unique(train_groups)) > 1:
        idx = torch.arange(train.shape[0])
        if len(idx) > LOSO_QUERIES:
            idx = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:LOSO_QUERIES]
        groups = train_groups.to(bank.device)
        loso = nn_distances(queries[idx.to(bank.device)], bank, query_groups=groups[idx.to(bank.device)],
                            bank_groups=groups)
        threshold = torch.minimum(threshold, loso.min())
    return {"memorised": float((d_fake < threshold).double().mean()),
            "nn_train_dist": float(d_fake.median()),
            "nn_train_dist_real": float(d_real.median())}
