"""Every bad-input kind gets its own clear one-line reason; valid variants give the same slices."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrigen.data.config import IngestConfig
from mrigen.data.ingest import ingest
from mrigen.data.slicing import extract_slices
from mrigen.data.validate import VolumeError, read_volume

CFG = IngestConfig(size=32, slices=8)


def _save(img: nib.Nifti1Image, path: Path) -> Path:
    nib.save(img, path)
    return path


def _empty(d: Path, good: nib.Nifti1Image) -> Path:
    (d / "x.nii.gz").write_bytes(b"")
    return d / "x.nii.gz"


def _random_bytes(d: Path, good: nib.Nifti1Image) -> Path:
    (d / "x.nii.gz").write_bytes(np.random.default_rng(0).bytes(4096))
    return d / "x.nii.gz"


def _random_nii(d: Path, good: nib.Nifti1Image) -> Path:
    (d / "x.nii").write_bytes(np.random.default_rng(0).bytes(4096))
    return d / "x.nii"


def _truncated(d: Path, good: nib.Nifti1Image) -> Path:
    raw = _save(good, d / "full.nii.gz").read_bytes()
    (d / "x.nii.gz").write_bytes(raw[: len(raw) // 2])
    return d / "x.nii.gz"


def _corrupt_gzip(d: Path, good: nib.Nifti1Image) -> Path:
    raw = bytearray(_save(good, d / "full.nii.gz").read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)  # zero a run of the deflate stream
    (d / "x.nii.gz").write_bytes(bytes(raw))
    return d / "x.nii.gz"


def _bad_crc(d: Path, good: nib.Nifti1Image) -> Path:
    raw = bytearray(_save(good, d / "full.nii.gz").read_bytes())
    raw[-8] ^= 0x01  # the member's CRC-32: the deflate data decodes, the checksum must catch it
    (d / "x.nii.gz").write_bytes(bytes(raw))
    return d / "x.nii.gz"


def _two_d(d: Path, good: nib.Nifti1Image) -> Path:
    return _save(nib.Nifti1Image(np.ones((32, 32), np.int16), np.eye(4)), d / "x.nii.gz")


def _four_d(d: Path, good: nib.Nifti1Image) -> Path:
    return _save(nib.Nifti1Image(np.ones((16, 16, 16, 3), np.int16), np.eye(4)), d / "x.nii.gz")


def _zero_dim(d: Path, good: nib.Nifti1Image) -> Path:
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((16, 0, 16))
    (d / "x.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4))
    return d / "x.nii.gz"


def _nan(d: Path, good: nib.Nifti1Image) -> Path:
    data = np.asanyarray(good.dataobj).astype(np.float32)
    data[10, 10, 10] = np.nan
    return _save(nib.Nifti1Image(data, good.affine), d / "x.nii.gz")


def _inf(d: Path, good: nib.Nifti1Image) -> Path:
    data = np.asanyarray(good.dataobj).astype(np.float64)
    data[5, 5, 5] = np.inf
    return _save(nib.Nifti1Image(data, good.affine), d / "x.nii.gz")


def _singular(d: Path, good: nib.Nifti1Image) -> Path:
    img = nib.Nifti1Image(np.asanyarray(good.dataobj), good.affine)
    sing = good.affine.copy()
    sing[:3, 2] = 0.0
    img.set_sform(sing, code=2)
    img.set_qform(None, code=0)
    return _save(img, d / "x.nii.gz")


def _huge(d: Path, good: nib.Nifti1Image) -> Path:
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((4096, 4096, 4096))
    hdr.set_sform(np.eye(4), code=1)
    (d / "x.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * 1000))
    return d / "x.nii.gz"


def _complex(d: Path, good: nib.Nifti1Image) -> Path:
    return _save(nib.Nifti1Image(np.ones((16, 16, 16), np.complex64), np.eye(4)), d / "x.nii.gz")


BAD = [
    (_empty, "empty file"),
    (_random_bytes, "not gzip data"),
    (_random_nii, "not a NIfTI file"),
    (_truncated, "truncated"),
    (_corrupt_gzip, "corrupt gzip data"),
    (_bad_crc, "corrupt gzip data"),
    (_two_d, "2-D image"),
    (_four_d, "4-D image"),
    (_zero_dim, "zero-size dimension"),
    (_nan, "NaN/Inf voxels"),
    (_inf, "NaN/Inf voxels"),
    (_singular, "singular affine"),
    (_huge, "over max_voxels"),
    (_complex, "unsupported data type"),
]


@pytest.mark.parametrize(("make", "reason"), BAD, ids=[m.__name__.strip("_") for m, _ in BAD])
def test_bad_input_gives_clear_reason(make, reason, tmp_path, good_volume):
    path = make(tmp_path, good_volume)
    with pytest.raises(VolumeError, match=reason) as err:
        read_volume(path, CFG.max_voxels)
    assert str(err.value).startswith(path.name + ": ") and "\n" not in str(err.value)


def test_bad_files_are_skipped_and_the_cohort_still_ingests(cohort, tmp_path, good_volume):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    bad_names = {}
    for i, (make, reason) in enumerate(BAD):
        name = f"IXI{900 + i}-Guys-{1000 + i:04d}-T1.nii" + (".gz" if make is not _random_nii else "")
        make(scratch, good_volume).rename(cohort / name)
        bad_names[name] = reason
    (cohort / "notes-T1.nii.gz").write_bytes(b"not ixi")
    store = ingest(cohort, tmp_path / "store", CFG, progress=False)
    skipped = {s["file"]: s["reason"] for s in store.manifest["report"]["skipped"]}
    assert set(skipped) == set(bad_names)
    for name, reason in bad_names.items():
        assert reason in skipped[name]
    assert store.manifest["report"]["unmatched"] == ["notes-T1.nii.gz"]
    assert len(store.manifest["sources"]) == 6


def _slices(img: nib.Nifti1Image, tmp_path: Path, name: str) -> np.ndarray:
    vol = read_volume(_save(img, tmp_path / name), CFG.max_voxels)
    return extract_slices(vol.data, vol.zooms, CFG).images.astype(np.float32)


def test_lps_and_ras_storage_give_the_same_slices(good_volume, tmp_path):
    data = np.asanyarray(good_volume.dataobj)
    ras = nib.as_closest_canonical(good_volume)
    ras_data = np.asanyarray(ras.dataobj)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [ras_data.shape[0] - 1, ras_data.shape[1] - 1, 0]
    lps = nib.Nifti1Image(np.ascontiguousarray(ras_data[::-1, ::-1, :]), ras.affine @ flip)
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    a = _slices(ras, tmp_path, "ras.nii.gz")
    b = _slices(lps, tmp_path, "lps.nii.gz")
    c = _slices(nib.Nifti1Image(data, good_volume.affine), tmp_path, "psr.nii.gz")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float64])
def test_dtypes_give_the_same_slices(dtype, good_volume, tmp_path):
    data = np.asanyarray(good_volume.dataobj).astype(np.float64)
    ref = _slices(nib.Nifti1Image(data.astype(np.int16), good_volume.affine), tmp_path, "ref.nii.gz")
    scaled = data * (250.0 / data.max()) if dtype == np.uint8 else data * 3.0 + 7.0  # normalisation ignores a*x+b
    got = _slices(nib.Nifti1Image(np.rint(scaled).astype(dtype) if dtype != np.float64 else scaled,
                                  good_volume.affine), tmp_path, "x.nii.gz")
    assert np.abs(got - ref).max() <= (0.06 if dtype == np.uint8 else 2e-3)  # uint8 quantises the intensities
