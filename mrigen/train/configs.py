"""Turning files and `--set key=value` overrides into (ModelConfig, TrainConfig): shared by train and tune."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from mrigen.config import load_yaml
from mrigen.models import ModelConfig
from mrigen.train.config import TrainConfig

__all__ = ["build_configs", "load_config_file", "parse_overrides", "SECTIONS"]

SECTIONS = ("model", "train")


def load_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """Read a YAML run config `{model: {...}, train: {...}}`; errors name the file and the bad key."""
    path = Path(path)
    try:
        doc = load_yaml(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read run config ({exc})") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a run config is a mapping with sections {SECTIONS}")
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; valid sections: {list(SECTIONS)}")
    for section, body in doc.items():
        if not isinstance(body, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping")
    return {s: dict(doc.get(s) or {}) for s in SECTIONS}


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """Parse `["model.kernel_size=3", "train.lr=1e-4"]` (values read as YAML scalars/lists)."""
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in SECTIONS or not name:
            raise ValueError(f"--set {item!r}: expected SECTION.FIELD=VALUE with SECTION in {list(SECTIONS)}")
        try:
            out[section][name] = load_yaml(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {item!r}: the value is not a YAML scalar or list "
                             f"({str(exc).splitlines()[0]})") from exc
    return out


def build_configs(family: str | None, *layers: dict[str, dict[str, Any]]) -> tuple[ModelConfig, TrainConfig]:
    """Merge layers of `{model: {...}, train: {...}}` deltas (later wins) over the defaults and validate.

    Args:
        family: "vae" / "vqvae" (overrides any `model.family` in the layers), or None to keep the layers'.
    """
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for layer in layers:
        for section in SECTIONS:
            merged[section].update(layer.get(section, {}))
    if family is not None:
        merged["model"]["family"] = family
    if merged["model"].get("family") == "vqvae":          # a VQ-VAE quantizes a grid: spatial latent by default
        merged["model"].setdefault("latent", "spatial")
    model_cfg = ModelConfig.from_dict({**asdict(ModelConfig()), **merged["model"]})
    train_cfg = TrainConfig.from_dict({**asdict(TrainConfig()), **merged["train"]})
    return model_cfg, train_cfg
