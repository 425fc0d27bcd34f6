"""Study definitions: `experiments/<name>.yaml` parsed and validated into a `StudySpec`.

A study file holds only what differs from the defaults (base config deltas), the search space, the objective,
the pruner, and two budgets: `budget` (GPU + real data) and `demo_budget` (the embedded CPU default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = ["StudySpec", "ParamSpec", "Budget", "load_study", "list_studies", "experiments_dir", "StudyFileError"]

_TOP_KEYS = {"description", "family", "base", "search_space", "objective", "pruner", "budget", "demo_budget"}
_PRUNERS = ("median", "percentile", "hyperband", "none")


class StudyFileError(ValueError):
    """A study file is missing or invalid; the message names the file and the key."""


def experiments_dir() -> Path:
    """The repository's `experiments/` folder (next to the package), or $MRIGEN_EXPERIMENTS."""
    import os

    env = os.environ.get("MRIGEN_EXPERIMENTS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "experiments"


@dataclass(frozen=True)
class ParamSpec:
    """One search-space dimension; `name` is dotted: `model.kernel_size`, `train.lr`."""

    name: str
    type: str                              # "categorical" | "int" | "float"
    choices: tuple = ()                    # categorical values (int, float, str or bool)
    low: float | None = None               # int/float lower bound (inclusive)
    high: float | None = None              # int/float upper bound (inclusive)
    log: bool = False                      # sample on a log scale
    step: float | None = None              # int/float step (not with log)

    def suggest(self, trial) -> Any:
        """Draw this parameter from an Optuna trial."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log, step=self.step)


@dataclass(frozen=True)
class Budget:
    """How much one study run does."""

    trials: int                            # trials in the study (all workers together)
    epochs: int                            # epochs per trial
    image_size: int                        # slice size the trials train on (and the store is ingested at)


@dataclass(frozen=True)
class StudySpec:
    """A validated study definition."""

    name: str
    path: Path
    description: str
    family: str                                            # "vae" | "vqvae"
    base: dict[str, dict[str, Any]]                        # {"model": {...}, "train": {...}} deltas
    space: tuple[ParamSpec, ...]
    metric: str                                            # objective: a validation metric name, e.g. val_ssim
    direction: str                                         # "maximize" | "minimize"
    pruner: dict[str, Any] = field(default_factory=dict)   # {"type": "median", ...optuna pruner kwargs}
    budget: Budget = Budget(20, 30, 128)
    demo_budget: Budget = Budget(3, 2, 32)

    @property
    def greater_is_better(self) -> bool:
        return self.direction == "maximize"


def list_studies(directory: Path | None = None) -> list[str]:
    """Names of the study files in `experiments/`."""
    d = directory or experiments_dir()
    return sorted(p.stem for p in d.glob("*.yaml"))


def _fail(path: Path, key: str, msg: str) -> StudyFileError:
    return StudyFileError(f"{path}: {key}: {msg}")


def _budget(path: Path, key: str, raw: Any, default: Budget) -> Budget:
    if raw is None:
        return default
    if not isinstance(raw, dict) or set(raw) - {"trials", "epochs", "image_size"}:
        raise _fail(path, key, "expected a mapping with trials, epochs, image_size")
    b = Budget(**{**default.__dict__, **raw})
    for name in ("trials", "epochs"):
        v = getattr(b, name)
        if not isinstance(v, int) or v < 1:
            raise _fail(path, f"{key}.{name}", f"{v!r} must be an integer >= 1")
    if b.image_size not in (16, 32, 64, 128, 256):
        raise _fail(path, f"{key}.image_size", f"{b.image_size!r} must be one of 16, 32, 64, 128, 256")
    return b


def _param(path: Path, name: str, raw: Any, valid: dict[str, set[str]]) -> ParamSpec:
    key = f"search_space.{name}"
    section, _, fname = name.partition(".")
    if section not in valid or fname not in valid[section]:
        raise _fail(path, key, f"not a config field; use model.<field> or train.<field> "
                               f"(model fields: {sorted(valid['model'])}; train fields: {sorted(valid['train'])})")
    if not isinstance(raw, dict):
        raise _fail(path, key, "expected a mapping with 'type'")
    allowed = {"type", "choices", "low", "high", "log", "step"}
    extra = set(raw) - allowed
    if extra:
        raise _fail(path, key, f"unknown key(s) {sorted(extra)}; allowed: {sorted(allowed)}")
    kind = raw.get("type")
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _fail(path, key, "categorical needs a non-empty 'choices' list")
        if any(not isinstance(c, (int, float, str, bool)) for c in choices):
            raise _fail(path, key, "choices must be numbers, strings or booleans")
        return ParamSpec(name, "categorical", choices=tuple(choices))
    if kind in ("int", "float"):
        low, high, log, step = raw.get("low"), raw.get("high"), bool(raw.get("log", False)), raw.get("step")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high)):
            raise _fail(path, key, f"{kind} needs numeric 'low' and 'high'")
        if low >= high:
            raise _fail(path, key, f"low={low} must be < high={high}")
        if log and low <= 0:
            raise _fail(path, key, f"log scale needs low > 0 (got {low})")
        if log and step is not None:
            raise _fail(path, key, "'step' cannot be combined with log=true")
        return ParamSpec(name, kind, low=low, high=high, log=log, step=step)
    raise _fail(path, key, f"type={kind!r} must be one of categorical, int, float")


def load_study(name_or_path: str | Path, directory: Path | None = None) -> StudySpec:
    """Load and validate a study by name (`experiments/<name>.yaml`) or by path.

    Raises:
        StudyFileError: unknown study name (listing the valid ones), unreadable YAML, unknown keys, bad ranges,
            or base deltas that do not make a valid config.
    """
    from mrigen.models import ModelConfig
    from mrigen.train.config import TrainConfig
    from mrigen.train.configs import build_configs

    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        path = candidate
    else:
        path = (directory or experiments_dir()) / f"{name_or_path}.yaml"
        if not path.is_file():
            raise StudyFileError(f"unknown study {str(name_or_path)!r}; known studies: "
                                 f"{', '.join(list_studies(directory)) or '(none)'} (in {path.parent})")
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise StudyFileError(f"{path}: cannot read study file ({exc})") from exc
    if not isinstance(doc, dict):
        raise StudyFileError(f"{path}: a study file is a mapping of {sorted(_TOP_KEYS)}")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise _fail(path, ",".join(sorted(unknown)), f"unknown key(s); allowed: {sorted(_TOP_KEYS)}")
    family = doc.get("family")
    if family not in ("vae", "vqvae"):
        raise _fail(path, "family", f"{family!r} must be 'vae' or 'vqvae'")
    base = doc.get("base") or {}
    if not isinstance(base, dict) or set(base) - {"model", "train"}:
        raise _fail(path, "base", "expected a mapping with optional 'model' and 'train' sections")
    base = {"model": dict(base.get("model") or {}), "train": dict(base.get("train") or {})}
    try:
        build_configs(family, base)
    except (ValueError, TypeError) as exc:
        raise _fail(path, "base", str(exc)) from exc
    valid = {"model": {f.name for f in fields(ModelConfig)} - {"family"},
             "train": {f.name for f in fields(TrainConfig)}}
    raw_space = doc.get("search_space")
    if not isinstance(raw_space, dict) or not raw_space:
        raise _fail(path, "search_space", "a study needs a non-empty search_space mapping")
    space = tuple(_param(path, name, raw, valid) for name, raw in raw_space.items())
    objective = doc.get("objective") or {}
    if not isinstance(objective, dict) or set(objective) - {"metric", "direction"}:
        raise _fail(path, "objective", "expected {metric: NAME, direction: maximize|minimize}")
    metric = objective.get("metric", "val_ssim")
    direction = objective.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise _fail(path, "objective.direction", f"{direction!r} must be maximize or minimize")
    if not isinstance(metric, str) or not metric.startswith("val_"):
        raise _fail(path, "objective.metric", f"{metric!r} must be a per-epoch validation metric (val_*)")
    pruner = dict(doc.get("pruner") or {"type": "median"})
    if pruner.get("type") not in _PRUNERS:
        raise _fail(path, "pruner.type", f"{pruner.get('type')!r} must be one of {_PRUNERS}")
    description = doc.get("description")
    if not isinstance(description, str) or not description.strip():
        raise _fail(path, "description", "a short description is required")
    return StudySpec(name=path.stem, path=path, description=description.strip(), family=family, base=base,
                     space=space, metric=metric, direction=direction, pruner=pruner,
                     budget=_budget(path, "budget", doc.get("budget"), Budget(20, 30, 128)),
                     demo_budget=_budget(path, "demo_budget", doc.get("demo_budget"), Budget(3, 2, 32)))
