"""Ingest end to end on generated cohorts: split, normalisation, determinism, band geometry, errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrigen.data.config import IngestConfig
from mrigen.data.demo import make_demo_cohort
from mrigen.data.ingest import IngestError, ingest, split_subjects
from mrigen.data.slicing import extract_slices, resample_matrix
from mrigen.data.validate import read_volume

CFG = IngestConfig(size=32, slices=10)


def test_store_content_split_and_metadata(cohort, tmp_path):
    store = ingest(cohort, tmp_path / "store", CFG, progress=False)
    assert store.splits == ("train", "val", "test")
    subjects = {s: {r["subject"] for r in store.slices(s)} for s in store.splits}
    assert not subjects["train"] & subjects["val"] and not subjects["train"] & subjects["test"]
    assert not subjects["val"] & subjects["test"]
    assert sum(len(v) for v in subjects.values()) == 6
    for split in store.splits:
        imgs = store.images(split).astype(np.float32)
        assert imgs.shape[1:] == (32, 32) and imgs.min() >= 0.0 and imgs.max() <= 1.0
        rows = store.slices(split)
        assert len(rows) == len(imgs)
        assert all(r["age"] is not None and r["sex"] in ("M", "F") for r in rows)
        assert all(0.0 <= r["slice_pos"] <= 1.0 for r in rows)
        assert set(store.manifest["splits"][split]["subjects"]) == subjects[split]
    report = store.manifest["report"]
    assert report["skipped"] == [] and report["demographics"]["file"] == "IXI.csv"
    assert all(len(s["sha256"]) == 64 for s in store.manifest["sources"])


def test_each_volume_is_normalised_to_unit_range(cohort, tmp_path):
    store = ingest(cohort, tmp_path / "store", CFG.__class__(size=32, slices=30, band=(0.0, 1.0), min_brain=0.0),
                   progress=False)
    for split in store.splits:
        imgs, rows = store.images(split).astype(np.float32), store.slices(split)
        for subject in {r["subject"] for r in rows}:
            vol = imgs[[r["subject"] == subject for r in rows]]
            assert vol.min() == 0.0 and vol.max() <= 1.0 and vol.max() > 0.7  # per volume, not per slice
            assert any(s.max() < 0.99 for s in vol)  # slices were not stretched one by one


def test_workers_do_not_change_the_store(cohort, tmp_path):
    one = ingest(cohort, tmp_path / "a", IngestConfig(size=32, workers=1), progress=False)
    two = ingest(cohort, tmp_path / "b", IngestConfig(size=32, workers=2), progress=False)
    assert one.digest == two.digest
    assert one.manifest["slices"] == two.manifest["slices"]


@pytest.mark.parametrize("modality", ["T2", "PD"])
def test_axial_modalities_ingest(modality, tmp_path):
    make_demo_cohort(tmp_path / "ixi", subjects=3, seed=1, modality=modality, voxel_scale=4, progress=False)
    store = ingest(tmp_path / "ixi", tmp_path / "store", IngestConfig(modality=modality, size=32), progress=False)
    assert len(store.manifest["sources"]) == 3 and store.images("train").shape[1:] == (32, 32)


def test_band_is_relative_to_the_head_not_the_array(good_volume, tmp_path):
    data = np.asanyarray(nib.as_closest_canonical(good_volume).dataobj)
    ras = nib.as_closest_canonical(good_volume)
    shifted = np.zeros(data.shape[:2] + (data.shape[2] + 7,), data.dtype)
    shifted[:, :, 7:] = data  # same head, 7 more empty slices below it
    moved = ras.affine.copy()
    moved[:3, 3] -= ras.affine[:3, 2] * 7
    a = read_volume(_save(ras, tmp_path / "a.nii.gz"), CFG.max_voxels)
    b = read_volume(_save(nib.Nifti1Image(shifted, moved), tmp_path / "b.nii.gz"), CFG.max_voxels)
    sa, sb = extract_slices(a.data, a.zooms, CFG), extract_slices(b.data, b.zooms, CFG)
    np.testing.assert_allclose(sb.slice_index - 7, sa.slice_index)
    # same slices; only the background share of the percentile sample changed
    np.testing.assert_allclose(sa.images.astype(np.float32), sb.images.astype(np.float32), atol=0.01)


def _save(img: nib.Nifti1Image, path: Path) -> Path:
    nib.save(img, path)
    return path


def test_anisotropic_voxels_do_not_stretch_anatomy(tmp_path):
    # A ball of radius 40 mm on a grid with 2 mm voxels along x and 1 mm along y: its slices must stay round.
    x, y, z = np.meshgrid(np.arange(64) * 2.0, np.arange(128) * 1.0, np.arange(64) * 2.0, indexing="ij")
    ball = ((x - 64) ** 2 + (y - 64) ** 2 + (z - 64) ** 2 <= 40**2).astype(np.int16) * 1000
    vol = read_volume(_save(nib.Nifti1Image(ball, np.diag([2.0, 1.0, 2.0, 1.0])), tmp_path / "b.nii.gz"), 10**7)
    band = extract_slices(vol.data, vol.zooms, IngestConfig(size=64, slices=3, band=(0.5, 0.5001)))
    mask = band.images[1].astype(np.float32) > 0.5
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    assert abs((rows[-1] - rows[0]) - (cols[-1] - cols[0])) <= 1


def test_resample_matrix_pads_and_preserves_constants():
    w = resample_matrix(100, 1.0, 200.0, 50)  # 100 mm of data centred in a 200 mm field, 4 mm pixels
    sums = w.sum(axis=1)
    np.testing.assert_allclose(sums[15:35], 1.0, atol=1e-6)  # inside: a constant stays constant
    assert np.all(sums[:10] == 0) and np.all(sums[-10:] == 0)  # outside: zero padding
    assert (w >= 0).all()


def test_split_is_stratified_and_fixed_by_seed():
    sites = {f"IXI{i:03d}": ("Guys", "HH", "IOP")[i % 3] for i in range(60)}
    a = split_subjects(sites, (0.8, 0.1, 0.1), seed=5)
    assert a == split_subjects(sites, (0.8, 0.1, 0.1), seed=5)
    assert a != split_subjects(sites, (0.8, 0.1, 0.1), seed=6)
    assert [len(a[s]) for s in ("train", "val", "test")] == [48, 6, 6]
    for split in ("val", "test"):
        assert sorted(sites[s] for s in a[split]) == ["Guys", "Guys", "HH", "HH", "IOP", "IOP"]
    assert set().union(*a.values()) == set(sites)
    small = split_subjects({"a": "HH", "b": "HH", "c": "IOP"}, (0.8, 0.1, 0.1), seed=0)
    assert [len(small[s]) for s in ("train", "val", "test")] == [1, 1, 1]


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "ixi").mkdir()
    (tmp_path / "ixi" / "IXI002-Guys-0828-T1.nii.gz").write_bytes(b"")
    with pytest.raises(IngestError, match="no usable T1 volume.*empty file"):
        ingest(tmp_path / "ixi", tmp_path / "store", CFG, progress=False)
    with pytest.raises(IngestError, match="no T2 volume named like"):
        ingest(tmp_path / "ixi", tmp_path / "store", IngestConfig(modality="T2", size=32), progress=False)
    assert not (tmp_path / "store").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ixi"]  # no temporary directory left behind
