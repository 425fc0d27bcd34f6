"""One call from nothing to a demo slice store: generate the demo cohort, ingest it, reuse it next time."""

from __future__ import annotations

import json
from pathlib import Path

from mrigen.data.config import IngestConfig
from mrigen.data.demo import DEMO_VERSION, make_demo_cohort
from mrigen.data.ingest import ingest
from mrigen.data.store import SliceStore, StoreError
from mrigen.locks import file_lock

__all__ = ["DEMO_SUBJECTS", "build_demo_store", "auto_voxel_scale"]

_COHORT_MARKER = "cohort.json"
# Default demo cohort: 120 subjects = 96 train / 12 val / 12 test (2,880 / 360 / 360 slices). Twenty training
# subjects were too few to learn a brain from (held-out PSNR plateaued 5-10 dB below training), and the sample
# metrics need a few hundred held-out slices from a dozen subjects to be stable. Generating and ingesting it takes
# about 30 s at 64 px on 2 cores, once: the store is cached.
DEMO_SUBJECTS = 120


def auto_voxel_scale(size: int) -> int:
    """Coarsest demo voxel scale (1-4) that still gives >= 2 voxels per output pixel of a 240 mm field."""
    return max(1, min(4, int(240.0 / size / (2 * 0.9375))))


def build_demo_store(work_dir: Path | str, subjects: int = DEMO_SUBJECTS, size: int = 128, seed: int = 0, workers: int = 0,
                     modality: str = "T1", voxel_scale: int | None = None, progress: bool = True) -> SliceStore:
    """Generate a demo cohort and ingest it into a store under ``work_dir``; reuse both when they match.

    Layout: ``work_dir/demo-<mod>-n<subjects>-seed<seed>-v<scale>/ixi`` (volumes + IXI.csv) and
    ``.../store-<size>`` (the store). A store is reused when it opens cleanly (digests verified), its ingest
    config equals the one asked for (``workers`` aside) and it was built from that cohort; otherwise it is
    rebuilt atomically.

    Args:
        work_dir: cache directory (created).
        subjects, seed, modality: the demo cohort (see ``make_demo_cohort``).
        size: output slice side (IngestConfig.size).
        workers: cohort-writing threads and ingest workers, 0 = all CPUs.
        voxel_scale: demo voxel coarsening; None picks ``auto_voxel_scale(size)`` (4 for size 32: fast tests).
    """
    cfg = IngestConfig(modality=modality, size=size, seed=seed, workers=workers)
    scale = auto_voxel_scale(size) if voxel_scale is None else voxel_scale
    root = Path(work_dir) / f"demo-{modality}-n{subjects}-seed{seed}-v{scale}"
    cohort, store_path = root / "ixi", root / f"store-{size}"
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".lock"):
        marker = {"subjects": subjects, "seed": seed, "modality": modality, "voxel_scale": scale,
                  "demo_version": DEMO_VERSION}
        marker_path = cohort / _COHORT_MARKER
        regenerated = not marker_path.is_file() or json.loads(marker_path.read_text()) != marker
        if regenerated:
            make_demo_cohort(cohort, subjects=subjects, seed=seed, modality=modality, voxel_scale=scale,
                             progress=progress, workers=workers)
            marker_path.write_text(json.dumps(marker))
        if store_path.exists() and not regenerated:  # a store of an older cohort is rebuilt
            try:
                store = SliceStore.open(store_path)
            except StoreError:
                store = None  # damaged: rebuilt below, atomically replacing it
            if (store is not None and store.manifest["config"] == cfg.content_dict()
                    and store.manifest["source_dir"] == str(cohort.resolve())):
                return store
        return ingest(cohort, store_path, cfg, overwrite=True, progress=progress)
