"""A small on-disk slice store whose labels are visible in the images, for fast protocol tests.

Each subject has a site (A, B, C), an age and a sex, and 10 slices. A slice is a bright disc on a dark field:
its radius grows with `slice_pos` (like the brain's cross-section along the band), its contrast curve depends
on the site (gamma 0.5 / 1 / 2 over a radial gradient), with a per-subject shift, size jitter and pixel noise.
Age and sex do not show in the images: a task on them must come out as not learnable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mrigen.data.store import SliceStore, write_store

SITES = ("A", "B", "C")
GAMMA = {"A": 0.5, "B": 1.0, "C": 2.0}


def make_labelled_store(path: Path, size: int = 32, subjects: tuple[int, int, int] = (24, 6, 12),
                        slices: int = 10, seed: int = 0) -> SliceStore:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / (size - 1) - 0.5
    blocks, table = [], {k: [] for k in ("subject", "site", "slice_pos", "slice_index", "age", "sex")}
    splits, start, n = {}, 0, 0
    for split, count in zip(("train", "val", "test"), subjects):
        images = []
        for _ in range(count):
            name, site = f"S{n:03d}", SITES[n % 3]
            n += 1
            cy, cx = rng.uniform(-0.06, 0.06, 2)
            jitter, age, sex = rng.uniform(0.95, 1.05), float(rng.uniform(20, 80)), str(rng.choice(["F", "M"]))
            for k in range(slices):
                pos = k / (slices - 1)
                radius = (0.18 + 0.2 * pos) * jitter
                r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / radius
                disc = np.clip(1.0 - r, 0.0, 1.0) ** GAMMA[site] * (r < 1)
                images.append(np.clip(0.9 * disc + rng.normal(0, 0.04, (size, size)), 0, 1))
                for key, value in (("subject", name), ("site", site), ("slice_pos", pos), ("slice_index", k),
                                   ("age", age), ("sex", sex)):
                    table[key].append(value)
        blocks.append(np.stack(images).astype(np.float16))
        splits[split] = {"start": start, "stop": start + len(images)}
        start += len(images)
    manifest = {"config": {"size": size}, "splits": splits, "slices": table}
    return write_store(Path(path), blocks, manifest)
