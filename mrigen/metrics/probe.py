"""Attribute probes: small CNNs trained on a store's real training slices that read attributes back from images.

They answer "does this slice show what was asked for?" (conditioning fidelity) and label the samples of an
unconditional generator for the augmentation-utility benchmark (`mrigen.utility`). One network per store,
with one head per attribute the store carries:

- `slice_pos`: position within the axial band, regression (the store's value, in [0, 1]);
- `site`: acquisition site, classification over the sorted site names (needs >= 2 sites);
- `age`: years, regression (subjects without an age are left out of its loss, never read as 0);
- `sex`: "F" / "M", classification (subjects without one are left out of its loss).

Trained once per store on **every** real training slice (a probe, unlike the feature network, is not a
baseline for anything drawn from the training split), scored on the held-out `val` split, and cached as
`STORE/probes-v1-<digest[:12]>.safetensors` with the store digest, config, label encodings and those held-out
scores in its metadata. docs/UTILITY.md has the measured accuracies on the demo cohort.

    probes = get_probes(store, device="cpu")
    probes.predict(images)              # {"slice_pos": (N,), "site": (N,) index into probes.site_names, ...}
    probes.score(images, rows)          # {"slice_pos_mae": ..., "site_acc": ..., "age_mae": ..., "sex_acc": ...}
    probes.val_scores                   # the same keys on the store's real held-out (val) slices
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from mrigen import __version__
from mrigen.metrics.features import StoreLike, resize_square, save_weights_atomic
from mrigen.config import config_from_dict

__all__ = ["ATTRIBUTES", "FORMAT", "SEXES", "ProbeConfig", "ProbeNet", "Probes", "get_probes", "label_info",
           "probe_cache_path", "train_probes"]

log = logging.getLogger(__name__)

FORMAT = "mrigen.probes/1"          # metadata["format"]; the version is in the cache file name too
ATTRIBUTES = ("slice_pos", "site", "age", "sex")
SEXES = ("F", "M")                  # class index = position
_MIN_LABELLED = 2                   # an attribute needs >= 2 distinct known values to be probed


@dataclass(frozen=True)
class ProbeConfig:
    """Architecture and training of the probes. Defaults train in well under a minute on one CPU core at 64 px."""

    input_size: int = 64                    # every image is resized to this side first
    channels: tuple[int, ...] = (16, 32, 64, 128)    # conv stages, each halves the side (64 -> 4 px)
    hidden: int = 128                       # width of the shared dense layer before the heads
    steps: int = 800                        # Adam steps
    batch_size: int = 64                    # slices per step
    lr: float = 1e-3                        # Adam learning rate
    seed: int = 0                           # seeds weights and batches

    def __post_init__(self) -> None:
        for name in ("input_size", "hidden", "steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ProbeConfig.{name}={getattr(self, name)!r} must be >= 1")
        if not self.channels or any(int(c) < 1 for c in self.channels):
            raise ValueError(f"ProbeConfig.channels={self.channels!r} must be a non-empty tuple of ints >= 1")
        if self.input_size % 2 ** len(self.channels) or self.input_size // 2 ** len(self.channels) < 1:
            raise ValueError(f"ProbeConfig.input_size={self.input_size!r} must be a multiple of "
                             f"2**len(channels)={2 ** len(self.channels)}")
        if not self.lr > 0:
            raise ValueError(f"ProbeConfig.lr={self.lr!r} must be > 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProbeConfig":
        return config_from_dict(cls, data)


def label_info(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which attributes `rows` (`store.slices("train")`) carry, and their encodings.

    Returns:
        {"attributes": [names present, in ATTRIBUTES order], "site_names": sorted sites,
         "age_mean": float, "age_std": float}. An attribute is present when at least two distinct known values
        occur (one site, one sex or one age cannot be told apart from the image).
    """
    present = []
    pos = {float(r["slice_pos"]) for r in rows if r.get("slice_pos") is not None}
    if len(pos) >= _MIN_LABELLED:
        present.append("slice_pos")
    sites = sorted({str(r["site"]) for r in rows if r.get("site") is not None})
    if len(sites) >= _MIN_LABELLED:
        present.append("site")
    ages = [float(r["age"]) for r in rows if _known(r.get("age"))]
    if len(set(ages)) >= _MIN_LABELLED:
        present.append("age")
    if len({str(r["sex"]) for r in rows if r.get("sex") in SEXES}) >= _MIN_LABELLED:
        present.append("sex")
    mean = sum(ages) / len(ages) if ages else 0.0
    std = math.sqrt(sum((a - mean) ** 2 for a in ages) / len(ages)) if ages else 1.0
    return {"attributes": present, "site_names": sites, "age_mean": mean, "age_std": max(std, 1e-3)}


