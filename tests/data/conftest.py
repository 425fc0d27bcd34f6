"""Fixtures for the data-pipeline tests: small generated NIfTI volumes, written into tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrigen.data.demo import make_demo_cohort


@pytest.fixture(scope="session")
def demo_cohort_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six coarse (voxel_scale 4: 64x64x38) demo T1 subjects + IXI.csv, generated once per session."""
    out = tmp_path_factory.mktemp("demo") / "ixi"
    make_demo_cohort(out, subjects=6, seed=3, modality="T1", voxel_scale=4, progress=False)
    return out


@pytest.fixture
def cohort(demo_cohort_src: Path, tmp_path: Path) -> Path:
    """A private copy of the demo cohort that a test may add bad files to."""
    dst = tmp_path / "ixi"
    shutil.copytree(demo_cohort_src, dst)
    return dst


@pytest.fixture
def good_volume(demo_cohort_src: Path) -> nib.Nifti1Image:
    """One demo T1 volume loaded in memory (int16, IXI-like sagittal affine)."""
    path = sorted(demo_cohort_src.glob("*.nii.gz"))[0]
    img = nib.load(path)
    return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
