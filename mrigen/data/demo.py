"""A generated IXI-like cohort: real brain anatomy (nilearn's bundled MNI152 T1 template), no download.

Each subject is the template with a random pose and head size, a smooth random deformation, age-dependent
ventricle enlargement and brain atrophy (the brain shrinks inside an unchanged skull), a scalp/skull/CSF
envelope, T1, T2 or PD contrast, a smooth multiplicative bias field and Rician scanner noise, with the look of
its site's scanner (IXI: Guys = Philips 1.5T, HH = Philips 3T, IOP = GE 1.5T; see ``SITE_LOOK``), written as int16
NIfTI with an IXI-like grid: T1 sagittal 256x256x150 at 0.94x0.94x1.2 mm, T2/PD axial 256x256x130. Files are
named ``IXI<id>-<site>-<nnnn>-<mod>.nii.gz`` and ``IXI.csv`` holds IXI's demographics columns.
Deterministic for a seed; a subject's anatomy and demographics do not depend on the modality.
"""

from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from mrigen.data.ixi import DEMOGRAPHIC_COLUMNS, SITES, ixi_name

__all__ = ["make_demo_cohort", "demo_subjects", "DemoSubject", "GRIDS", "DEMO_VERSION", "SITE_LOOK", "SiteLook"]

# Bumped whenever the generated images change, so cached cohorts and stores are rebuilt (mrigen.data.build).
# 2: site-specific scanner appearance (contrast curve, bias field, noise, blur) instead of an int16 gain only,
#    which per-volume percentile normalisation removed (the site was unlearnable from the slices).
DEMO_VERSION = 2

# Per modality: (array axis codes, shape, voxel size mm) at voxel_scale 1, as IXI stores them.
GRIDS = {
    "T1": (("P", "S", "R"), (256, 256, 150), (0.9375, 0.9375, 1.2)),  # sagittal acquisition
    "T2": (("L", "A", "S"), (256, 256, 130), (0.9375, 0.9375, 1.2)),  # axial acquisition
    "PD": (("L", "A", "S"), (256, 256, 130), (0.9375, 0.9375, 1.2)),
}
_FOV_CENTRE = np.array([0.0, -17.0, 5.0])  # world (MNI mm) point at the centre of the field of view
_VENTRICLE_CENTRE = np.array([0.0, -8.0, 15.0])  # MNI mm, between the lateral ventricles' bodies
_VENTRICLE_SPREAD = np.array([16.0, 32.0, 14.0])  # mm, Gaussian extent of the age-related enlargement
_BRAIN_CENTRE = np.array([0.0, -17.0, 10.0])  # MNI mm, centre of the brain for atrophy
# Contrast: template T1 value (inside brain) -> modality value, and envelope tissue values.
_CONTRAST = {
    "T1": ([0.2, 0.35, 0.6, 1.0], [0.18, 0.3, 0.6, 0.95]),
    "T2": ([0.2, 0.35, 0.6, 1.0], [1.0, 0.85, 0.55, 0.35]),
    "PD": ([0.2, 0.35, 0.6, 1.0], [0.85, 0.8, 0.75, 0.6]),
}
_ENVELOPE = {"T1": (0.12, 0.04, 0.75), "T2": (0.95, 0.04, 0.55), "PD": (0.8, 0.08, 0.7)}  # csf, skull, scalp
_LAYERS_MM = (2.0, 7.0, 13.0)  # outer edges of CSF, skull and scalp layers, distance from the brain surface
_SITE_GAIN = {"Guys": 1100.0, "HH": 700.0, "IOP": 1500.0}  # int16 full-scale per site (removed by normalisation)


@dataclass(frozen=True)
class SiteLook:
    """What a site's scanner does to an image, beyond its int16 scale (survives percentile normalisation).

    Attributes:
        gamma: contrast curve, intensity -> intensity**gamma before the bias field (< 1 lifts grey matter).
        bias_std: std of the log of the smooth random bias field (receive-coil inhomogeneity).
        centre_gain: extra brightening at the centre of the head, Gaussian of 60 mm (3T dielectric effect).
        noise: Rician noise sigma relative to full white-matter signal (lower at 3T: more SNR).
        blur_mm: Gaussian sigma of the vendor's reconstruction filter, mm (0 = none).
    """

    gamma: float
    bias_std: float
    centre_gain: float
    noise: float
    blur_mm: float


