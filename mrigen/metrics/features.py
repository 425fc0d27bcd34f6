"""The in-project feature network: a small CNN trained once per slice store on half of its training subjects.

No ImageNet/RadImageNet weights can be downloaded, so the Frechet distance and precision/recall use a network
trained here, on the store itself, with three auxiliary tasks (docs/METRICS.md says why):

1. slice position within the band (regression): features must encode anatomy and its layout;
2. acquisition site (classification, when the store has more than one): features must encode contrast/scanner;
3. degradation type of the input (classification over `pretext.DEGRADATIONS`: clean, blur, noise, blotches,
   broken rim, checkerboard, washed-out contrast): features must notice exactly the failures a generator makes,
   so a sample set with one lands away from the real one.

It trains on the subjects of one `train_halves` half only: the other half is the real baseline of `evaluate`. Half
the slices it sees are mirrored left-right (`FeatureNetConfig.mirror`): the weakest failure (blotches) then scores
3.2-5.7x the `fd_ratio` of clean unseen slices under single networks of three seeds, against 2.0-3.7x without
(docs/METRICS.md, "Mirrored training slices").

Each network's features are its L2-normalised penultimate activations (`FeatureNetConfig.feature_dim` wide)
followed by its own degradation probabilities (one per `pretext.DEGRADATIONS` entry, times `detector_weight`): a
sample set the network sees as blotched or patchy then sits away from real slices by construction, instead of along
whichever small direction of the embedding the degradation head happens to use (docs/METRICS.md, "why the
detector is in the features").

One network's features are one draw: what it weighs depends on its training seed, and `fd_ratio` of one sample set
moved by up to 2x between seeds. So `FeatureNet` is an ensemble of `FeatureNetConfig.members` networks (3 by
default), each trained alone with its own seed, whose features are concatenated and scaled by 1/sqrt(members): a
squared distance in that space is the mean of the members' squared distances (docs/METRICS.md, "Three networks,
averaged").
The trained ensemble is cached as `STORE/feature_net-v5-<digest[:12]>-<members>nets.safetensors` with the store
digest and config in its metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from tqdm.auto import tqdm

from mrigen import __version__
from mrigen.config import config_from_dict

from .pretext import DEGRADATIONS, AuxTargets, aux_targets, degrade, head_masks

__all__ = ["CPU_THREADS", "FORMAT", "MEMBERS_ENV", "MEMBER_SEED_STRIDE", "STEPS_ENV", "FeatureBranch", "FeatureNet",
           "FeatureNetConfig", "StoreLike", "cache_path", "default_config", "extract_features", "get_feature_net",
           "load_feature_net", "prepare", "resize_square", "save_feature_net", "save_weights_atomic",
           "train_feature_net", "train_halves"]

log = logging.getLogger(__name__)

CPU_THREADS = 1                     # torch threads a network trains on, on a CPU (see train_feature_net)
STEPS_ENV = "MRIGEN_FEATURE_NET_STEPS"   # overrides FeatureNetConfig.steps of a newly trained default network
MEMBERS_ENV = "MRIGEN_FEATURE_NET_MEMBERS"   # overrides FeatureNetConfig.members of a default network
MEMBER_SEED_STRIDE = 1000           # member i trains with seed + 1000 * i (member 0 = the single network of `seed`)
FORMAT = "mrigen.feature_net/5"     # metadata["format"]; /5: mirrored training slices; /4: an ensemble of members


# Cache paths whose network a background process is training (mrigen.metrics.background), each with the call that
# waits for it; `get_feature_net` waits before it looks for the file, so it never trains the same network twice.
_PENDING: dict[Path, Callable[[], object]] = {}


class StoreLike(Protocol):
    """What the feature network needs of a slice store (a subset of `mrigen.data.store.SliceStore`)."""

    digest: str
    path: Path

    def tensor(self, split: str, device: Any, dtype: torch.dtype = ...) -> torch.Tensor: ...

    def slices(self, split: str) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class FeatureNetConfig:
    """Architecture and training of the feature networks. Each member trains in ~65 s on one CPU thread at 64 px."""

    input_size: int = 64                    # every image is resized to this side first (any store size works)
    channels: tuple[int, ...] = (16, 32, 64, 128)    # conv stages, each halves the side (64 -> 4 px)
    feature_dim: int = 128                  # width of the penultimate layer (features add len(DEGRADATIONS))
    detector_weight: float = 1.0            # scale of the degradation probabilities in the features (0 = off)
    steps: int = 1500                       # optimiser steps (600 left patchy samples near real: METRICS.md)
    batch_size: int = 64                    # slices per step (each gets one random degradation)
    lr: float = 5e-4                        # Adam learning rate (1e-3+ leaves the degradation task at chance)
    seed: int = 0                           # seeds weights, batches and degradations (member i: seed + 1000 i)
    members: int = 3                        # networks averaged (1 = one network, whose draw moves fd_ratio ~2x)
    mirror: bool = True                     # show each training slice mirrored left-right half the time:
                                            # failures land further from clean slices (docs/METRICS.md)

    def __post_init__(self) -> None:
        for name in ("input_size", "feature_dim", "steps", "batch_size", "members"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"FeatureNetConfig.{name}={getattr(self, name)!r} must be >= 1")
        if not self.channels or any(int(c) < 1 for c in self.channels):
            raise ValueError(f"FeatureNetConfig.channels={self.channels!r} must be a non-empty tuple of ints >= 1")
        if self.input_size % 2 ** len(self.channels) or self.input_size // 2 ** len(self.channels) < 2:
            raise ValueError(
                f"FeatureNetConfig.input_size={self.input_size!r} must be a multiple of 2**len(channels)="
                f"{2 ** len(self.channels)} and leave at least 2 px after the last stage")
        if not self.lr > 0:
            raise ValueError(f"FeatureNetConfig.lr={self.lr!r} must be > 0")
        if not self.detector_weight >= 0:
            raise ValueError(f"FeatureNetConfig.detector_weight={self.detector_weight!r} must be >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureNetConfig":
        """Build from a plain dict (e.g. file metadata), refusing unknown keys by name."""
        return config_from_dict(cls, data)


def default_config(members: int | None = None) -> FeatureNetConfig:
    """`FeatureNetConfig()`, with `steps` from the environment variable `MRIGEN_FEATURE_NET_STEPS` and `members`
    from `MRIGEN_FEATURE_NET_MEMBERS` when they are set (fewer steps train faster and see failures less well, one
    member is one network's draw: docs/METRICS.md; the test suite uses 600 steps and 1 member).

    Args:
        members: networks in the ensemble; None = the variable's value, else `FeatureNetConfig.members`.

    Raises:
        ValueError: if a variable is set but is not an integer >= 1.
    """
    changes = {name: _env_int(var, what) for name, var, what in (
        ("steps", STEPS_ENV, "feature network training steps"),
        ("members", MEMBERS_ENV, "feature networks in the ensemble"))
        if os.environ.get(var, "").strip()}
    if members is not None:
        changes["members"] = members
    return FeatureNetConfig(**changes)


def _env_int(var: str, what: str) -> int:
    raw = os.environ[var].strip()
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{var}={raw!r} must be an integer >= 1 ({what})")
    return value


def train_halves(slices: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the train split's rows by subject: (rows the feature net trains on, rows of the real baseline).

    Subjects are ranked by the SHA-256 of their name (stable, and unrelated to site or ID order); even ranks
    train the feature network, odd ranks give the real baseline of `evaluate`. A feature network places the
    slices it was trained on apart from unseen ones (measured on the demo store: FD to the held-out split 0.12
    for seen vs 0.04 for unseen train subjects), so the baseline must come from subjects it never saw, like
    the samples and the held-out reference. With fewer than two subjects (or no `subject` key) both halves are
    every row, and the baseline is biased.

    Args:
        slices: `store.slices("train")`, one dict per image row.

    Returns:
        (feature_rows, baseline_rows): sorted `(n_a,)`, `(n_b,)` int64 row indices.
    """
    subjects = [str(row.get("subject", "")) for row in slices]
    names = sorted(set(subjects), key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    if len(names) < 2 or "" in names:
        log.warning("train split has %d subject(s): the feature net and the real baseline share every slice "
                    "(the baseline looks worse than it should, so fd_ratio flatters the model)", len(names))
        every = torch.arange(len(slices))
        return every, every
    rank = {name: i for i, name in enumerate(names)}
    half = torch.tensor([rank[s] % 2 for s in subjects])
    return (half == 0).nonzero().flatten(), (half == 1).nonzero().flatten()


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """`(B, 1, H, W)` -> `(B, 1, size, size)` float32 (bilinear, antialiased when shrinking)."""
    x = x.float()
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class FeatureBranch(nn.Module):
    """One feature network: conv trunk, dense embedding, degradation head. Input `(B, 1, s, s)` prepared by
    `prepare` (s = cfg.input_size, centred at 0); `forward` gives the raw `(B, feature_dim)` embedding.

    Args:
        cfg: architecture (input_size, channels, feature_dim).
    """

    def __init__(self, cfg: FeatureNetConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in cfg.channels:          # each stage: (B, c_in, s, s) -> (B, c_out, s/2, s/2)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(min(8, c_out), c_out),
                       nn.LeakyReLU(0.2)]
            c_in = c_out
        self.trunk = nn.Sequential(*layers)
        side = cfg.input_size // 2 ** len(cfg.channels)
        self.embed = nn.Linear(c_in * side * side, cfg.feature_dim)   # flatten keeps the anatomical layout
        self.detector = nn.Linear(cfg.feature_dim, len(DEGRADATIONS))  # degradation logits from the embedding

    def degradation_logits(self, h: torch.Tensor) -> torch.Tensor:
        """`(B, feature_dim)` raw embedding -> `(B, len(DEGRADATIONS))` logits (index = `DEGRADATIONS` entry)."""
        return self.detector(F.leaky_relu(h, 0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw penultimate activations: prepared `(B, 1, s, s)` -> `(B, feature_dim)`."""
        return self.embed(self.trunk(x).flatten(1))     # (B, C, s', s') -> (B, C*s'*s') -> (B, feature_dim)


def prepare(x: torch.Tensor, size: int) -> torch.Tensor:
    """`(B, 1, H, W)` in [0, 1] -> `(B, 1, size, size)` centred at 0: what a `FeatureBranch` takes."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"FeatureNet input must be (B, 1, H, W); got shape {tuple(x.shape)}")
    return resize_square(x, size) - 0.5


class FeatureNet(nn.Module):
    """`cfg.members` feature networks (`FeatureBranch`), each trained alone with its own seed; `features(x)` gives
    `(B, members * (feature_dim + n_deg))` vectors: per member, the unit-norm embedding then `detector_weight`
    times the degradation probabilities, all scaled by 1/sqrt(members) (a squared distance between two feature
    vectors is then the mean of the members' squared distances).

    Args:
        cfg: architecture (input_size, channels, feature_dim, members).
    """

    def __init__(self, cfg: FeatureNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(FeatureBranch(cfg) for _ in range(cfg.members))

    @property
    def member_dim(self) -> int:
        """Width of one member's part of `features(x)`: its embedding, then one probability per degradation."""
        return self.cfg.feature_dim + len(DEGRADATIONS)

    @property
    def out_dim(self) -> int:
        """Width of `features(x)`."""
        return len(self.members) * self.member_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, 1, H, W)` in [0, 1] -> `(B, out_dim)` (every row's norm lies in [1, sqrt(1 + detector_weight**2)])."""
        x = prepare(x, self.cfg.input_size)
        parts = []
        for member in self.members:
            h = member(x)                                                    # (B, feature_dim)
            probs = member.degradation_logits(h).softmax(1)                  # (B, n_deg)
            parts += [F.normalize(h, dim=1), self.cfg.detector_weight * probs]
        return torch.cat(parts, 1) / len(self.members) ** 0.5

    def embedding(self, feats: torch.Tensor) -> torch.Tensor:
        """The embedding columns of `features(x)` output: `(N, out_dim)` -> `(N, members * feature_dim)`, rows of
        norm 1 (precision / recall use these: docs/METRICS.md says why not the probabilities)."""
        parts = feats.unflatten(1, (len(self.members), self.member_dim))[:, :, :self.cfg.feature_dim]
        return parts.flatten(1)


@torch.no_grad()
def extract_features(net: FeatureNet, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Features of many images, batched, in eval mode (the net's previous mode is restored).

    Args:
        net: the feature network, on the images' device.
        images: `(N, 1, H, W)` in [0, 1].
        batch_size: images per forward pass.

    Returns:
        `(N, net.out_dim)` float32 on the images' device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    was_training = net.training
    net.eval()
    try:
        return torch.cat([net.features(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])
    finally:
        net.train(was_training)


def cache_path(store: StoreLike, members: int | None = None) -> Path:
    """Where the feature network of `store` with `members` networks (None: `default_config()`'s) is cached:
    `STORE/feature_net-v<format>-<digest[:12]>-<members>nets.safetensors`.

    The format version is in the name, so a cache written by an older mrigen is ignored (and a new one trained)
    rather than refused; the member count is too, so an evaluation asking for another count never reads it.
    """
    version = FORMAT.rsplit("/", 1)[1]
    members = default_config().members if members is None else members
    return Path(store.path) / f"feature_net-v{version}-{store.digest[:12]}-{members}nets.safetensors"


@torch.enable_grad()                 # callers such as evaluate() run under no_grad
def train_feature_net(store: StoreLike, cfg: FeatureNetConfig | None = None, *,
                      device: torch.device | str = "cpu", progress: bool = True) -> tuple[FeatureNet, dict[str, float]]:
    """Train the feature networks (`cfg.members`, one after the other, member i with seed `cfg.seed + 1000 i`) on
    the store's real train slices of the first `train_halves` half.

    Shows a tqdm bar per member (when stderr is a terminal and `progress`) and logs a one-line summary.

    On a CPU it trains on ONE thread (`CPU_THREADS`) whatever the process uses, and gives the threads back after:
    float sums split over 2 threads differ from 1 thread's (largest weight difference 3e-3 after 60 steps), and a
    network trained on another thread count is another metric (fd_ratio of one sample set moved 1.37 -> 1.80), so
    the network must not depend on the machine's core count, nor on whether it was trained in a background process
    (mrigen.metrics.background). One thread costs little here: 300 steps took 12.5 s against 10.7 s on two.

    Args:
        store: the slice store; uses `tensor("train", device)` and `slices("train")`.
        cfg: architecture and training settings (`default_config()` if None).
        device: where to train.
        progress: False never shows the bar (a background process: mrigen.metrics.background).

    Returns:
        (net in eval mode, summary of the last 10% of steps averaged over members: loss, pos_mae, site_acc,
        degradation_acc).
    """
    cfg = cfg or default_config()
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(CPU_THREADS)
    try:
        return _train(store, cfg, device, progress)
    finally:
        torch.set_num_threads(threads)


def _train(store: StoreLike, cfg: FeatureNetConfig, device: torch.device, progress: bool
           ) -> tuple[FeatureNet, dict[str, float]]:
    slices = store.slices("train")
    rows, _ = train_halves(slices)
    images = store.tensor("train", device)
    if images.shape[0] != len(slices):
        raise ValueError(f"store.slices('train') has {len(slices)} rows but the train tensor has "
                         f"{images.shape[0]} images")
    images = resize_square(images[rows.to(device)], cfg.input_size)           # (N, 1, s, s) in [0, 1]
    targets: AuxTargets = aux_targets([slices[i] for i in rows.tolist()], images.shape[0], device)
    masks = tuple(torch.cat(parts) for parts in zip(*(head_masks(images[i:i + 512])
                                                       for i in range(0, images.shape[0], 512))))
    torch_state = torch.random.get_rng_state()
    net = FeatureNet(cfg)
    tails = []
    for i in range(cfg.members):
        seed = cfg.seed + MEMBER_SEED_STRIDE * i
        torch.manual_seed(seed)                                # weight init, without touching caller's RNG
        member = FeatureBranch(cfg)
        heads = nn.Linear(cfg.feature_dim, 1 + targets.n_sites)   # position | site logits (store-specific)
        torch.random.set_rng_state(torch_state)
        desc = f"feature net {i + 1}/{cfg.members} ({store.digest[:12]})"
        tails += _train_member(member, heads, images, masks, targets, cfg, seed, device,
                               tqdm(range(cfg.steps), desc=desc, unit="step", leave=False,
                                    disable=None if progress else True))   # None: no bar without a terminal
        net.members[i] = member
    net.to(device).eval()
    summary = {k: sum(t[k] for t in tails) / len(tails) for k in tails[0]}
    log.info("feature nets (%d) trained on %d slices of store %s in %d steps each: loss %.3f, position MAE %.3f "
             "(band=1), site acc %.2f (%d sites), degradation acc %.2f", cfg.members, images.shape[0],
             store.digest[:12], cfg.steps, summary["loss"], summary["pos_mae"], summary["site_acc"], targets.n_sites,
             summary["degradation_acc"])
    return net, summary


def _train_member(net: FeatureBranch, heads: nn.Linear, images: torch.Tensor, masks: tuple[torch.Tensor, ...],
                  targets: AuxTargets, cfg: FeatureNetConfig, seed: int, device: torch.device, bar: tqdm
                  ) -> list[dict[str, float]]:
    """Train one member on the three tasks for `cfg.steps` steps (batches and degradations drawn from `seed`);
    returns the per-step statistics of the last 10% of steps."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_deg = len(DEGRADATIONS)
    net.to(device)
    heads.to(device)
    opt = torch.optim.Adam([*net.parameters(), *heads.parameters()], lr=cfg.lr)
    net.train()
    tail: list[dict[str, float]] = []
    for step in bar:
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen).to(device)
        x, batch_masks = images[idx], tuple(m[idx] for m in masks)             # (B, 1, H, W) each
        if cfg.mirror:                                      # head_masks of a mirrored slice = its masks mirrored
            flip = (torch.rand(cfg.batch_size, generator=gen) < 0.5).to(device)[:, None, None, None]
            x = torch.where(flip, x.flip(-1), x)
            batch_masks = tuple(torch.where(flip, m.flip(-1), m) for m in batch_masks)
        x, kind = degrade(x, gen, batch_masks)                 # (B, 1, H, W), (B,) into DEGRADATIONS
        h = net(prepare(x, cfg.input_size))                    # (B, feature_dim)
        out = torch.cat([heads(F.leaky_relu(h, 0.2)), net.degradation_logits(h)], 1)  # (B, 1 + n_sites + n_deg)
        pos_err = out[:, 0] - targets.pos[idx]
        loss_deg = F.cross_entropy(out[:, -n_deg:], kind)
        loss = loss_deg + (pos_err.pow(2).mean() if targets.has_pos else 0.0)
        if targets.n_sites > 1:
            loss = loss + F.cross_entropy(out[:, 1:1 + targets.n_sites], targets.site[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= cfg.steps - max(1, cfg.steps // 10):
            out, pos_err = out.detach(), pos_err.detach()
            site_acc = ((out[:, 1:1 + targets.n_sites].argmax(1) == targets.site[idx]).float().mean()
                        if targets.n_sites > 1 else torch.tensor(float("nan")))
            tail.append({"loss": loss.item(), "pos_mae": float(pos_err.abs().mean()), "site_acc": float(site_acc),
                         "degradation_acc": float((out[:, -n_deg:].argmax(1) == kind).float().mean())})
        if step % 25 == 0 or step == cfg.steps - 1:                # .item() syncs a GPU: not every step
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    net.eval()
    return tail


def save_feature_net(net: FeatureNet, path: Path | str, *, store_digest: str,
                     summary: dict[str, float] | None = None) -> Path:
    """Write `net` as safetensors with its config and the store digest in the metadata, atomically.

    The file is written to a temporary name in the same folder and renamed over `path`, so a reader (or a
    second worker training the same store) never sees a half-written file.
    """
    path = Path(path)
    metadata = {"format": FORMAT, "store_digest": store_digest, "config": json.dumps(asdict(net.cfg)),
                "mrigen_version": __version__, "train_summary": json.dumps(summary or {})}
    save_weights_atomic(net, path, metadata)
    return path


def save_weights_atomic(module: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write `module`'s state dict (CPU, contiguous) and `metadata` as safetensors at `path` through a temporary
    sibling and a rename, so a reader never sees a half-written file."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_feature_net(path: Path | str, *, store_digest: str, device: torch.device | str = "cpu") -> FeatureNet:
    """Load a feature network file and check it belongs to the store with `store_digest`.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file is not safetensors, not an mrigen feature network, was trained on another store
            (digest mismatch), or its tensors do not match the architecture its config describes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature network weights {path} do not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"feature network weights {path} are not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path} is not an mrigen feature network (metadata format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    if meta.get("store_digest") != store_digest:
        raise ValueError(f"feature network {path} was trained on store digest {meta.get('store_digest')!r}, "
                         f"not on this store ({store_digest!r}); features would not be comparable")
    try:
        cfg = FeatureNetConfig.from_dict(json.loads(meta["config"]))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"feature network {path} has an unreadable config in its metadata: {exc}") from exc
    net = FeatureNet(cfg)
    state = load_file(str(path))
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        raise ValueError(f"feature network {path} does not match its config {asdict(cfg)}: tensor(s) "
                         + ", ".join(f"{k} file={got.get(k)} expected={expected.get(k)}" for k in diff[:5]))
    net.load_state_dict(state)
    return net.to(device).eval()


def get_feature_net(store: StoreLike, weights: Path | str | None = None, *, device: torch.device | str = "cpu",
                    config: FeatureNetConfig | None = None, members: int | None = None) -> FeatureNet:
    """The feature network of `store`: user weights, else the cached file, else train and cache it.

    Args:
        store: slice store (digest, path, tensor(), slices()).
        weights: a user-supplied feature network file; validated against the store digest and its shapes.
        device: where the returned net lives (and where a new one is trained).
        config: settings for a new network (None = `default_config(members)`). A cached file with the same member
            count is used whatever its other settings when `config` is None, and refused (not replaced) when `config`
            is given and differs from them.
        members: networks in the ensemble when `config` is None (None: `default_config()`'s); each count has its
            own cache file.

    Returns:
        FeatureNet in eval mode on `device`.
    """
    if weights is not None:
        net = load_feature_net(weights, store_digest=store.digest, device=device)
        if members is not None and net.cfg.members != members:
            raise ValueError(f"feature network {weights} has {net.cfg.members} member(s), not the {members} asked for")
        return net
    if config is not None and members is not None and members != config.members:
        raise ValueError(f"get_feature_net: members={members} contradicts config.members={config.members}")
    path = cache_path(store, config.members if config is not None else members)
    waiting = _PENDING.pop(path, None)
    if waiting is not None:                # being trained in a background process: let it finish and cache it
        waiting()
    if path.is_file():
        net = load_feature_net(path, store_digest=store.digest, device=device)
        if config is not None and net.cfg != config:
            changed = sorted(k for k, v in asdict(config).items() if asdict(net.cfg)[k] != v)
            raise ValueError(f"cached feature network {path} was made with other settings ({changed}); pass "
                             f"config={net.cfg} to use it, or delete the file to train a new one")
        return net
    net, summary = train_feature_net(store, config or default_config(members), device=device)
    try:
        save_feature_net(net, path, store_digest=store.digest, summary=summary)
    except OSError as exc:   # a read-only store still evaluates; the next call retrains (seeded: same weights)
        log.warning("could not cache the feature network at %s (%s); it will be retrained next time", path, exc)
    return net
