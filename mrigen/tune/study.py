"""Study definitions: `experiments/<name>.yaml` parsed and validated into a `StudySpec`.

A study file holds only what differs from the defaults (base config deltas), the search space, the objective(s),
the pruner, the promotion rule, and two budgets: `budget` (GPU + real data) and `demo_budget` (the embedded CPU
default). The schema is documented in docs/TRACKING.md ("Study files").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mrigen.config import load_yaml
from mrigen.registry.rule import (DEFAULT_RULE, FINAL_ONLY_METRICS, PromotionRule, RuleError, is_baseline,
                                  is_sample_metric, is_utility_metric, known_direction, short_name)

__all__ = ["StudySpec", "ParamSpec", "Budget", "Objective", "PrunerSpec", "dotted_layer", "load_study", "list_studies",
           "experiments_dir", "StudyFileError"]

_TOP_KEYS = {"description", "family", "base", "search_space", "objective", "pruner", "promotion", "budget",
             "demo_budget", "utility"}
_PRUNERS = ("median", "percentile", "hyperband", "none")
SHOWN_SETTINGS = 3     # budget settings the run's header line lists (Budget.describe); the rest are counted


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

    def out_of_domain(self, value: Any) -> str | None:
        """Why `value` cannot be a value of this parameter (a sentence), or None when it can."""
        if self.type == "categorical":
            return None if value in self.choices else f"{value!r} is not one of the choices {list(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} must be a number"
        if self.type == "int" and value != int(value):
            return f"{value!r} must be an integer"
        if not float(self.low) <= value <= float(self.high):
            return f"{value!r} is outside [{self.low}, {self.high}]"
        return None


def dotted_layer(values: Iterable[tuple[str, Any]]) -> dict[str, dict[str, Any]]:
    """`[("model.width", 0.5), ("train.lr", 1e-3)]` -> `{"model": {"width": 0.5}, "train": {"lr": 1e-3}}`: a config
    layer for `build_configs` (names are `model.` / `train.` fields, checked where the study file is read)."""
    out: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for name, value in values:
        section, _, field_name = name.partition(".")
        out[section][field_name] = value
    return out


@dataclass(frozen=True)
class Budget:
    """How much one study run does."""

    trials: int                            # trials in the study (all workers together)
    epochs: int                            # epochs per trial
    image_size: int                        # slice size the trials train on (and the store is ingested at)
    overrides: tuple[tuple[str, Any], ...] = ()   # ("model.width", 0.5), ...: config fields this budget sets
                                                  # over `base` (a search-space parameter still wins)
    first: tuple[tuple[str, Any], ...] = ()       # ("train.lr", 1.5e-3), ...: search-space values of the study's
                                                  # first trial (a known-good start; the sampler draws the rest)
    pruner: tuple[tuple[str, Any], ...] = ()      # ("n_startup_trials", 1), ...: options of the study's pruner that
                                                  # this budget changes (a 2-trial preview cannot wait for 4 trials)

    def layer(self) -> dict[str, dict[str, Any]]:
        """`{model: {...}, train: {...}}`: image_size, epochs and the overrides, as a config layer."""
        out = dotted_layer(self.overrides)
        out["model"]["image_size"], out["train"]["epochs"] = self.image_size, self.epochs
        return out

    def first_layer(self) -> dict[str, dict[str, Any]]:
        """The `first` values as a config layer (over `layer()`, as a trial's parameters are)."""
        return dotted_layer(self.first)

    def describe(self) -> str:
        """"3 trials x 3 epochs at 64px (model.width=0.5)": for the run's header line; past `SHOWN_SETTINGS`
        settings, the rest are counted ("..., 10 more settings in the study file"), not listed."""
        shown = [f"{k}={v}" for k, v in self.overrides[:SHOWN_SETTINGS]]
        hidden = len(self.overrides) - len(shown)
        extra = ", ".join(shown + ([f"{hidden} more setting{'s' * (hidden > 1)} in the study file"] if hidden else []))
        return f"{self.trials} trials x {self.epochs} epochs at {self.image_size}px" + (f" ({extra})" if extra else "")


@dataclass(frozen=True)
class Objective:
    """One thing the study optimises: a validation metric and its direction."""

    metric: str                            # val_<name>: per-epoch (val_ssim) or final-evaluation (val_fd_ratio)
    direction: str                         # "maximize" | "minimize"

    @property
    def greater_is_better(self) -> bool:
        return self.direction == "maximize"

    @property
    def final_only(self) -> bool:
        """True when only the final evaluation (or the trial's utility run) produces it: no per-epoch value to
        prune on."""
        return short_name(self.metric) in FINAL_ONLY_METRICS or is_utility_metric(self.metric)


@dataclass(frozen=True)
class PrunerSpec:
    """How trials are pruned: an Optuna pruner fed one per-epoch metric."""

    type: str = "median"                   # "median" | "percentile" | "hyperband" | "none"
    metric: str = "val_ssim"               # per-epoch metric reported to the pruner each epoch
    direction: str = "maximize"            # which way `metric` is better (reported negated if the study's differs)
    options: dict[str, Any] = field(default_factory=dict)   # keyword arguments of the Optuna pruner

    def build(self, budget_options: tuple[tuple[str, Any], ...] = ()) -> "optuna.pruners.BasePruner":
        """The Optuna pruner, its `options` updated by a budget's `pruner` options.

        Raises:
            TypeError / ValueError: from Optuna, for an option the pruner does not take or a bad value.
        """
        import optuna

        builders = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
                    "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}
        return builders[self.type](**{**self.options, **dict(budget_options)})


@dataclass(frozen=True)
class StudySpec:
    """A validated study definition."""

    name: str
    path: Path
    description: str
    family: str                                            # "vae" | "vqvae"
    base: dict[str, dict[str, Any]]                        # {"model": {...}, "train": {...}} deltas
    space: tuple[ParamSpec, ...]
    objectives: tuple[Objective, ...]                      # one, or several (Optuna multi-objective)
    pruner: PrunerSpec = PrunerSpec()
    promotion: PromotionRule = DEFAULT_RULE                # which trial's model becomes `champion`
    budget: Budget = Budget(20, 30, 128)
    demo_budget: Budget = Budget(3, 2, 32)
    utility: Any = None                                    # UtilityConfig: each trial's augmentation utility, or None

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def metric(self) -> str:
        """The first objective's metric (the only one of a single-objective study)."""
        return self.objectives[0].metric

    @property
    def direction(self) -> str:
        return self.objectives[0].direction

    @property
    def greater_is_better(self) -> bool:
        return self.objectives[0].greater_is_better

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(o.metric for o in self.objectives)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]