# Guys: the 1.5T reference look; HH: 3T (more SNR, stronger and centre-bright inhomogeneity, flatter T1 contrast);
# IOP: the other vendor at 1.5T (steeper contrast curve, smoother reconstruction, a little more noise).
SITE_LOOK = {
    "Guys": SiteLook(gamma=1.0, bias_std=0.10, centre_gain=0.0, noise=0.025, blur_mm=0.0),
    "HH": SiteLook(gamma=0.75, bias_std=0.18, centre_gain=0.25, noise=0.012, blur_mm=0.0),
    "IOP": SiteLook(gamma=1.35, bias_std=0.08, centre_gain=0.0, noise=0.03, blur_mm=1.2),
}


@dataclass(frozen=True)
class DemoSubject:
    """Demographics and scan identity of one generated subject."""

    ixi_id: int
    site: str
    scan: int
    age: float
    sex_id: int  # 1 = male, 2 = female


def demo_subjects(subjects: int, seed: int) -> list[DemoSubject]:
    """The cohort's subjects: unique IXI ids, sites balanced over Guys/HH/IOP, ages 20-86."""
    if not 1 <= subjects <= 600:
        raise ValueError(f"subjects={subjects} is invalid (allowed: 1-600)")
    rng = np.random.default_rng([seed, 0x1A1])
    ids = np.sort(rng.choice(np.arange(2, 663), size=subjects, replace=False))
    sites = [SITES[i] for i in rng.permutation(np.arange(subjects) % 3)]
    scans = rng.choice(np.arange(100, 10000), size=subjects, replace=False)
    ages = np.round(rng.uniform(20.0, 86.0, subjects), 2)
    sexes = rng.integers(1, 3, subjects)
    return [DemoSubject(int(i), s, int(n), float(a), int(x)) for i, s, n, a, x in zip(ids, sites, scans, ages, sexes)]


@functools.lru_cache(maxsize=2)
def _template(level: int) -> tuple[np.ndarray, np.ndarray]:
    """(MNI152 T1 intensities in [0,1], voxel->mm affine) at 1 mm, or smoothed and subsampled to 2 mm."""
    from nilearn.datasets import load_mni152_template  # packaged with nilearn: offline

    img = load_mni152_template(resolution=1)
    t1 = np.asarray(img.get_fdata(dtype=np.float32))
    affine = img.affine.copy()
    if level > 1:
        t1 = np.ascontiguousarray(ndimage.gaussian_filter(t1, 0.5 * level)[::level, ::level, ::level])
        affine[:3, :3] *= level
    return t1, affine


@functools.lru_cache(maxsize=1)
def _outside() -> np.ndarray:
    """Distance (mm) from the template brain, on the 2 mm template grid."""
    t1, _ = _template(2)
    return ndimage.distance_transform_edt(t1 < 0.1, sampling=2.0).astype(np.float32)


