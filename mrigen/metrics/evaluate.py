"""`evaluate(model, store, split)`: every quality metric as one flat dict of floats, with real baselines."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from .features import FeatureNet, extract_features, get_feature_net, train_halves
from .memorisation import memorisation
from .recon import recon_metrics
from .samples import PR_K, diversity, frechet_distance, pair_indices, precision_recall
from .spectrum import hf_ratio

__all__ = ["BASELINE_SPLIT", "DIVERSITY_PAIRS", "EVAL_SAMPLES", "evaluate", "sample_metrics"]

log = logging.getLogger(__name__)

DIVERSITY_PAIRS = 1000      # random pairs averaged for diversity (all pairs when there are fewer)
EVAL_SAMPLES = 500          # samples drawn when n_samples is None (and the size of the real baseline)
BASELINE_SPLIT = "train"    # the real baseline is drawn from this split: subject-disjoint from val / test
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class _Store(Protocol):
    """What evaluation needs of a slice store (a subset of `mrigen.data.store.SliceStore`)."""

    digest: str
    path: Path
    image_size: int

    def tensor(self, split: str, device: Any, dtype: torch.dtype = ...) -> torch.Tensor: ...

    def slices(self, split: str) -> list[dict[str, Any]]: ...


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


def _recon_attrs(model: torch.nn.Module, rows: list[dict[str, Any]], device: torch.device) -> torch.Tensor | None:
    """Encoded attributes of the slices for a conditional VAE's `reconstruct` (its encoder and decoder take them);
    None for other models (a VQ-VAE or a flow-prior VAE conditions only its prior)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not getattr(cfg, "autoencoder_conditioned", False):
        return None
    from mrigen.models.condition import encode_rows

    return encode_rows(cfg.conditions, rows).to(device)


def _finite(result: dict[str, float], where: str) -> dict[str, float]:
    bad = sorted(k for k, v in result.items() if v != v or v in (float("inf"), float("-inf")))
    if bad:
        raise RuntimeError(f"evaluate produced non-finite metric(s) {bad} on {where}")
    return result


def _ids(labels: Sequence[object]) -> torch.Tensor:
    """Labels -> `(N,)` int64 ids (equal labels, equal ids)."""
    lookup: dict[object, int] = {}
    return torch.tensor([lookup.setdefault(label, len(lookup)) for label in labels], dtype=torch.int64)


def _subject_groups(subjects: list[str], k: int, split: str, what: str = "precision") -> list[str] | None:
    """The subjects as k-NN groups, or None (plain k-NN, logged) when too few slices lie outside one subject."""
    largest = max(subjects.count(s) for s in set(subjects))
    if len(subjects) - largest >= k:
        return subjects
    log.warning("split %r has %d subject(s): %s uses plain k-NN balls, which adjacent slices of one brain "
                "shrink (%s_real will be low)", split, len(set(subjects)), what, what)
    return None