def list_studies(directory: Path | None = None) -> list[str]:
    """Names of the study files in `experiments/`."""
    d = directory or experiments_dir()
    return sorted(p.stem for p in d.glob("*.yaml"))


def _fail(path: Path, key: str, msg: str) -> StudyFileError:
    return StudyFileError(f"{path}: {key}: {msg}")


def _budget(path: Path, key: str, raw: Any, default: Budget, valid: dict[str, set[str]],
            space: tuple[ParamSpec, ...], pruner: PrunerSpec) -> Budget:
    if raw is None:
        return default
    if not isinstance(raw, dict) or set(raw) - {"trials", "epochs", "image_size", "set", "first", "pruner"}:
        raise _fail(path, key, "expected a mapping with trials, epochs, image_size and optional 'set', 'first' and "
                               "'pruner'")
    pruner_options = raw.get("pruner") or {}
    if not isinstance(pruner_options, dict) or set(pruner_options) & {"type", "metric", "direction"}:
        raise _fail(path, f"{key}.pruner", "expected a mapping of the study pruner's options, e.g. "
                                           "{n_startup_trials: 1} (its type and metric are the study's)")
    if pruner_options and pruner.type == "none":
        raise _fail(path, f"{key}.pruner", "the study does not prune (pruner: {type: none})")
    try:
        pruner.build(tuple(pruner_options.items()))
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"{key}.pruner", f"bad options {pruner_options} for the {pruner.type} pruner "
                                           f"({exc})") from None
    sets = raw.get("set") or {}
    if not isinstance(sets, dict):
        raise _fail(path, f"{key}.set", "expected a mapping of config fields, e.g. {model.width: 0.5}")
    for name in sets:
        section, _, fname = str(name).partition(".")
        if section not in valid or fname not in valid[section] or fname in ("image_size", "epochs"):
            raise _fail(path, f"{key}.set.{name}", "not a config field this budget may set; use model.<field> or "
                                                   "train.<field> (image_size and epochs are budget keys)")
    first = raw.get("first") or {}
    if not isinstance(first, dict):
        raise _fail(path, f"{key}.first", "expected a mapping of search-space values, e.g. {train.lr: 1.0e-3}")
    params = {p.name: p for p in space}
    for name, value in first.items():
        if name not in params:
            raise _fail(path, f"{key}.first.{name}", f"not a search_space parameter (the study searches "
                                                      f"{', '.join(params)})")
        problem = params[name].out_of_domain(value)
        if problem:
            raise _fail(path, f"{key}.first.{name}", problem)
    b = Budget(**{**default.__dict__, **{k: v for k, v in raw.items() if k not in ("set", "first", "pruner")},
                  "overrides": tuple((str(k), v) for k, v in sets.items()),
                  "first": tuple((str(k), v) for k, v in first.items()),
                  "pruner": tuple((str(k), v) for k, v in pruner_options.items())})
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


