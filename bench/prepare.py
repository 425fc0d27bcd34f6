"""Build a mode's demo store and cache its feature network and attribute probes, once, before benchmarks that share
them start side by side (each would otherwise train its own copy of the same network at the same time).

    python bench/prepare.py --mode gpu --work /tmp/bench-work      # then quality.py / utility.py with that --work
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import MODES  # noqa: E402  (the mode's size and device)

from mrigen.data import DEMO_SUBJECTS, build_demo_store  # noqa: E402
from mrigen.metrics.features import get_feature_net  # noqa: E402
from mrigen.metrics.probe import get_probes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(MODES), default="cpu", help="cpu: 64 px on CPU; gpu: 128 px on CUDA")
    p.add_argument("--subjects", type=int, default=DEMO_SUBJECTS, help="demo cohort size")
    p.add_argument("--work", type=Path, default=Path("bench-work"), help="demo store cache directory")
    args = p.parse_args(argv)
    mode = MODES[args.mode]
    t0 = time.perf_counter()
    store = build_demo_store(args.work / f"demo-{mode['size']}", subjects=args.subjects, size=mode["size"],
                             progress=False)
    t1 = time.perf_counter()
    get_feature_net(store, device=mode["device"])
    t2 = time.perf_counter()
    get_probes(store, device=mode["device"])
    print(f"prepared {store.path}: store {t1 - t0:.0f} s, feature network {t2 - t1:.0f} s, probes "
          f"{time.perf_counter() - t2:.0f} s (cached files are reused)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
