"""IXI volumes -> validated slice store.

Discovery by IXI name, demographics, validation, canonical reorientation, brain-relative band, per-volume
normalisation, pad + resize, subject-level split stratified by site, atomic write. Volumes are processed in
worker processes (each decodes its file once and sends back only the small slice arrays).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mrigen import __version__
from mrigen.data.config import IngestConfig
from mrigen.data.ixi import IXIFile, discover, find_demographics, read_demographics
from mrigen.data.slicing import SliceError, extract_slices
from mrigen.data.store import SLICE_COLUMNS, SPLITS, SliceStore, StoreError, write_store
from mrigen.data.validate import VolumeError, read_volume
from mrigen.data.verify import SourceChanges, compare_sources, recorded_sources

__all__ = ["ingest", "IngestError", "VolumeResult", "process_volume", "split_subjects"]

log = logging.getLogger("mrigen.data")


class IngestError(RuntimeError):
    """Nothing usable remains (no volume found, or every volume was skipped)."""


@dataclass(frozen=True)
class VolumeResult:
    """What a worker sends back for one file: slices, or the reason it was skipped."""

    file: str  # file name
    sha256: str | None  # of the source file (None if it could not be read)
    reason: str | None = None  # why the file was skipped; None when it was used
    images: np.ndarray | None = None  # (n, size, size) float16
    slice_pos: np.ndarray | None = None  # (n,) position in the band
    slice_index: np.ndarray | None = None  # (n,) canonical axial index
    head_length_mm: float = 0.0
    dropped: int = 0  # band slices dropped for having almost no brain


def process_volume(job: tuple[Path, IngestConfig]) -> VolumeResult:
    """Worker: read + validate + slice one file. Bad input becomes a ``VolumeResult`` with a reason."""
    path, cfg = job
    try:
        volume = read_volume(path, cfg.max_voxels)
    except VolumeError as exc:
        return VolumeResult(path.name, exc.sha256, reason=exc.reason)
    except Exception as exc:  # noqa: BLE001 -- a reader failure we did not foresee: skip the file, say why
        return VolumeResult(path.name, None, reason=f"unreadable volume ({type(exc).__name__}: {exc})")
    try:
        band = extract_slices(volume.data, volume.zooms, cfg)
    except SliceError as exc:
        return VolumeResult(path.name, volume.sha256, reason=str(exc))
    return VolumeResult(path.name, volume.sha256, None, band.images, band.slice_pos, band.slice_index,
                        band.head_length_mm, band.dropped)


def split_subjects(sites: dict[str, str], fractions: tuple[float, float, float], seed: int
                   ) -> dict[str, list[str]]:
    """Assign whole subjects to train/val/test, stratified by site, fixed by ``seed``.

    Each site's subjects are shuffled and spread evenly over [0, 1) (rank + a random offset, over the site
    size); sorting all subjects by that key interleaves the sites in proportion, so the first ``n_test`` go to
    test, the next ``n_val`` to val, the rest to train. val/test get at least one subject when their fraction
    is > 0 and there are 3 or more subjects; train always keeps at least one.

    Args:
        sites: subject -> site.
        fractions: (train, val, test), summing to 1.
        seed: split seed.

    Returns:
        split name -> sorted subjects, for every split (possibly empty).
    """
    n = len(sites)
    rng = np.random.default_rng(seed)
    counts = []
    for f in fractions[1:]:
        k = int(round(f * n))
        counts.append(max(k, 1) if f > 0 and n >= 3 else k)
    while counts[0] + counts[1] >= n and counts[0] + counts[1] > 0:
        counts[int(counts[1] > counts[0])] -= 1
    key: dict[str, float] = {}
    for site in sorted(set(sites.values())):
        members = sorted(s for s, v in sites.items() if v == site)
        offset = rng.random()
        for rank, i in enumerate(rng.permutation(len(members))):
            key[members[i]] = (rank + offset) / len(members)
    order = sorted(sites, key=lambda s: (key[s], s))
    n_val, n_test = counts
    return {"train": sorted(order[n_test + n_val:]), "val": sorted(order[n_test:n_test + n_val]),
            "test": sorted(order[:n_test])}


def _one_blas_thread() -> None:
    """Pool initializer: one BLAS thread per worker (the workers are the parallelism; nested threads thrash)."""
    threadpool_limits(limits=1, user_api="blas")


def _run(files: list[IXIFile], cfg: IngestConfig, progress: bool) -> list[VolumeResult]:
    jobs = [(f.path, cfg) for f in files]
    workers = min(cfg.n_workers, len(jobs))
    bar = tqdm(total=len(jobs), desc="ingest", unit="vol", disable=not progress)
    results = []
    with logging_redirect_tqdm(), bar, threadpool_limits(limits=1, user_api="blas"):
        if workers <= 1:
            stream: Any = map(process_volume, jobs)
            pool = None
        else:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            pool = mp.get_context(method).Pool(workers, initializer=_one_blas_thread)
            stream = pool.imap_unordered(process_volume, jobs, chunksize=1)
        try:
            for result in stream:
                if result.reason is not None:
                    log.warning("skipped %s: %s", result.file, result.reason)
                results.append(result)
                bar.update(1)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    return sorted(results, key=lambda r: r.file)


def _changes_since(out: Path, current: dict[str, str | None]) -> tuple[SourceChanges | None, str | None]:
    """Compare this run's sources with those of the store at ``out`` (None when there is none or it is unreadable)."""
    if not out.exists():
        return None, None
    try:
        old = SliceStore.read_manifest(out)  # the sources are in the manifest; the old images need no re-hash
    except StoreError as exc:
        log.warning("cannot compare sources with the existing store: %s", exc)
        return None, None
    changes = compare_sources(recorded_sources(old), current)
    for kind, names in (("changed", changes.changed), ("added", changes.added), ("removed", changes.removed)):
        for name in names:
            log.warning("source %s since the existing store %s: %s", kind, out, name)
    return changes, old["images"]["sha256"]