def _objective(path: Path, key: str, raw: Any) -> Objective:
    if not isinstance(raw, dict) or set(raw) - {"metric", "direction"}:
        raise _fail(path, key, "expected {metric: NAME, direction: maximize|minimize}")
    metric = raw.get("metric", "val_ssim")
    if not isinstance(metric, str) or not metric.startswith("val_"):
        raise _fail(path, f"{key}.metric", f"{metric!r} must be a validation metric (val_*)")
    if is_baseline(metric):
        raise _fail(path, f"{key}.metric", f"{metric!r} is a real-vs-real baseline; it does not depend on the model")
    known = known_direction(metric)
    direction = raw.get("direction", known)
    if direction is None:
        raise _fail(path, f"{key}.direction", f"{metric} has no better way that mrigen knows (it is read against "
                                              "its real baseline); state direction: maximize or minimize")
    if direction not in ("maximize", "minimize"):
        raise _fail(path, f"{key}.direction", f"{direction!r} must be maximize or minimize")
    if known not in (None, direction):
        raise _fail(path, f"{key}.direction", f"{direction!r} is the wrong way for {metric} (better is {known})")
    return Objective(metric, direction)


def _objectives(path: Path, raw: Any) -> tuple[Objective, ...]:
    """`objective: {metric, direction}` or a list of them (multi-objective)."""
    if raw is None:
        return (Objective("val_ssim", "maximize"),)
    if isinstance(raw, list):
        if not raw:
            raise _fail(path, "objective", "an objective list needs at least one {metric, direction}")
        out = tuple(_objective(path, f"objective[{i}]", r) for i, r in enumerate(raw))
        names = [o.metric for o in out]
        if len(set(names)) != len(names):
            raise _fail(path, "objective", f"metrics {names} repeat one another")
        return out
    return (_objective(path, "objective", raw),)


def _pruner(path: Path, raw: Any, objectives: tuple[Objective, ...]) -> PrunerSpec:
    """Per-epoch pruning; refused for multi-objective studies (Optuna prunes single-objective ones only)."""
    if raw is not None and not isinstance(raw, dict):
        raise _fail(path, "pruner", "expected a mapping such as {type: median, metric: val_ssim}")
    raw = dict(raw or {"type": "none" if len(objectives) > 1 else "median"})
    kind = raw.pop("type", "median")
    if kind not in _PRUNERS:
        raise _fail(path, "pruner.type", f"{kind!r} must be one of {_PRUNERS}")
    if len(objectives) > 1 and kind != "none":
        raise _fail(path, "pruner.type", f"{kind!r}: Optuna cannot prune a multi-objective study; "
                                         f"state pruner: {{type: none}}")
    first = objectives[0]
    metric = raw.pop("metric", "val_ssim" if first.final_only else first.metric)
    if not isinstance(metric, str) or not metric.startswith("val_"):
        raise _fail(path, "pruner.metric", f"{metric!r} must be a per-epoch validation metric (val_*)")
    if short_name(metric) in FINAL_ONLY_METRICS or is_baseline(metric):
        raise _fail(path, "pruner.metric", f"{metric!r} exists only after the final evaluation; pruning needs a "
                                           f"per-epoch metric such as val_ssim, val_psnr or val_loss")
    known = known_direction(metric)
    direction = raw.pop("direction", known if known else first.direction if metric == first.metric else None)
    if direction not in ("maximize", "minimize"):
        raise _fail(path, "pruner.direction", f"{direction!r}: state whether {metric} is better higher (maximize) "
                                              f"or lower (minimize)")
    if known not in (None, direction):
        raise _fail(path, "pruner.direction", f"{direction!r} is the wrong way for {metric} (better is {known})")
    spec = PrunerSpec(type=kind, metric=metric, direction=direction, options=raw)
    try:
        spec.build()
    except (TypeError, ValueError) as exc:
        raise _fail(path, "pruner", f"bad options {raw} for the {kind} pruner ({exc})") from None
    return spec


