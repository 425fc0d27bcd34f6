"""`evaluate(model, store, split)`: every quality metric as one flat dict of floats, with real baselines."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from .features import FeatureNet, extract_features, get_feature_net
from .recon import recon_metrics
from .samples import PR_K, diversity, frechet_distance, pair_indices, precision_recall

__all__ = ["DIVERSITY_PAIRS", "evaluate", "real_halves"]

log = logging.getLogger(__name__)

DIVERSITY_PAIRS = 1000      # random pairs averaged for diversity (all pairs when there are fewer)
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class _Store(Protocol):
    """What evaluation needs of a slice store (a subset of `mrigen.data.store.SliceStore`)."""

    digest: str
    path: Path
    image_size: int

    def tensor(self, split: str, device: Any, dtype: torch.dtype = ...) -> torch.Tensor: ...

    def slices(self, split: str) -> list[dict[str, Any]]: ...


def real_halves(slices: list[dict[str, Any]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint, equally long, shuffled halves of a split's rows, split by subject where possible.

    Subjects are shuffled with `seed` and dealt to whichever half is shorter, so no subject has slices in both
    halves (neighbouring slices of one brain would make the real-vs-real baseline look too good); both halves
    are then cut to the shorter length. With a single subject (or no `subject` key) rows are split at random.

    Args:
        slices: `store.slices(split)`, one dict per image row.
        seed: seeds the shuffles.

    Returns:
        (idx_a, idx_b): `(m,)` int64 row indices each, disjoint.
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(slices)
    subjects = [str(row["subject"]) if "subject" in row else None for row in slices]
    names = sorted({s for s in subjects if s is not None})
    if None not in subjects and len(names) >= 2:
        rows: dict[str, list[int]] = {s: [] for s in names}
        for i, s in enumerate(subjects):
            rows[s].append(i)
        half_a: list[int] = []
        half_b: list[int] = []
        for k in torch.randperm(len(names), generator=gen).tolist():
            (half_a if len(half_a) <= len(half_b) else half_b).extend(rows[names[k]])
        a = torch.tensor(half_a)[torch.randperm(len(half_a), generator=gen)]
        b = torch.tensor(half_b)[torch.randperm(len(half_b), generator=gen)]
    else:
        log.warning("split has %s: real halves are split by slice, not by subject (baseline is optimistic)",
                    "one subject" if names else "no 'subject' key")
        perm = torch.randperm(n, generator=gen)
        a, b = perm[: n // 2], perm[n // 2:]
    m = min(len(a), len(b))
    return a[:m], b[:m]


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _samples(model: torch.nn.Module, n: int, size: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """`n` samples `(n, 1, size, size)` drawn in batches with one generator (deterministic for its seed)."""
    chunks = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = model.sample(b, generator=gen)
        if tuple(x.shape) != (b, 1, size, size):
            raise ValueError(f"model.sample({b}) returned shape {tuple(x.shape)}, expected {(b, 1, size, size)}")
        chunks.append(x.float())
    out = torch.cat(chunks)
    if not bool(torch.isfinite(out).all()):
        raise ValueError("model.sample returned NaN or inf (did the model diverge?)")
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, store: _Store, split: str = "val", *, n_samples: int | None = None,
             batch_size: int = 256, feature_net: FeatureNet | Path | str | None = None, seed: int = 0,
             device: torch.device | str | None = None) -> dict[str, float]:
    """All quality metrics of `model` on one split of `store`, each sample metric beside its real baseline.

    Reconstruction (all slices of the split): `ssim`, `psnr` (dB, capped at 100), `ms_ssim` (only at >= 22 px).
    Samples, in the feature space of the store's feature network: the split's slices are cut into two
    subject-disjoint halves A and B of m slices each (`real_halves`); the model draws n = m samples. Then
    `fd` = FD(samples, B) and `fd_real` = FD(A, B); `precision`/`recall` of the samples against B and
    `precision_real`/`recall_real` of A against B (k = 3); `diversity` = mean pairwise MS-SSIM (SSIM below
    22 px) among the samples and `diversity_real` among A, over the same index pairs. Sample and baseline
    numbers are thus computed on sets of equal size, so their finite-sample biases match.

    If `model.sample` raises RuntimeError (e.g. a VQ-VAE whose prior was never trained), a warning is logged
    and only the reconstruction keys are returned.

    Args:
        model: the Model contract: `reconstruct(x)` and `sample(n, generator=...)`, images `(B, 1, H, W)`.
        store: the slice store (digest, path, image_size, tensor(split, device), slices(split)).
        split: which split to evaluate.
        n_samples: samples to draw and the size of each real half; None = the largest possible (m).
        batch_size: images per model / feature-net call.
        feature_net: a FeatureNet, a weights file for one, or None for the store's cached (or newly trained) one.
        seed: seeds the halves, the sampling generator (on the model's device) and the diversity pairs.
        device: where to compute; default the model's device.

    Returns:
        Flat dict of finite floats: ssim, psnr[, ms_ssim][, fd, fd_real, precision, recall, precision_real,
        recall_real, diversity, diversity_real].
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    device = torch.device(device) if device is not None else _model_device(model)
    real = store.tensor(split, device)                                   # (N, 1, H, W) in [0, 1]
    slices = store.slices(split)
    if real.ndim != 4 or real.shape[1] != 1 or len(slices) != real.shape[0]:
        raise ValueError(f"store split {split!r}: tensor shape {tuple(real.shape)} does not match its "
                         f"{len(slices)} slice rows (expected (N, 1, H, W))")
    idx_a, idx_b = real_halves(slices, seed)
    m = len(idx_a)
    if m < PR_K + 1:
        raise ValueError(f"split {split!r} has {real.shape[0]} slices; evaluate needs two real halves of "
                         f">= {PR_K + 1} slices each")
    if n_samples is not None and not PR_K + 1 <= n_samples <= m:
        raise ValueError(f"n_samples={n_samples!r} must be in [{PR_K + 1}, {m}] for split {split!r} "
                         f"(each real half of the split has {m} slices)")
    n = n_samples or m
    idx_a, idx_b = idx_a[:n].to(device), idx_b[:n].to(device)

    was_training = model.training
    model.eval()
    try:
        result = recon_metrics(model, real, batch_size=batch_size, ms_ssim=True)
        gen = torch.Generator(device=device).manual_seed(seed)
        try:
            fake = _samples(model, n, int(store.image_size), batch_size, gen)
        except RuntimeError as exc:
            if isinstance(exc, _OOM):
                raise
            log.warning("model cannot sample (%s: %s): reporting reconstruction metrics only for split %r",
                        type(exc).__name__, exc, split)
            return result
    finally:
        model.train(was_training)

    if not isinstance(feature_net, FeatureNet):
        feature_net = get_feature_net(store, feature_net, device=device)
    feature_net = feature_net.to(device)
    feats_a = extract_features(feature_net, real[idx_a], batch_size=batch_size)
    feats_b = extract_features(feature_net, real[idx_b], batch_size=batch_size)
    feats_fake = extract_features(feature_net, fake, batch_size=batch_size)
    result["fd"] = frechet_distance(feats_fake, feats_b)
    result["fd_real"] = frechet_distance(feats_a, feats_b)
    result["precision"], result["recall"] = precision_recall(feats_b, feats_fake)
    result["precision_real"], result["recall_real"] = precision_recall(feats_b, feats_a)
    pairs = pair_indices(n, DIVERSITY_PAIRS, torch.Generator().manual_seed(seed + 1))
    result["diversity"] = diversity(fake, pairs, batch_size=batch_size)
    result["diversity_real"] = diversity(real[idx_a], pairs, batch_size=batch_size)
    bad = sorted(k for k, v in result.items() if v != v or v in (float("inf"), float("-inf")))
    if bad:
        raise RuntimeError(f"evaluate produced non-finite metric(s) {bad} on split {split!r}")
    log.info("evaluated %s on %r (%d samples vs %d real): SSIM %.3f, PSNR %.1f dB, FD %.4f (real %.4f), "
             "precision %.2f (real %.2f), recall %.2f (real %.2f), diversity %.3f (real %.3f)",
             type(model).__name__, split, n, n, result["ssim"], result["psnr"], result["fd"], result["fd_real"],
             result["precision"], result["precision_real"], result["recall"], result["recall_real"],
             result["diversity"], result["diversity_real"])
    return result
