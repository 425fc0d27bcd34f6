"""``python -m mrigen.data {demo,ingest,verify,fetch-ixi}``: the data pipeline's command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mrigen import logs
from mrigen.data.build import DEMO_SUBJECTS
from mrigen.data.config import INGEST_MODALITIES, SIZES, IngestConfig
from mrigen.data.demo import make_demo_cohort
from mrigen.data.fetch import IXI_DEMOGRAPHICS_URL, IXI_URLS, FetchError, fetch_ixi
from mrigen.data.ingest import IngestError, ingest
from mrigen.data.store import StoreError
from mrigen.data.verify import verify_sources

__all__ = ["main", "build_parser"]

_D = IngestConfig()


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with the four sub-commands."""
    p = argparse.ArgumentParser(prog="python -m mrigen.data", description="IXI data pipeline for mrigen.")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="write a generated IXI-like cohort (MNI152-based brains, no download)")
    demo.add_argument("--out", type=Path, required=True, help="output directory")
    demo.add_argument("--subjects", type=int, default=DEMO_SUBJECTS,
                      help=f"number of subjects, sites balanced (default {DEMO_SUBJECTS})")
    demo.add_argument("--seed", type=int, default=0, help="random seed; same seed, same cohort (default 0)")
    demo.add_argument("--modality", choices=INGEST_MODALITIES, default="T1", help="contrast and grid (default T1)")
    demo.add_argument("--voxel-scale", type=int, default=1,
                      help="1 = IXI grid (256x256x150 for T1); k = k-times coarser voxels, same field (default 1)")

    ing = sub.add_parser("ingest", help="IXI volumes -> validated slice store")
    ing.add_argument("--ixi", type=Path, required=True, help="directory of IXI<id>-<site>-<nnnn>-<mod>.nii.gz files")
    ing.add_argument("--out", type=Path, required=True, help="store directory to create")
    ing.add_argument("--modality", choices=INGEST_MODALITIES, default=_D.modality, help="default %(default)s")
    ing.add_argument("--size", type=int, choices=SIZES, default=_D.size, help="output side px (default %(default)s)")
    ing.add_argument("--slices", type=int, default=_D.slices, help="slices per subject (default %(default)s)")
    ing.add_argument("--band", type=float, nargs=2, metavar=("UPPER", "LOWER"), default=_D.band,
                     help="band edges as depth below the vertex in head lengths (default %(default)s: from just "
                          "above the eyes upward)")
    ing.add_argument("--min-brain", type=float, default=_D.min_brain,
                     help="drop slices with less head area than this fraction of the largest (default %(default)s)")
    ing.add_argument("--percentiles", type=float, nargs=2, metavar=("LO", "HI"), default=_D.percentiles,
                     help="per-volume intensity range mapped to [0,1] (default %(default)s)")
    ing.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"), default=_D.split,
                     help="subject fractions, stratified by site (default %(default)s)")
    ing.add_argument("--seed", type=int, default=_D.seed, help="split seed (default %(default)s)")
    ing.add_argument("--workers", type=int, default=_D.workers, help="worker processes, 0 = all CPUs (default 0)")
    ing.add_argument("--overwrite", action="store_true", help="replace an existing store (atomically)")

    ver = sub.add_parser("verify", help="check source files against a store's sha256 manifest (exit 1 on any change)",
                         description="Hash the files ingest would read from --ixi (volumes of the store's modality "
                                     "and the demographics table) and compare them with the sha256s recorded in "
                                     "the store's manifest. Prints one line per changed, added or removed file "
                                     "and exits 1 if there is any; a recompressed file with the same voxels "
                                     "counts as changed (the manifest vouches for bytes).")
    ver.add_argument("--ixi", type=Path, required=True, help="directory of the source volumes")
    ver.add_argument("--store", type=Path, required=True, help="slice store whose manifest is the reference")

    fetch = sub.add_parser("fetch-ixi", help="download + verify + extract an IXI tarball (resumable)")
    fetch.add_argument("--out", type=Path, required=True, help="directory for the extracted volumes")
    fetch.add_argument("--modality", choices=list(IXI_URLS), default="T1", help="default %(default)s")
    fetch.add_argument("--url", help="tarball URL (default: the IXI site's URL for the modality)")
    fetch.add_argument("--demographics-url", default=IXI_DEMOGRAPHICS_URL, help="IXI.xls URL (default: IXI site)")
    fetch.add_argument("--no-demographics", action="store_true", help="do not download IXI.xls")
    fetch.add_argument("--sha256", help="expected sha256 of the tarball, checked before extraction")
    fetch.add_argument("--keep-archive", action="store_true", help="keep the .tar after extraction")
    for command in (demo, ing, ver, fetch):
        logs.add_arguments(command)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; returns the exit status (1 with an ``error:`` line on failure)."""
    args = build_parser().parse_args(argv)
    logs.setup(args)
    progress = logs.progress()
    try:
        if args.command == "demo":
            files = make_demo_cohort(args.out, args.subjects, args.seed, args.modality, args.voxel_scale,
                                     progress=progress)
            print(f"demo: {len(files)} {args.modality} volumes + IXI.csv in {args.out}")
        elif args.command == "ingest":
            cfg = IngestConfig(modality=args.modality, size=args.size, slices=args.slices, band=tuple(args.band),
                               min_brain=args.min_brain, percentiles=tuple(args.percentiles),
                               split=tuple(args.split), seed=args.seed, workers=args.workers)
            ingest(args.ixi, args.out, cfg, overwrite=args.overwrite, progress=progress)
        elif args.command == "verify":
            changes = verify_sources(args.ixi, args.store)
            for kind, names in (("changed", changes.changed), ("added", changes.added), ("removed", changes.removed)):
                for name in names:
                    print(f"{kind}: {name}")
            print(f"verify: {changes.summary()} vs {args.store}", file=sys.stdout if changes.clean else sys.stderr)
            return 0 if changes.clean else 1
        else:
            fetch_ixi(args.out, args.modality, args.url, None if args.no_demographics else args.demographics_url,
                      args.sha256, args.keep_archive, progress=progress)
    except (IngestError, FileExistsError, ValueError, FetchError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