def _promotion(path: Path, raw: Any) -> PromotionRule:
    """The champion rule; it must look at sample quality through its metric or its `require` conditions."""
    if raw is None:
        return DEFAULT_RULE
    if not isinstance(raw, dict):
        raise _fail(path, "promotion", "expected {metric: NAME, direction: ..., require: {NAME: '>= VALUE'}}")
    try:
        rule = PromotionRule.parse(raw)
    except RuleError as exc:
        raise _fail(path, f"promotion.{exc.key}", exc.message) from None
    if not rule.looks_at_samples:
        raise _fail(path, "promotion.metric", f"{rule.metric!r} does not look at samples: rank on a sample metric "
                                              f"(val_fd_ratio, val_precision, val_recall, val_memorised, ...) or add "
                                              f"one to promotion.require")
    return rule


def _utility(path: Path, raw: Any, objectives: tuple[Objective, ...], promotion: PromotionRule):
    """The `utility:` section (UtilityConfig fields; scored on the val split unless told) and a check that every
    utility metric the objectives and promotion rule read is one it produces."""
    wanted = [m for m in (*(o.metric for o in objectives), *promotion.metrics) if is_utility_metric(m)]
    if raw is None:
        if wanted:
            raise _fail(path, "utility", f"missing, but {', '.join(dict.fromkeys(wanted))} come from a utility run "
                                         f"per trial: add utility: {{task: TASK, ...}} (docs/UTILITY.md)")
        return None
    if not isinstance(raw, dict):
        raise _fail(path, "utility", "expected a mapping of UtilityConfig fields, e.g. {task: site, seeds: 2}")
    from mrigen.utility import UtilityConfig

    try:
        cfg = UtilityConfig.from_dict({"eval_split": "val", **raw})
    except (ValueError, TypeError) as exc:
        raise _fail(path, "utility", str(exc)) from None
    produced = {f"utility_{cfg.task}_gain", f"utility_{cfg.task}_tstr_ratio"}
    bad = [m for m in wanted if short_name(m) not in produced]
    if bad:
        raise _fail(path, "utility", f"task {cfg.task!r} produces {', '.join(sorted('val_' + p for p in produced))},"
                                     f" not {', '.join(bad)}")
    return cfg


def _check_can_evaluate(path: Path, family: str, base: dict, objectives: tuple[Objective, ...],
                        promotion: PromotionRule) -> None:
    """Sample metrics need the final evaluation and a model that can sample (a VQ-VAE needs its prior)."""
    from mrigen.train.configs import build_configs

    needs = [m for m in (*(o.metric for o in objectives), *promotion.metrics)
             if short_name(m) in FINAL_ONLY_METRICS]
    if not needs:
        return
    _, train_cfg = build_configs(family, base)
    if not getattr(train_cfg, "final_eval", True):
        raise _fail(path, "base.train.final_eval", f"false, but {', '.join(dict.fromkeys(needs))} come only from "
                                                   f"the final evaluation")
    prior = getattr(train_cfg, "prior_steps", getattr(train_cfg, "prior_epochs", 1))
    if family == "vqvae" and any(is_sample_metric(m) for m in needs) and prior == 0:
        name = "prior_steps" if hasattr(train_cfg, "prior_steps") else "prior_epochs"
        raise _fail(path, f"base.train.{name}", "0 leaves the VQ-VAE without a code prior, so it cannot sample "
                                                 f"for {', '.join(dict.fromkeys(needs))}")


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
        doc = load_yaml(path.read_text())
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
    objectives = _objectives(path, doc.get("objective"))
    pruner = _pruner(path, doc.get("pruner"), objectives)
    promotion = _promotion(path, doc.get("promotion"))
    _check_can_evaluate(path, family, base, objectives, promotion)
    utility = _utility(path, doc.get("utility"), objectives, promotion)
    description = doc.get("description")
    if not isinstance(description, str) or not description.strip():
        raise _fail(path, "description", "a short description is required")
    budgets = {key: _budget(path, key, doc.get(key), default, valid, space, pruner)
               for key, default in (("budget", Budget(20, 30, 128)), ("demo_budget", Budget(3, 2, 32)))}
    for key, b in budgets.items():
        try:
            build_configs(family, base, b.layer())
        except (ValueError, TypeError) as exc:
            raise _fail(path, f"{key}.set" if b.overrides else key, str(exc)) from exc
        try:
            build_configs(family, base, b.layer(), b.first_layer())
        except (ValueError, TypeError) as exc:
            raise _fail(path, f"{key}.first", str(exc)) from exc
    return StudySpec(name=path.stem, path=path, description=description.strip(), family=family, base=base,
                     space=space, objectives=objectives, pruner=pruner, promotion=promotion,
                     budget=budgets["budget"], demo_budget=budgets["demo_budget"], utility=utility)