def _known(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _targets(rows: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{attribute: (target (N,), known mask (N,) bool)}; regression targets float32, classes int64 (-1 unknown)."""
    lookup = {s: i for i, s in enumerate(info["site_names"])}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for attr in info["attributes"]:
        if attr == "slice_pos":
            vals = [float(r["slice_pos"]) if _known(r.get("slice_pos")) else math.nan for r in rows]
        elif attr == "age":
            vals = [(float(r["age"]) - info["age_mean"]) / info["age_std"] if _known(r.get("age")) else math.nan
                    for r in rows]
        elif attr == "site":
            cls = [lookup.get(str(r.get("site")), -1) for r in rows]
        else:
            cls = [SEXES.index(r["sex"]) if r.get("sex") in SEXES else -1 for r in rows]
        if attr in ("slice_pos", "age"):
            t = torch.tensor(vals, dtype=torch.float32)
            out[attr] = (torch.nan_to_num(t), ~torch.isnan(t))
        else:
            t = torch.tensor(cls, dtype=torch.int64)
            out[attr] = (t.clamp_min(0), t >= 0)
    return out


class ProbeNet(nn.Module):
    """Conv trunk (stride-2 3x3 stages, GroupNorm, LeakyReLU), a dense layer, one head per attribute.

    Args:
        cfg: architecture.
        heads: {attribute: output width} (1 for a regression, the class count for a classification).
    """

    def __init__(self, cfg: ProbeConfig, heads: dict[str, int]) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in cfg.channels:          # (B, c_in, s, s) -> (B, c_out, s/2, s/2)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(min(8, c_out), c_out),
                       nn.LeakyReLU(0.2)]
            c_in = c_out
        self.trunk = nn.Sequential(*layers)
        side = cfg.input_size // 2 ** len(cfg.channels)
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, cfg.hidden), nn.LeakyReLU(0.2))
        self.heads = nn.ModuleDict({k: nn.Linear(cfg.hidden, w) for k, w in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`(B, 1, H, W)` in [0, 1] -> {attribute: `(B,)` regression or `(B, classes)` logits}."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"probe input must be (B, 1, H, W); got shape {tuple(x.shape)}")
        h = self.dense(self.trunk(resize_square(x, self.cfg.input_size) - 0.5))     # (B, hidden)
        return {k: (head(h)[:, 0] if head.out_features == 1 else head(h)) for k, head in self.heads.items()}


def _head_widths(info: dict[str, Any]) -> dict[str, int]:
    return {a: {"slice_pos": 1, "age": 1, "site": len(info["site_names"]), "sex": len(SEXES)}[a]
            for a in info["attributes"]}


class Probes:
    """Trained probes of one store: `predict(images)`, `score(images, rows)`, `val_scores`.

    Attributes:
        attributes: the attributes probed (a subset of ATTRIBUTES, in that order).
        site_names: class names of the `site` head (sorted).
        val_scores: `score` of the store's real held-out (val) slices, measured when the probes were trained.
    """

    def __init__(self, net: ProbeNet, info: dict[str, Any], val_scores: dict[str, float] | None = None) -> None:
        self.net = net.eval()
        self.info = info
        self.attributes: tuple[str, ...] = tuple(info["attributes"])
        self.site_names: tuple[str, ...] = tuple(info["site_names"])
        self.val_scores = dict(val_scores or {})

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def predict(self, images: torch.Tensor, *, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Read the attributes back from `images`.

        Args:
            images: `(N, 1, H, W)` in [0, 1], any device and size.

        Returns:
            On the CPU: `slice_pos` (N,) float, `site` (N,) int64 index into `site_names`, `age` (N,) float years,
            `sex` (N,) int64 index into SEXES ("F", "M"), for the attributes probed.
        """
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"Probes.predict expects (N, 1, H, W) images; got shape {tuple(images.shape)}")
        outs: dict[str, list[torch.Tensor]] = {a: [] for a in self.attributes}
        for i in range(0, images.shape[0], batch_size):
            out = self.net(images[i:i + batch_size].to(self.device))
            for a in self.attributes:
                v = out[a].float()
                if a == "age":
                    v = v * self.info["age_std"] + self.info["age_mean"]
                elif a in ("site", "sex"):
                    v = v.argmax(1)
                outs[a].append(v.cpu())
        return {a: (torch.cat(v) if v else torch.empty(0)) for a, v in outs.items()}

    def labels(self, images: torch.Tensor) -> list[dict[str, Any]]:
        """Predicted attributes as rows shaped like `store.slices()` rows (site and sex as names)."""
        pred = self.predict(images)
        rows = []
        for i in range(images.shape[0]):
            row: dict[str, Any] = {}
            for a, v in pred.items():
                if a == "site":
                    row[a] = self.site_names[int(v[i])]
                elif a == "sex":
                    row[a] = SEXES[int(v[i])]
                else:
                    row[a] = float(v[i])
            rows.append(row)
        return rows

    def score(self, images: torch.Tensor, rows: list[dict[str, Any]]) -> dict[str, float]:
        """How well the attributes read back from `images` match `rows` (requested or true values).

        Args:
            images: `(N, 1, H, W)` in [0, 1].
            rows: N dicts with any of `slice_pos`, `site`, `age`, `sex` (None = unknown, left out).

        Returns:
            `slice_pos_mae`, `site_acc`, `age_mae` (years), `sex_acc`, for the probed attributes that at least one
            row gives; a site the probe does not know counts as a miss.
        """
        if len(rows) != images.shape[0]:
            raise ValueError(f"Probes.score: {len(rows)} rows for {images.shape[0]} images")
        pred = self.predict(images)
        out: dict[str, float] = {}
        for a in self.attributes:
            given = [(i, r[a]) for i, r in enumerate(rows) if _known(r.get(a))]
            if not given:
                continue
            idx = torch.tensor([i for i, _ in given])
            if a in ("slice_pos", "age"):
                want = torch.tensor([float(v) for _, v in given])
                out[f"{a}_mae"] = float((pred[a][idx] - want).abs().mean())
            else:
                names = self.site_names if a == "site" else SEXES
                want = torch.tensor([names.index(str(v)) if str(v) in names else -1 for _, v in given])
                out[f"{a}_acc"] = float((pred[a][idx] == want).float().mean())
        return out


def probe_cache_path(store: StoreLike) -> Path:
    """`STORE/probes-v<format>-<digest[:12]>.safetensors` (a new format version ignores older caches)."""
    return Path(store.path) / f"probes-v{FORMAT.rsplit('/', 1)[1]}-{store.digest[:12]}.safetensors"


@torch.enable_grad()
def train_probes(store: StoreLike, cfg: ProbeConfig | None = None, *, device: torch.device | str = "cpu") -> Probes:
    """Train the probes on every real training slice of `store` and score them on its val split.

    Inputs are flipped left-right at random (no attribute depends on the side) so the probes read anatomy and
    contrast, not one subject's pose.

    Raises:
        ValueError: the store carries none of ATTRIBUTES with two or more values.
    """
    cfg = cfg or ProbeConfig()
    device = torch.device(device)
    rows = store.slices("train")
    info = label_info(rows)
    if not info["attributes"]:
        raise ValueError(f"store {store.path}: no attribute with two or more values among {', '.join(ATTRIBUTES)}; "
                         f"nothing to probe")
    images = resize_square(store.tensor("train", device), cfg.input_size)          # (N, 1, s, s)
    if images.shape[0] != len(rows):
        raise ValueError(f"store.slices('train') has {len(rows)} rows but the train tensor has {images.shape[0]}")
    targets = {a: (t.to(device), m.to(device)) for a, (t, m) in _targets(rows, info).items()}
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    net = ProbeNet(cfg, _head_widths(info)).to(device)
    torch.random.set_rng_state(torch_state)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    net.train()
    for _ in range(cfg.steps):
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen).to(device)
        flip = (torch.rand(cfg.batch_size, generator=gen) < 0.5).to(device)
        x = torch.where(flip[:, None, None, None], images[idx].flip(-1), images[idx])
        out = net(x)
        loss = torch.zeros((), device=device)
        for a, (t, known) in targets.items():
            k = known[idx]
            if not bool(k.any()):
                continue
            if a in ("slice_pos", "age"):
                scale = 10.0 if a == "slice_pos" else 1.0          # positions live in [0, 1]: weigh them up
                loss = loss + scale * F.smooth_l1_loss(out[a][k], t[idx][k])
            else:
                loss = loss + F.cross_entropy(out[a][k], t[idx][k])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    probes = Probes(net.eval(), info)
    if "val" in getattr(store, "splits", ("val",)):
        probes.val_scores = probes.score(store.tensor("val", device), store.slices("val"))
    log.info("probes of store %s trained (%s); held-out val: %s", store.digest[:12], ", ".join(probes.attributes),
             ", ".join(f"{k}={v:.3f}" for k, v in probes.val_scores.items()))
    return probes