def _upsample(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Corner-aligned linear interpolation of a 3-D array to ``shape`` (separable, via small matrices)."""
    mats = []
    for n_in, n_out in zip(coarse.shape, shape):
        x = np.linspace(0, n_in - 1, n_out)
        i0 = np.minimum(np.floor(x).astype(int), n_in - 2) if n_in > 1 else np.zeros(n_out, int)
        m = np.zeros((n_out, n_in), np.float32)
        if n_in == 1:
            m[:, 0] = 1.0
        else:
            w = x - i0
            m[np.arange(n_out), i0] = 1.0 - w
            m[np.arange(n_out), i0 + 1] = w
        mats.append(m)
    return np.einsum("ai,bj,ck,ijk->abc", *mats, coarse.astype(np.float32), optimize=True)


def _grid_affine(modality: str, voxel_scale: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    codes, shape, zooms = GRIDS[modality]
    shape = tuple(max(8, round(s / voxel_scale)) for s in shape)
    axis = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for v, code in enumerate(codes):
        w, sign = axis[code]
        affine[w, v] = sign * zooms[v] * GRIDS[modality][1][v] / shape[v]  # same field of view, coarser voxels
    affine[:3, 3] = _FOV_CENTRE - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return affine, shape  # type: ignore[return-value]


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], ctrl: int, std: float) -> np.ndarray:
    """A smooth random field on ``shape``: ``ctrl``^3 Gaussian control values, cubic then linear upsampling."""
    coarse = rng.normal(0.0, std, (ctrl, ctrl, ctrl)).astype(np.float32)
    mid = ndimage.zoom(coarse, 16 / ctrl, order=3, mode="nearest")  # (16, 16, 16), smooth
    return _upsample(mid, shape)


def _subject_volume(subject: DemoSubject, modality: str, voxel_scale: int, seed: int) -> nib.Nifti1Image:
    level = 2 if voxel_scale >= 2 else 1
    t1, t_affine = _template(level)
    outside, o_affine = _outside(), _template(2)[1]
    affine, shape = _grid_affine(modality, voxel_scale)
    rng = np.random.default_rng([seed, subject.ixi_id])  # anatomy: same for every modality
    scale = rng.normal(0.95, 0.03)
    rot = _rotation(np.deg2rad(rng.uniform(-4.0, 4.0, 3)))
    shift = rng.uniform(-5.0, 5.0, 3)
    # Mapping evaluated on a coarse output grid (it is smooth), then interpolated to every voxel.
    step = 4 if np.prod(shape) > 1_000_000 else 1
    coarse = tuple(-(-s // step) + (1 if step > 1 else 0) for s in shape)
    ijk = np.stack(np.meshgrid(*[np.linspace(0, s - 1, c) for s, c in zip(shape, coarse)], indexing="ij"), -1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]  # (..., 3) mm in the scanner frame
    q = (world - _FOV_CENTRE - shift) @ rot / scale + _FOV_CENTRE  # (..., 3) template mm
    q += np.stack([_smooth_field(rng, coarse, 5, 2.5) for _ in range(3)], -1)
    young = np.clip((subject.age - 20.0) / 66.0, 0.0, 1.0)
    d = q - _VENTRICLE_CENTRE
    pull = 0.5 * young * np.exp(-((d / _VENTRICLE_SPREAD) ** 2).sum(-1, keepdims=True) / 2)  # ventricles grow
    q_brain = _VENTRICLE_CENTRE + d * (1.0 - pull)
    q_brain = _BRAIN_CENTRE + (q_brain - _BRAIN_CENTRE) * (1.0 + 0.06 * young)  # brain shrinks in the skull

    def sample(volume: np.ndarray, vol_affine: np.ndarray, points: np.ndarray, fill: float) -> np.ndarray:
        inv = np.linalg.inv(vol_affine)
        coords = np.moveaxis(points @ inv[:3, :3].T + inv[:3, 3], -1, 0).astype(np.float32)  # (3, *coarse)
        if step > 1:
            coords = np.stack([_upsample(c, shape) for c in coords])  # (3, *shape)
        return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=fill, prefilter=False)

    brain = sample(t1, t_affine, q_brain, 0.0)
    dist = sample(outside, o_affine, q, 1e3)
    xp, fp = _CONTRAST[modality]
    csf, skull, scalp = _ENVELOPE[modality]
    envelope = np.select([dist < _LAYERS_MM[0], dist < _LAYERS_MM[1], dist < _LAYERS_MM[2]], [csf, skull, scalp], 0.0)
    inside = brain > 0.15
    image = envelope.astype(np.float32)
    image[inside] = np.interp(brain[inside], xp, fp)
    look = SITE_LOOK[subject.site]
    image = np.power(np.clip(image, 0.0, None), look.gamma, dtype=np.float32)  # the site's contrast curve
    noise_rng = np.random.default_rng([seed, subject.ixi_id, list(GRIDS).index(modality)])
    image *= np.exp(_smooth_field(noise_rng, shape, 4, look.bias_std))  # bias field
    zooms = np.abs(affine[:3, :3]).sum(0)  # mm per voxel along each array axis
    if look.centre_gain:
        r2 = sum(((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * z).reshape([-1 if a == i else 1 for a in range(3)])
                 ** 2 for i, (n, z) in enumerate(zip(shape, zooms)))
        image *= 1.0 + look.centre_gain * np.exp(-r2 / (2 * 60.0**2)).astype(np.float32)
    if look.blur_mm:
        image = ndimage.gaussian_filter(image, look.blur_mm / zooms)
    sigma = look.noise
    image = np.hypot(image + noise_rng.normal(0, sigma, shape).astype(np.float32),
                     noise_rng.normal(0, sigma, shape).astype(np.float32))  # Rician magnitude noise
    gain = _SITE_GAIN[subject.site] * noise_rng.uniform(0.9, 1.1)
    data = np.clip(np.rint(image * gain), 0, 32767).astype(np.int16)
    out = nib.Nifti1Image(data, affine)
    out.header.set_xyzt_units("mm", "sec")
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def _demographics_table(subjects: list[DemoSubject], seed: int) -> pd.DataFrame:
    rng = np.random.default_rng([seed, 0xD3])
    rows = []
    for s in subjects:
        study = np.datetime64("2005-06-01") + int(rng.integers(0, 700))
        dob = study - int(round(s.age * 365.25))
        rows.append({
            "IXI_ID": s.ixi_id, "SEX_ID": s.sex_id,
            "HEIGHT": int(rng.normal(176 if s.sex_id == 1 else 163, 7)) if rng.random() > 0.1 else 0,
            "WEIGHT": int(rng.normal(78 if s.sex_id == 1 else 65, 10)) if rng.random() > 0.1 else 0,
            "ETHNIC_ID": int(rng.integers(1, 6)), "MARITAL_ID": int(rng.integers(1, 6)),
            "OCCUPATION_ID": int(rng.integers(1, 9)), "QUALIFICATION_ID": int(rng.integers(1, 6)),
            "DOB": str(dob), "DATE_AVAILABLE": 1, "STUDY_DATE": str(study), "AGE": s.age,
        })
    if len(rows) >= 8:  # like the real table: one subject listed twice with the same values
        rows.insert(3, dict(rows[2]))
    return pd.DataFrame(rows, columns=list(DEMOGRAPHIC_COLUMNS))


def make_demo_cohort(out_dir: Path, subjects: int = 24, seed: int = 0, modality: str = "T1",
                     voxel_scale: int = 1, progress: bool = True, workers: int = 0) -> list[Path]:
    """Write a generated IXI-like cohort and its ``IXI.csv`` demographics into ``out_dir``.

    Args:
        out_dir: created if missing; existing files of the same names are overwritten.
        subjects: number of subjects (1-600), sites balanced over Guys/HH/IOP.
        seed: everything is deterministic for a seed.
        modality: "T1" (sagittal grid), "T2" or "PD" (axial grids).
        voxel_scale: 1 = IXI grid; k > 1 stores the same field of view with k-times coarser voxels (fast tests).
        workers: threads writing volumes, 0 = one per CPU (SciPy's resampling and gzip release the GIL; every
            subject has its own seeded generators, so the files do not depend on it). With more than one, native
            BLAS / OpenMP pools are limited to one thread each while the cohort is written.

    Returns:
        The volume paths, sorted by name.
    """
    if modality not in GRIDS:
        raise ValueError(f"modality={modality!r} is invalid (allowed: {', '.join(GRIDS)})")
    if not isinstance(voxel_scale, int) or not 1 <= voxel_scale <= 8:
        raise ValueError(f"voxel_scale={voxel_scale!r} is invalid (allowed: integer 1-8)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers={workers!r} is invalid (allowed: integer >= 0, 0 = one per CPU)")
    cohort = demo_subjects(subjects, seed)

    def write(subject: DemoSubject) -> Path:
        path = out_dir / ixi_name(subject.ixi_id, subject.site, subject.scan, modality)
        nib.save(_subject_volume(subject, modality, voxel_scale, seed), path)
        return path

    threads = workers or os.cpu_count() or 1
    # One BLAS / OpenMP thread per worker thread: NumPy's small matrix products (the deformation's upsampling) in
    # several threads, each with its own BLAS pool, oversubscribe the cores (40 subjects on 2 cores: 9.4 s -> 5.1-5.8 s;
    # the same voxels). The limit is process-wide while the cohort is written and restored after.
    limit = threadpool_limits(1) if threads > 1 else contextlib.nullcontext()
    with tqdm(total=len(cohort), desc=f"demo {modality}", unit="subject", disable=not progress) as bar, limit:
        paths = [write(cohort[0])]              # loads the cached templates once, before the threads share them
        bar.update()
        with ThreadPoolExecutor(threads) as pool:
            for path in pool.map(write, cohort[1:]):
                paths.append(path)
                bar.update()
    _demographics_table(cohort, seed).to_csv(out_dir / "IXI.csv", index=False)
    return sorted(paths)