@torch.no_grad()
def sample_metrics(fake: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor, train: torch.Tensor, *,
                   feature_net: FeatureNet, reference_groups: Sequence[object] | None = None,
                   baseline_groups: Sequence[object] | None = None, train_groups: Sequence[object] | None = None,
                   seed: int = 0, batch_size: int = 256, k: int = PR_K) -> dict[str, float]:
    """Sample-quality keys of `fake`, each beside the same number for a real `baseline` set.

    Both sets are compared with the same code against the same `reference` (held-out real slices):
    `fd`, `fd_real`, `fd_ratio` = fd / fd_real; `precision`, `recall`, `precision_real`, `recall_real`
    (k-NN manifolds, `k`); `diversity`, `diversity_real` (mean pairwise MS-SSIM over the same index pairs);
    `hf_ratio`, `hf_ratio_real` (high-frequency power in the brain over the reference's: < 1 softer, > 1
    noisier; see `mrigen.metrics.spectrum`); `memorised`, `nn_train_dist`, `nn_train_dist_real` (see
    `memorisation`).

    Args:
        fake: `(N, 1, H, W)` samples in [0, 1], N > k.
        reference: `(R, 1, H, W)` held-out real slices, R > k.
        baseline: `(M, 1, H, W)` real slices of other subjects than `reference` (e.g. a train subset), M > k.
        train: `(T, 1, H, W)` the slices the model was trained on (memorisation check).
        feature_net: feature network, on the images' device.
        reference_groups: the subject of each reference slice; the reference's k-NN balls then reach the k-th
            nearest slice of another subject (see `precision_recall`). None = plain k-NN.
        baseline_groups: the same for the baseline's balls (`recall_real`): the baseline is grouped real slices
            too, where a generator's samples are independent (docs/METRICS.md). None = plain k-NN.
        train_groups: the subject of each training slice, for the leave-one-subject-out part of the
            memorisation threshold (see `memorisation`). None = held-out distances only.
        seed: seeds the diversity pairs and the memorisation queries.
        batch_size: images per feature-net / similarity call.
        k: neighbourhood size of precision / recall.

    Returns:
        Flat dict of finite floats with the keys above.
    """
    for name, images in (("fake", fake), ("reference", reference), ("baseline", baseline)):
        if images.ndim != 4 or images.shape[1] != 1 or images.shape[0] <= k:
            raise ValueError(f"{name} must be (N, 1, H, W) with N > k={k}; got shape {tuple(images.shape)}")
    if not fake.shape[-2:] == reference.shape[-2:] == baseline.shape[-2:] == train.shape[-2:]:
        raise ValueError(f"image sides differ: fake {tuple(fake.shape)}, reference {tuple(reference.shape)}, "
                         f"baseline {tuple(baseline.shape)}, train {tuple(train.shape)}")
    feats_ref = extract_features(feature_net, reference, batch_size=batch_size)
    feats_base = extract_features(feature_net, baseline, batch_size=batch_size)
    feats_fake = extract_features(feature_net, fake, batch_size=batch_size)
    result = {"fd": frechet_distance(feats_fake, feats_ref), "fd_real": frechet_distance(feats_base, feats_ref)}
    result["fd_ratio"] = result["fd"] / max(result["fd_real"], 1e-12)
    result["feature_nets"] = float(len(feature_net.members))       # what fd / precision / recall were measured with
    # Precision / recall use the embedding only: with the detector probabilities in, the k-NN ball of the odd
    # real slice the detector flags (say, as noisy) reaches across to that failure's corner and covers every
    # sample showing it (measured: noisy slices scored precision 0.98). FD has no such outlier balls.
    ref, base, fake_emb = (feature_net.embedding(f) for f in (feats_ref, feats_base, feats_fake))
    result["precision"], result["recall"] = precision_recall(ref, fake_emb, k=k, real_groups=reference_groups)
    result["precision_real"], result["recall_real"] = precision_recall(ref, base, k=k, real_groups=reference_groups,
                                                                       fake_groups=baseline_groups)
    pairs = pair_indices(min(fake.shape[0], baseline.shape[0]), DIVERSITY_PAIRS,
                         torch.Generator().manual_seed(seed + 1))
    result["diversity"] = diversity(fake, pairs, batch_size=batch_size)
    result["diversity_real"] = diversity(baseline, pairs, batch_size=batch_size)
    result["hf_ratio"] = hf_ratio(fake, reference, batch_size=batch_size)
    result["hf_ratio_real"] = hf_ratio(baseline, reference, batch_size=batch_size)
    groups = None if train_groups is None else _ids(train_groups)
    result.update(memorisation(fake, train, reference, train_groups=groups, seed=seed))
    return result


