"""Sample-quality metrics: Frechet distance, k-NN precision/recall, and diversity (mean pairwise similarity)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .recon import ms_ssim_betas, ms_ssim_per_image, ssim_per_image

__all__ = ["PR_K", "diversity", "diversity_metric", "frechet_distance", "pair_indices", "precision_recall"]

PR_K = 10   # k of the k-NN manifolds (Kynkaanniemi et al. use 3 on i.i.d. images; docs/METRICS.md says why 10)


def _as_features(name: str, feats: torch.Tensor | np.ndarray, min_rows: int) -> np.ndarray:
    """`(N, D)` finite features as float64 numpy; ValueError naming `name` otherwise."""
    arr = feats.detach().to("cpu", torch.float64).numpy() if isinstance(feats, torch.Tensor) else np.asarray(
        feats, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < min_rows:
        raise ValueError(f"{name} must be (N, D) features with N >= {min_rows}; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or inf")
    return arr


def _sqrtm_psd(mat: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (negative eigs -> 0)."""
    vals, vecs = np.linalg.eigh((mat + mat.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula, any feature net).

    `|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))`, where the last trace is computed stably as
    `sum(sqrt(eig(S_a^(1/2) S_b S_a^(1/2))))`: that matrix is symmetric PSD and has the eigenvalues of `S_a S_b`,
    so there is no complex sqrtm output to discard and singular covariances (N < D) are fine.

    Args:
        feats_a: `(N, D)` features, N >= 2.
        feats_b: `(M, D)` features, M >= 2.

    Returns:
        A float >= 0; ~0 for a set against itself, symmetric in its arguments up to rounding.
    """
    a = _as_features("feats_a", feats_a, 2)
    b = _as_features("feats_b", feats_b, 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: feats_a has {a.shape[1]}, feats_b has {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)     # (D, D) each
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum())
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)
    return max(fd, 0.0)   # rounding can leave -1e-12 for identical sets


def _cdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distances `(N, D), (M, D) -> (N, M)` (no matmul shortcut: identical rows give 0)."""
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def _knn_radius(feats: torch.Tensor, k: int, chunk: int, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row: `(N, D) -> (N,)`.

    With `groups` (`(N,)` int64), rows of the row's own group (itself included) are not neighbours.
    """
    radii = []
    for start in range(0, feats.shape[0], chunk):
        d = _cdist(feats[start:start + chunk], feats)                   # (chunk, N), self at distance 0
        if groups is None:
            radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])   # index 0 is the point itself
        else:
            same = groups[start:start + chunk, None] == groups[None, :]     # (chunk, N), self included
            radii.append(d.masked_fill(same, float("inf")).topk(k, dim=1, largest=False).values[:, k - 1])
    return torch.cat(radii)


def _covered(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """Whether each query row lies inside at least one reference k-NN ball: `(N,)` bool."""
    hits = []
    for start in range(0, query.shape[0], chunk):
        d = _cdist(query[start:start + chunk], ref)                     # (chunk, M)
        hits.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(hits)


def _group_ids(groups: Sequence[object] | torch.Tensor, n: int, k: int, name: str = "real") -> torch.Tensor:
    """Group labels as `(n,)` int64 ids; ValueError unless every row has >= k rows outside its group."""
    if len(groups) != n:
        raise ValueError(f"{name}_groups has {len(groups)} labels for {n} {name} rows")
    labels = groups.tolist() if isinstance(groups, torch.Tensor) else list(groups)
    lookup = {g: i for i, g in enumerate(dict.fromkeys(labels))}
    ids = torch.tensor([lookup[g] for g in labels], dtype=torch.int64)
    largest = int(torch.bincount(ids).max())
    if n - largest < k:
        raise ValueError(f"{name}_groups: the largest group has {largest} of {n} rows, leaving fewer than k={k} "
                         "rows of other groups as neighbours")
    return ids


def precision_recall(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, *, k: int = PR_K,
                     chunk: int = 1024, real_groups: Sequence[object] | torch.Tensor | None = None,
                     fake_groups: Sequence[object] | torch.Tensor | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

    Precision: share of `fake` inside the real manifold (the union of balls around each real feature reaching
    its k-th real neighbour): are samples realistic? Recall: share of `real` inside the fake manifold: do the
    samples cover the real variety?

    Args:
        real: `(N, D)` features, N > k.
        fake: `(M, D)` features, M > k.
        k: neighbourhood size.
        chunk: rows per distance block (memory bound: chunk x max(N, M) floats).
        real_groups: optional `N` labels (e.g. the subject of each real slice); a real ball then reaches the
            k-th nearest real row of ANOTHER group. Adjacent slices of one brain are near-duplicates: without
            this the balls shrink to the slice spacing and no other brain (nor any sample) falls inside.
        fake_groups: the same for `fake`'s balls (recall), when `fake` is itself grouped real slices (the real
            baseline of `evaluate`); a generator's samples are independent and keep plain balls.

    Returns:
        (precision, recall) in [0, 1]; (1, 1) for identical sets, (0, 0) for far-apart sets.
    """
    if k < 1:
        raise ValueError(f"k={k!r} must be >= 1")
    r = torch.from_numpy(_as_features("real", real, k + 1))
    f = torch.from_numpy(_as_features("fake", fake, k + 1))
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature widths differ: real has {r.shape[1]}, fake has {f.shape[1]}")
    groups = None if real_groups is None else _group_ids(real_groups, r.shape[0], k)
    groups_f = None if fake_groups is None else _group_ids(fake_groups, f.shape[0], k, "fake")
    precision = _covered(f, r, _knn_radius(r, k, chunk, groups), chunk).double().mean()
    recall = _covered(r, f, _knn_radius(f, k, chunk, groups_f), chunk).double().mean()
    return float(precision), float(recall)


def diversity_metric(size: int) -> str:
    """Similarity used by `diversity` at this image side: "ms_ssim" when MS-SSIM fits (>= 22 px), else "ssim"."""
    return "ms_ssim" if ms_ssim_betas(size) is not None else "ssim"


def pair_indices(n: int, max_pairs: int, generator: torch.Generator) -> torch.Tensor:
    """Index pairs `(P, 2)` int64 of distinct images among `n`: all pairs if there are at most `max_pairs`,
    else `max_pairs` random pairs (i != j, drawn with `generator`)."""
    if n < 2:
        raise ValueError(f"diversity needs at least 2 images; got {n}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs={max_pairs!r} must be >= 1")
    if n * (n - 1) // 2 <= max_pairs:
        return torch.combinations(torch.arange(n), r=2)
    i = torch.randint(0, n, (max_pairs,), generator=generator)
    j = (i + torch.randint(1, n, (max_pairs,), generator=generator)) % n     # uniform over j != i
    return torch.stack([i, j], dim=1)


@torch.no_grad()
def diversity(images: torch.Tensor, pairs: torch.Tensor, *, batch_size: int = 256) -> float:
    """Mean pairwise similarity among images: MS-SSIM (or SSIM below 22 px, see `diversity_metric`).

    Higher means MORE alike: 1 for identical images, lower for a varied set. Compare with the same number on
    real slices (`diversity_real`): far above it means mode collapse, far below means noise-like samples.

    Args:
        images: `(N, 1, H, W)` in [0, 1].
        pairs: `(P, 2)` int64 indices into images (see `pair_indices`).
        batch_size: pairs per similarity call.

    Returns:
        The mean over the pairs.
    """
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
        raise ValueError(f"pairs must be a non-empty (P, 2) tensor; got shape {tuple(pairs.shape)}")
    if int(pairs.max()) >= images.shape[0] or int(pairs.min()) < 0:
        raise ValueError(f"pairs index outside the {images.shape[0]} images")
    sim = ms_ssim_per_image if diversity_metric(min(images.shape[-2:])) == "ms_ssim" else ssim_per_image
    pairs = pairs.to(images.device)
    total = 0.0
    for start in range(0, pairs.shape[0], batch_size):
        p = pairs[start:start + batch_size]
        total += float(sim(images[p[:, 0]], images[p[:, 1]]).double().sum())
    return total / pairs.shape[0]