def _save(probes: Probes, path: Path, store_digest: str) -> None:
    metadata = {"format": FORMAT, "store_digest": store_digest, "config": json.dumps(asdict(probes.net.cfg)),
                "info": json.dumps(probes.info), "val_scores": json.dumps(probes.val_scores),
                "mrigen_version": __version__}
    save_weights_atomic(probes.net, path, metadata)


def _load(path: Path, store_digest: str, device: torch.device | str) -> Probes:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"probe file {path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mrigen probe file (format {meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("store_digest") != store_digest:
        raise ValueError(f"probe file {path} was trained on store {meta.get('store_digest')!r}, not {store_digest!r}")
    cfg = ProbeConfig.from_dict(json.loads(meta["config"]))
    info = json.loads(meta["info"])
    net = ProbeNet(cfg, _head_widths(info))
    net.load_state_dict(load_file(str(path)))
    return Probes(net.to(device), info, json.loads(meta.get("val_scores") or "{}"))


def get_probes(store: StoreLike, *, device: torch.device | str = "cpu", config: ProbeConfig | None = None) -> Probes:
    """The probes of `store`: the cached file if there is one (and `config` is None or equal), else trained and
    cached (a read-only store folder only logs a warning)."""
    path = probe_cache_path(store)
    if path.is_file():
        probes = _load(path, store.digest, device)
        if config is None or probes.net.cfg == config:
            return probes
        log.info("cached probes %s were made with other settings; training new ones", path)
    probes = train_probes(store, config, device=device)
    try:
        _save(probes, path, store.digest)
    except OSError as exc:
        log.warning("could not cache the probes at %s (%s); they will be retrained next time", path, exc)
    return probes