@torch.no_grad()
def evaluate(model: torch.nn.Module, store: _Store, split: str = "val", *, n_samples: int | None = None,
             batch_size: int = 256, feature_net: FeatureNet | Path | str | None = None, seed: int = 0,
             device: torch.device | str | None = None, feature_nets: int | None = None) -> dict[str, float]:
    """All quality metrics of `model` on one held-out split of `store`, each sample metric beside a real baseline.

    Reconstruction (all slices of the split): `ssim`, `psnr` (dB, capped at 100), `ms_ssim` (only at >= 22 px),
    `recon_hf_ratio` (the reconstructions' high-frequency power over the originals': < 1 = a soft decoder).
    Samples (`sample_metrics`): the reference is every slice of `split` (subjects the model never saw); the model
    draws n = `n_samples` or `EVAL_SAMPLES` samples; the baseline is min(n, all) real slices drawn (seeded) from
    the store's "train" split, from the `train_halves` half of its subjects that the feature network did not
    train on (train subjects are disjoint from the held-out ones). Samples and baseline go through the same code
    against the same reference, so `fd_ratio` = fd / fd_real is ~1 for samples as good as real slices of other
    subjects. Precision/recall use k = `PR_K`, with reference balls that reach another subject's slices.

    If `model.sample` raises RuntimeError (e.g. a VQ-VAE whose prior was never trained), a warning is logged
    and only the reconstruction keys are returned.

    Args:
        model: the Model contract: `reconstruct(x)` and `sample(n, generator=...)`, images `(B, 1, H, W)`.
        store: the slice store (digest, path, image_size, tensor(split, device), slices(split)).
        split: the held-out split to evaluate ("val" or "test"; "train" is the baseline and is refused).
        n_samples: samples to draw (> PR_K); None = `EVAL_SAMPLES`.
        batch_size: images per model / feature-net call.
        feature_net: a FeatureNet, a weights file for one, or None for the store's cached (or newly trained) one.
        feature_nets: with `feature_net` None, the networks in the store's ensemble (None: the default, 3, or
            `MRIGEN_FEATURE_NET_MEMBERS`); each count is its own cached file and its own metric.
        seed: seeds the baseline draw, the sampling generator (on the model's device) and the diversity pairs.
        device: where to compute; default the model's device.

    Returns:
        Flat dict of finite floats: ssim, psnr[, ms_ssim], recon_hf_ratio[, fd, fd_real, fd_ratio, precision,
        recall, precision_real, recall_real, diversity, diversity_real, hf_ratio, hf_ratio_real, memorised,
        nn_train_dist, nn_train_dist_real]
        and, for a conditional model, the conditioning fidelity (`mrigen.metrics.fidelity`): cond_slice_pos_mae,
        cond_site_acc, cond_age_mae, cond_sex_acc (each with its `_real` yardstick) for its attributes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    if split == BASELINE_SPLIT:
        raise ValueError(f"split={split!r}: evaluate compares samples with held-out subjects; the "
                         f"{BASELINE_SPLIT!r} split is the real baseline (use 'val' or 'test')")
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral)
                                  or n_samples <= PR_K):
        raise ValueError(f"n_samples={n_samples!r} must be an integer > {PR_K} (the precision/recall k), or None")
    n = int(n_samples) if n_samples is not None else EVAL_SAMPLES
    device = torch.device(device) if device is not None else _model_device(model)
    real = store.tensor(split, device)                                   # (R, 1, H, W) in [0, 1]
    subjects = [str(row.get("subject", i)) for i, row in enumerate(store.slices(split))]
    if real.ndim != 4 or real.shape[1] != 1 or len(subjects) != real.shape[0]:
        raise ValueError(f"store split {split!r}: tensor shape {tuple(real.shape)} does not match its "
                         f"slice rows (expected (N, 1, H, W), one row per image)")
    train = store.tensor(BASELINE_SPLIT, device)                         # (T, 1, H, W)
    if real.shape[0] <= PR_K or train.shape[0] <= PR_K:
        raise ValueError(f"evaluate needs more than {PR_K} slices in split {split!r} (has {real.shape[0]}) and "
                         f"in {BASELINE_SPLIT!r} (has {train.shape[0]})")
    train_slices = store.slices(BASELINE_SPLIT)
    if len(train_slices) != train.shape[0]:
        raise ValueError(f"store split {BASELINE_SPLIT!r}: {len(train_slices)} slice rows for {train.shape[0]} images")
    _, rows = train_halves(train_slices)                                 # subjects the feature net never saw
    m = min(n, len(rows))
    if m < n:
        log.warning("the baseline half of the %r split has only %d slices: the real baseline uses all of them "
                    "against %d samples", BASELINE_SPLIT, m, n)
    pick = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:m]]
    baseline = train[pick.to(device)]

    was_training = model.training
    model.eval()
    try:
        result = recon_metrics(model, real, batch_size=batch_size, ms_ssim=True, spectrum=True,
                               attrs=_recon_attrs(model, store.slices(split), device))
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
        feature_net = get_feature_net(store, feature_net, device=device, members=feature_nets)
    feature_net = feature_net.to(device)
    result.update(sample_metrics(fake, real, baseline, train, feature_net=feature_net,
                                 reference_groups=_subject_groups(subjects, PR_K, split),
                                 baseline_groups=_subject_groups(
                                     [str(train_slices[i].get("subject", i)) for i in pick.tolist()], PR_K,
                                     BASELINE_SPLIT, "recall"),
                                 train_groups=[str(row.get("subject", "")) for row in train_slices],
                                 seed=seed, batch_size=batch_size))
    if getattr(getattr(model, "config", None), "conditions", ()):
        from mrigen.metrics.fidelity import conditioning_fidelity
        from mrigen.metrics.probe import get_probes

        probes = get_probes(store, device=device)
        result.update(conditioning_fidelity(model, store, probes, split=split, n=n, seed=seed,
                                            batch_size=batch_size))
    _finite(result, f"split {split!r}")
    log.info("evaluated %s on %r (%d samples, %d baseline, %d reference): SSIM %.3f, PSNR %.1f dB, fd_ratio %.2f, "
             "precision %.2f (real %.2f), recall %.2f (real %.2f), diversity %.3f (real %.3f), "
             "hf_ratio %.2f (real %.2f), memorised %.3f",
             type(model).__name__, split, n, m, real.shape[0], result["ssim"], result["psnr"], result["fd_ratio"],
             result["precision"], result["precision_real"], result["recall"], result["recall_real"],
             result["diversity"], result["diversity_real"], result["hf_ratio"], result["hf_ratio_real"],
             result["memorised"])
    return result