def ingest(ixi_dir: Path | str, out: Path | str, cfg: IngestConfig = IngestConfig(), overwrite: bool = False,
           progress: bool = True) -> SliceStore:
    """Build a slice store from the IXI volumes of ``cfg.modality`` in ``ixi_dir``.

    Bad files are skipped with one warning line each (and listed in ``manifest["report"]["skipped"]``);
    names that do not follow the IXI pattern are reported and ignored. When ``overwrite`` replaces a store, the
    sha256 of every source (volumes, demographics) is compared with the old store's manifest first; changed,
    added and removed files are logged by name, counted in the summary line and kept in
    ``manifest["report"]["source_changes"]``.

    Raises:
        IngestError: if no usable volume remains.
        FileExistsError: if ``out`` exists and ``overwrite`` is false.
        ValueError: if ``ixi_dir`` is not a directory or the demographics table is unreadable.
    """
    t0 = time.perf_counter()
    ixi_dir, out = Path(ixi_dir), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it "
                              f"(python -m mrigen.data verify --ixi {ixi_dir} --store {out} lists changed sources)")
    files, unmatched = discover(ixi_dir, cfg.modality)
    for path in unmatched:
        log.warning("ignored %s: name does not follow IXI<id>-<Guys|HH|IOP>-<nnnn>-<mod>.nii.gz", path.name)
    if not files:
        raise IngestError(f"no {cfg.modality} volume named like IXI<id>-<site>-<nnnn>-{cfg.modality}.nii.gz "
                          f"in {ixi_dir}")
    demo_path = find_demographics(ixi_dir)
    demo = read_demographics(demo_path) if demo_path else None
    for line in demo.dropped if demo else ():
        log.warning("demographics %s: %s", demo_path.name, line)  # type: ignore[union-attr]

    results = _run(files, cfg, progress)
    demo_sha = hashlib.sha256(demo_path.read_bytes()).hexdigest() if demo_path else None
    current = {r.file: r.sha256 for r in results} | ({demo_path.name: demo_sha} if demo_path else {})
    changes, previous = _changes_since(out, current)
    by_name = {f.path.name: f for f in files}
    used = [r for r in results if r.reason is None]
    skipped = [{"file": r.file, "reason": r.reason, "sha256": r.sha256} for r in results if r.reason is not None]
    if not used:
        raise IngestError(f"no usable {cfg.modality} volume in {ixi_dir}: all {len(files)} skipped "
                          f"(first: {skipped[0]['file']}: {skipped[0]['reason']})")
    sites = {by_name[r.file].subject: by_name[r.file].site for r in used}
    split = split_subjects(sites, cfg.split, cfg.seed)
    blocks: list[np.ndarray] = []
    table: dict[str, list[Any]] = {k: [] for k in SLICE_COLUMNS}
    ranges, row = {}, 0
    for name in SPLITS:
        members = set(split[name])
        start = row
        for r in used:
            f = by_name[r.file]
            if f.subject not in members:
                continue
            n = len(r.images)  # type: ignore[arg-type]
            blocks.append(r.images)
            table["subject"] += [f.subject] * n
            table["ixi_id"] += [f.ixi_id] * n
            table["site"] += [f.site] * n
            table["slice_pos"] += [round(float(p), 4) for p in r.slice_pos]  # type: ignore[union-attr]
            table["slice_index"] += [round(float(z), 3) for z in r.slice_index]  # type: ignore[union-attr]
            table["age"] += [demo.age.get(f.ixi_id) if demo else None] * n
            table["sex"] += [demo.sex.get(f.ixi_id) if demo else None] * n
            table["source"] += [r.file] * n
            row += n
        if row > start:
            ranges[name] = {"start": start, "stop": row, "subjects": split[name]}
    manifest = {
        "mrigen_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg.content_dict(),
        "source_dir": str(ixi_dir.resolve()),
        "splits": ranges,
        "slices": table,
        "sources": [{"file": r.file, "sha256": r.sha256, "subject": by_name[r.file].subject,
                     "site": by_name[r.file].site, "slices": len(r.images),  # type: ignore[arg-type]
                     "dropped_slices": r.dropped, "head_length_mm": round(r.head_length_mm, 1)} for r in used],
        "report": {
            "skipped": skipped,
            "unmatched": [p.name for p in unmatched],
            "demographics": None if demo is None else {
                "file": demo_path.name, "sha256": demo_sha, "dropped": list(demo.dropped)},  # type: ignore[union-attr]
            "source_changes": None if changes is None else dict(changes.as_dict(), previous_store=previous),
        },
    }
    store = write_store(out, blocks, manifest, overwrite=overwrite)
    counts = " / ".join(f"{s} {r['stop'] - r['start']}" for s, r in ranges.items())
    summary = (f"ingest: {len(used)} {cfg.modality} volumes ({len(sites)} subjects) -> {row} slices "
               f"at {cfg.size}px ({counts}); {len(skipped)} skipped, {len(unmatched)} unmatched names; "
               + (f"sources vs the replaced store: {changes.summary()}; " if changes is not None else "")
               + f"{time.perf_counter() - t0:.1f} s -> {out}")
    if progress and not (log.isEnabledFor(logging.INFO) and log.hasHandlers()):
        print(summary, file=sys.stderr)          # interactive use without logging set up: still say what was made
    log.info(summary)
    return store
