"""Frechet distance, k-NN precision/recall and diversity invariants."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from mrigen.metrics import diversity, diversity_metric, frechet_distance, pair_indices, precision_recall


def _gauss(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, (n, d))


def test_fd_of_a_set_with_itself_is_zero() -> None:
    a = _gauss(200, 16, 0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_fd_is_symmetric_non_negative_and_orders_distributions() -> None:
    a, b, far = _gauss(300, 8, 0), _gauss(300, 8, 1), _gauss(300, 8, 2, shift=1.0)
    ab, ba = frechet_distance(a, b), frechet_distance(b, a)
    assert ab >= 0 and ab == pytest.approx(ba, rel=1e-6, abs=1e-9)
    assert frechet_distance(a, b) < frechet_distance(a, far)


def test_fd_matches_scipy_sqrtm_reference() -> None:
    a, b = _gauss(400, 6, 3), _gauss(400, 6, 4) * 1.5 + 0.2
    mu_a, mu_b, ca, cb = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_fd_handles_singular_covariance_and_refuses_bad_input() -> None:
    a, b = _gauss(10, 64, 5), _gauss(10, 64, 6)         # N < D: rank-deficient covariances
    assert np.isfinite(frechet_distance(a, b)) and frechet_distance(a, b) > 0
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance(a, b[:, :32])
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full_like(a, np.nan), b)


def test_precision_recall_identical_and_disjoint_sets() -> None:
    a = torch.from_numpy(_gauss(100, 8, 0))
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 100.0) == (0.0, 0.0)


def test_precision_recall_detect_mode_dropping() -> None:
    real = _gauss(400, 2, 0)
    collapsed = real[real[:, 0] > 0.5]                  # realistic samples from one region only
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.6
    with pytest.raises(ValueError, match="k="):
        precision_recall(real, collapsed, k=0)
    with pytest.raises(ValueError, match="N >= 11"):
        precision_recall(real, collapsed[:3])


def test_precision_groups_reach_across_near_duplicate_slices() -> None:
    """Real rows come in tight clusters (slices of one brain): plain k-NN balls stay inside a cluster and miss
    new points between clusters; balls that must reach another group's rows cover them."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 1.0, (8, 4))
    real = np.repeat(centres, 20, axis=0) + rng.normal(0.0, 0.01, (160, 4))   # 8 subjects x 20 slices
    groups = np.repeat(np.arange(8), 20)
    nearest = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(8) * 1e9
    mid = (centres[:4] + centres[nearest[:4].argmin(1)]) / 2      # 4 unseen subjects between real ones
    fake = (mid[:, None] + rng.normal(0.0, 0.01, (4, 25, 4))).reshape(100, 4)
    plain, _ = precision_recall(real, fake, k=5)
    grouped, recall = precision_recall(real, fake, k=5, real_groups=groups.tolist())
    assert plain == 0.0 and grouped == 1.0
    assert precision_recall(real, fake, k=5, real_groups=torch.from_numpy(groups)) == (grouped, recall)
    with pytest.raises(ValueError, match="labels for 160 real rows"):
        precision_recall(real, fake, k=5, real_groups=groups[:10].tolist())
    with pytest.raises(ValueError, match="largest group"):
        precision_recall(real, fake, k=5, real_groups=[0] * 158 + [1, 1])


def test_fake_groups_widen_the_recall_balls_as_real_groups_widen_the_precision_balls() -> None:
    """A grouped set on the `fake` side (the real baseline) gets the same balls as on the `real` side: swapping
    the two sets swaps precision and recall exactly."""
    rng = np.random.default_rng(1)
    clustered = np.repeat(rng.normal(0.0, 1.0, (8, 4)), 20, axis=0) + rng.normal(0.0, 0.01, (160, 4))
    groups = np.repeat(np.arange(8), 20).tolist()
    other = rng.normal(0.0, 1.0, (100, 4))
    precision, recall = precision_recall(clustered, other, k=5, real_groups=groups)
    assert precision_recall(other, clustered, k=5, fake_groups=groups) == (recall, precision)
    assert precision_recall(other, clustered, k=5)[1] < precision       # plain balls stay inside one cluster
    with pytest.raises(ValueError, match="fake_groups has 10 labels for 160 fake rows"):
        precision_recall(other, clustered, k=5, fake_groups=groups[:10])


@pytest.mark.parametrize(("size", "metric"), [(16, "ssim"), (32, "ms_ssim")])
def test_diversity_of_identical_images_is_one_and_lower_when_varied(size: int, metric: str) -> None:
    assert diversity_metric(size) == metric
    g = torch.Generator().manual_seed(0)
    one = torch.rand(1, 1, size, size, generator=g)
    pairs = pair_indices(8, 100, g)
    assert diversity(one.expand(8, 1, size, size), pairs) == pytest.approx(1.0, abs=1e-5)
    varied = torch.rand(8, 1, size, size, generator=g)
    assert diversity(varied, pairs) < 0.5


def test_pair_indices_all_pairs_or_random_distinct_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    assert pair_indices(5, 100, g).shape == (10, 2)
    pairs = pair_indices(1000, 300, g)
    assert pairs.shape == (300, 2) and bool((pairs[:, 0] != pairs[:, 1]).all()) and int(pairs.max()) < 1000
    assert torch.equal(pair_indices(1000, 300, torch.Generator().manual_seed(3)),
                       pair_indices(1000, 300, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="at least 2"):
        pair_indices(1, 10, g)
    with pytest.raises(ValueError, match="max_pairs"):
        pair_indices(10, 0, g)
