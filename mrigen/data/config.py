"""Ingest settings: one frozen dataclass, ``asdict(cfg)`` is what the store's manifest records."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any
from mrigen.config import config_from_dict

__all__ = ["IngestConfig", "SIZES", "INGEST_MODALITIES", "CONTENT_FIELDS"]

SIZES = (16, 32, 64, 128, 256, 512)  # allowed output sides; tests use 16-64, IXI training 128 (thesis) or 256
INGEST_MODALITIES = ("T1", "T2", "PD")  # structural IXI modalities the slice pipeline understands


@dataclass(frozen=True)
class IngestConfig:
    """How IXI volumes become a slice store.

    Slice band: positions are measured downward from the top of the head (the vertex, highest axial slice with
    head foreground) in units of the head length L (largest front-to-back extent of the head foreground over the
    axial slices that lie within 0.45 L of the vertex, which leaves out the nose and face). The default band,
    0.50-0.35 L below the vertex (about 95-66 mm for a 190 mm head, ~28 mm thick), runs from just above the
    eyes (orbital roof, ~0.5 L) upward through the basal ganglia and lateral ventricles: the brain-relative
    version of the thesis band (30 slices, array indices 160-190 of IXI T1).
    """

    modality: str = "T1"  # IXI modality to ingest: "T1" | "T2" | "PD"
    size: int = 128  # output image side in pixels (slices are padded to square, then resized): one of SIZES
    slices: int = 30  # axial slices per subject, evenly spaced over the band (thesis: 30)
    band: tuple[float, float] = (0.35, 0.50)  # (upper, lower) edge of the band, depth below vertex in head lengths
    min_brain: float = 0.25  # drop a slice whose head area is below this fraction of the volume's largest one
    foreground: float = 0.10  # head/background threshold on the normalised [0,1] intensity
    percentiles: tuple[float, float] = (0.5, 99.5)  # robust per-volume intensity range mapped to [0, 1]
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test fractions of subjects (stratified by site)
    seed: int = 0  # split seed: same seed + same usable subjects -> same split
    workers: int = 0  # worker processes; 0 = all CPUs (does not change the store's content)
    max_voxels: int = 1 << 27  # refuse a header declaring more voxels than this (IXI T1: 9.8M), before loading

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"IngestConfig.{name}={getattr(self, name)!r} is invalid (allowed: {allowed})")

        if self.modality not in INGEST_MODALITIES:
            raise bad("modality", " | ".join(INGEST_MODALITIES))
        if self.size not in SIZES:
            raise bad("size", " | ".join(map(str, SIZES)))
        if not isinstance(self.slices, int) or not 1 <= self.slices <= 256:
            raise bad("slices", "an integer 1-256")
        if len(self.band) != 2 or not 0.0 <= self.band[0] < self.band[1] <= 1.5:
            raise bad("band", "(upper, lower) with 0 <= upper < lower <= 1.5 head lengths")
        if not 0.0 <= self.min_brain < 1.0:
            raise bad("min_brain", "0 <= min_brain < 1")
        if not 0.0 < self.foreground < 1.0:
            raise bad("foreground", "0 < foreground < 1")
        if len(self.percentiles) != 2 or not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
            raise bad("percentiles", "(low, high) with 0 <= low < high <= 100")
        if (len(self.split) != 3 or any(not 0.0 <= f <= 1.0 for f in self.split) or self.split[0] <= 0
                or not math.isclose(sum(self.split), 1.0, abs_tol=1e-6)):
            raise bad("split", "(train, val, test) fractions >= 0 summing to 1, train > 0")
        if not isinstance(self.seed, int):
            raise bad("seed", "an integer")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise bad("workers", "0 (all CPUs) or a positive integer")
        if not isinstance(self.max_voxels, int) or self.max_voxels < 512:
            raise bad("max_voxels", "an integer >= 512")

    @property
    def n_workers(self) -> int:
        """Worker processes to use: ``workers``, or the CPUs this process may run on when it is 0."""
        if self.workers:
            return self.workers
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IngestConfig:
        """Build from a plain dict (e.g. a manifest's ``config``); unknown keys raise ValueError naming the key."""
        return config_from_dict(cls, d)

    def content_dict(self) -> dict[str, Any]:
        """The settings that determine the store's content (everything but ``workers``), JSON-ready."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k in CONTENT_FIELDS}


CONTENT_FIELDS = tuple(f.name for f in fields(IngestConfig) if f.name != "workers")
