"""Benchmark: ingest of N IXI-sized volumes vs bare nibabel decoding of the same files.

Writes N demo volumes on the IXI T1 grid (256x256x150 int16 .nii.gz) into a temporary directory, then times
(a) ``np.asanyarray(nib.load(f).dataobj)`` for every file in one process (the decode floor), and (b) a full
``mrigen.data.ingest`` of the directory with W workers (decode, validation, band, normalisation, resize, split,
hashing, store write). Prints the ratio ingest_wall / (bare_decode / W); the target is <= 1.3. Also prints
the one-worker ingest against the same bare decode (per-volume overhead, independent of parallel scaling), and
(c) the bare decode spread over W processes, which shows how far the machine itself scales with W (on a
2-core machine whose cores share caches and memory bandwidth, far from W x). Last, (d) the gzip inflate alone
with zlib (what nibabel uses) and with ISA-L (what ingest uses), so the share of the gain that comes from the
faster inflater is visible.

    python bench/ingest.py --volumes 8 --workers 2 [--cohort DIR]   # DIR: reuse/keep the generated volumes
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import zlib

import nibabel as nib
import numpy as np
from isal import isal_zlib

from mrigen.data.config import IngestConfig
from mrigen.data.demo import make_demo_cohort
from mrigen.data.ingest import ingest


def _decode(path: Path) -> int:
    return int(np.asanyarray(nib.load(path).dataobj).size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=8, help="number of IXI-sized T1 volumes (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="ingest worker processes (default 2)")
    parser.add_argument("--size", type=int, default=128, help="output slice size (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, best is reported (default 3)")
    parser.add_argument("--cohort", type=Path, help="directory for the generated volumes (kept and reused)")
    args = parser.parse_args()
    logging.getLogger("mrigen.data").setLevel(logging.ERROR)  # the demo table's duplicate-row notice
    with tempfile.TemporaryDirectory(prefix="mrigen-bench-") as tmp:
        cohort = args.cohort or Path(tmp) / "ixi"
        files = sorted(cohort.glob("IXI*-T1.nii.gz"))
        if len(files) != args.volumes:
            files = make_demo_cohort(cohort, subjects=args.volumes, seed=0, modality="T1")
        shape = nib.load(files[0]).shape
        mb = sum(f.stat().st_size for f in files) / 1e6
        bare, wall, one, bare_par, inflate = [], [], [], [], {"zlib": [], "isal": []}
        cfg = IngestConfig(size=args.size, workers=args.workers)
        for _ in range(args.repeats):
            t = time.perf_counter()
            for f in files:
                np.asanyarray(nib.load(f).dataobj)
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            with mp.get_context("fork").Pool(args.workers) as pool:
                pool.map(_decode, files, chunksize=1)
            bare_par.append(time.perf_counter() - t)
            t = time.perf_counter()
            store = ingest(cohort, Path(tmp) / "store", cfg, overwrite=True, progress=False)
            wall.append(time.perf_counter() - t)
            t = time.perf_counter()
            ingest(cohort, Path(tmp) / "store1", IngestConfig(size=args.size, workers=1), overwrite=True,
                   progress=False)
            one.append(time.perf_counter() - t)
            for name, lib in (("zlib", zlib), ("isal", isal_zlib)):
                t = time.perf_counter()
                for f in files:
                    lib.decompressobj(wbits=31).decompress(f.read_bytes())
                inflate[name].append(time.perf_counter() - t)
        b, w, w1, bp = min(bare), min(wall), min(one), min(bare_par)
        target = b / args.workers
        print(f"volumes: {args.volumes} x {shape} int16 .nii.gz ({mb:.0f} MB), workers {args.workers}, "
              f"size {args.size}, best of {args.repeats}")
        print(f"bare nibabel decode, 1 process: {b:.2f} s ({b / args.volumes * 1000:.0f} ms/volume)")
        print(f"ingest ({len(store.images('train')) + sum(len(store.images(s)) for s in store.splits[1:])} slices): "
              f"{w:.2f} s")
        print(f"ingest, 1 worker: {w1:.2f} s; ratio ingest_1 / bare: {w1 / b:.2f}")
        print(f"ratio ingest / (bare / workers): {w / target:.2f}  (target <= 1.30)")
        print(f"bare decode in {args.workers} processes: {bp:.2f} s (machine scaling {b / bp:.2f}x of "
              f"{args.workers}x); ratio ingest / parallel bare decode: {w / bp:.2f}")
        z, i = min(inflate["zlib"]), min(inflate["isal"])
        print(f"gzip inflate alone, 1 process: zlib {z / args.volumes * 1000:.0f} ms/volume, ISA-L "
              f"{i / args.volumes * 1000:.0f} ms/volume ({z / i:.2f}x)")


if __name__ == "__main__":
    main()
