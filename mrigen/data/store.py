"""The slice store: one float16 array file plus a manifest, verified on every open.

On disk: ``STORE/images.npy`` (N, H, W) float16 in [0, 1], rows grouped by split (train, val, test), and
``STORE/manifest.json`` with the config, the split, a per-slice table, per-source sha256s, the ingest report,
the sha256 of images.npy and a sha256 of the manifest itself (so a hand-edited manifest is refused too).
Stores are written to a temporary sibling directory and renamed into place: never half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mrigen.data.config import IngestConfig

if TYPE_CHECKING:
    import torch

__all__ = ["SliceStore", "StoreError", "write_store", "FORMAT", "SPLITS", "IMAGES", "MANIFEST", "SLICE_COLUMNS"]

FORMAT = "mrigen-slice-store/1"
SPLITS = ("train", "val", "test")
IMAGES = "images.npy"
MANIFEST = "manifest.json"
SLICE_COLUMNS = ("subject", "ixi_id", "site", "slice_pos", "slice_index", "age", "sex", "source")  # per-row table


class StoreError(Exception):
    """A store that is missing, incomplete, tampered with, or does not match its manifest."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class SliceStore:
    """A verified, memory-mapped slice store. Build one with :meth:`open`."""

    def __init__(self, path: Path, manifest: dict[str, Any], images: np.ndarray) -> None:
        self.path = path
        self.manifest = manifest
        self._images = images  # (N, H, W) float16, memory-mapped

    @classmethod
    def open(cls, path: Path | str) -> SliceStore:
        """Open and verify a store: manifest digest, images.npy sha256, shapes and split ranges.

        Raises:
            StoreError: naming the store and what does not match.
        """
        path = Path(path)
        manifest = cls.read_manifest(path)
        ipath = path / IMAGES
        if _sha256_file(ipath) != manifest["images"]["sha256"]:
            raise StoreError(f"{ipath}: sha256 does not match the manifest (tampered or corrupt)")
        return cls._map(path, manifest)

    @staticmethod
    def read_manifest(path: Path | str) -> dict[str, Any]:
        """A store's manifest, checked against its own ``manifest_sha256`` (images.npy is not read).

        Raises:
            StoreError: if the store's files are missing or the manifest is not valid or was edited.
        """
        path = Path(path)
        mpath, ipath = path / MANIFEST, path / IMAGES
        if not mpath.is_file() or not ipath.is_file():
            raise StoreError(f"{path}: not a slice store (needs {MANIFEST} and {IMAGES})")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{mpath}: not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{mpath}: format is not {FORMAT}")
        if manifest.get("manifest_sha256") != _manifest_digest(manifest):
            raise StoreError(f"{mpath}: content does not match its manifest_sha256 (edited or corrupt)")
        return manifest

    @classmethod
    def _map(cls, path: Path, manifest: dict[str, Any]) -> SliceStore:
        """Memory-map images.npy and check its shape and the split ranges against ``manifest``."""
        mpath, ipath = path / MANIFEST, path / IMAGES
        try:
            images = np.load(ipath, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise StoreError(f"{ipath}: not a readable .npy array ({exc})") from exc
        n = images.shape[0]
        if list(images.shape) != manifest["images"]["shape"] or images.dtype != np.float16:
            raise StoreError(f"{ipath}: shape {images.shape} {images.dtype} differs from the manifest")
        stops = [0] + [manifest["splits"][s]["stop"] for s in manifest["splits"]]
        starts = [manifest["splits"][s]["start"] for s in manifest["splits"]]
        if starts != stops[:-1] or stops[-1] != n or any(len(c) != n for c in manifest["slices"].values()):
            raise StoreError(f"{mpath}: split ranges or slice table do not cover the {n} images")
        return cls(path, manifest, images)

    @property
    def digest(self) -> str:
        """sha256 of images.npy: identifies the data."""
        return self.manifest["images"]["sha256"]

    @property
    def image_size(self) -> int:
        """Side H (= W) of every image."""
        return int(self._images.shape[1])

    @property
    def splits(self) -> tuple[str, ...]:
        """The non-empty splits present, in order ("train", "val", "test")."""
        return tuple(s for s in SPLITS if s in self.manifest["splits"])

    @property
    def config(self) -> IngestConfig:
        """The ingest settings that built the store."""
        return IngestConfig.from_dict(self.manifest["config"])

    def _range(self, split: str) -> slice:
        if split not in self.manifest["splits"]:
            raise ValueError(f"split={split!r} is not in this store (present: {', '.join(self.splits)})")
        r = self.manifest["splits"][split]
        return slice(r["start"], r["stop"])

    def images(self, split: str) -> np.ndarray:
        """(N, H, W) float16 in [0, 1], memory-mapped, read-only."""
        return self._images[self._range(split)]

    def tensor(self, split: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
               ) -> torch.Tensor:
        """The whole split as one (N, 1, H, W) tensor in [0, 1] on ``device`` (dtype default float32).

        The float16 rows are copied to the device first and converted there (half the transfer).
        """
        import torch

        rows = torch.from_numpy(np.array(self.images(split)))  # (N, H, W) float16, read from the map into RAM
        return rows.to(device).to(dtype or torch.float32).unsqueeze(1)

    def slices(self, split: str) -> list[dict[str, Any]]:
        """Per-row metadata of a split: subject, ixi_id, site, slice_pos, slice_index, age, sex, source."""
        r = self._range(split)
        table = self.manifest["slices"]
        cols = {k: table[k][r] for k in table}
        return [dict(zip(cols, row)) for row in zip(*cols.values())]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self._range(s).stop - self._range(s).start}" for s in self.splits)
        return f"SliceStore({str(self.path)!r}, {self.image_size}px, {sizes})"


def write_store(path: Path, images: list[np.ndarray], manifest: dict[str, Any], overwrite: bool = False
                ) -> SliceStore:
    """Write ``images`` (row blocks, concatenated in order) and ``manifest`` as a store at ``path``, atomically.

    The store is built in a temporary sibling directory and renamed into place; an existing store is
    replaced only when ``overwrite`` is true (it stays intact until the new one is complete).

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        n = sum(len(b) for b in images)
        side = images[0].shape[1] if images else 0
        out = np.lib.format.open_memmap(tmp / IMAGES, mode="w+", dtype=np.float16, shape=(n, side, side))
        row = 0
        for block in images:
            out[row:row + len(block)] = block
            row += len(block)
        out.flush()
        del out
        manifest = dict(manifest, format=FORMAT)
        manifest["images"] = {"file": IMAGES, "sha256": _sha256_file(tmp / IMAGES), "shape": [n, side, side],
                              "dtype": "float16"}
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for name in (IMAGES, MANIFEST):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return SliceStore._map(path, manifest)  # hashed above as written: no second read of images.npy
