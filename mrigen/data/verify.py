"""Source provenance: compare the files in an IXI folder with the sha256s a store's manifest recorded.

A gzip stream can be damaged and still decode, and a re-exported or recompressed file can hold the same voxels in
different bytes; the manifest can only vouch for bytes, so any byte difference is a change. ``ingest`` over an
existing store (``--overwrite``) reports the changes in its summary line and in ``manifest["report"]``;
``python -m mrigen.data verify --ixi DIR --store STORE`` checks a folder without re-ingesting.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrigen.data.ixi import discover, find_demographics
from mrigen.data.store import SliceStore

__all__ = ["SourceChanges", "recorded_sources", "current_sources", "compare_sources", "verify_sources", "sha256_of"]


@dataclass(frozen=True)
class SourceChanges:
    """Files whose bytes differ from a manifest (``changed``), are new (``added``) or are gone (``removed``)."""

    changed: tuple[str, ...]  # file names present in both, with a different sha256
    added: tuple[str, ...]  # in the folder, not in the manifest
    removed: tuple[str, ...]  # in the manifest, not in the folder
    unchanged: int  # files with the recorded sha256

    @property
    def clean(self) -> bool:
        """True when the folder holds exactly the recorded bytes."""
        return not (self.changed or self.added or self.removed)

    def summary(self) -> str:
        """One line, e.g. ``1 changed (IXI002-HH-0002-T1.nii.gz), 0 added, 0 removed, 5 unchanged``."""
        parts = [f"{len(names)} {kind}" + (f" ({', '.join(names)})" if names else "")
                 for kind, names in (("changed", self.changed), ("added", self.added), ("removed", self.removed))]
        return ", ".join(parts) + f", {self.unchanged} unchanged"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form stored in a manifest's report."""
        return {"changed": list(self.changed), "added": list(self.added), "removed": list(self.removed),
                "unchanged": self.unchanged}


def sha256_of(path: Path) -> str | None:
    """sha256 of a file's bytes, or None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def recorded_sources(manifest: dict[str, Any]) -> dict[str, str | None]:
    """File name -> sha256 of every source a store's manifest recorded: used and skipped volumes, demographics."""
    table: dict[str, str | None] = {s["file"]: s["sha256"] for s in manifest["sources"]}
    table.update({s["file"]: s["sha256"] for s in manifest["report"]["skipped"]})
    demo = manifest["report"].get("demographics")
    if demo:
        table[demo["file"]] = demo["sha256"]
    return table


def current_sources(ixi_dir: Path, modality: str) -> dict[str, str | None]:
    """File name -> sha256 of the files ``ingest`` would read from ``ixi_dir`` (volumes + demographics)."""
    files, _ = discover(ixi_dir, modality)
    paths = [f.path for f in files]
    demo = find_demographics(ixi_dir)
    if demo is not None:
        paths.append(demo)
    return {p.name: sha256_of(p) for p in paths}


def compare_sources(recorded: dict[str, str | None], current: dict[str, str | None]) -> SourceChanges:
    """Compare two name -> sha256 tables (an unreadable file, sha256 None, never matches)."""
    both = recorded.keys() & current.keys()
    changed = sorted(n for n in both if current[n] is None or current[n] != recorded[n])
    return SourceChanges(changed=tuple(changed), added=tuple(sorted(current.keys() - recorded.keys())),
                         removed=tuple(sorted(recorded.keys() - current.keys())), unchanged=len(both) - len(changed))


def verify_sources(ixi_dir: Path | str, store: SliceStore | Path | str) -> SourceChanges:
    """Compare the files in ``ixi_dir`` with the sources recorded by ``store`` (opened and verified if a path).

    Raises:
        StoreError: if ``store`` is a path that is not a valid store.
        ValueError: if ``ixi_dir`` is not a directory.
    """
    if not isinstance(store, SliceStore):
        store = SliceStore.open(store)
    return compare_sources(recorded_sources(store.manifest),
                           current_sources(Path(ixi_dir), store.manifest["config"]["modality"]))
