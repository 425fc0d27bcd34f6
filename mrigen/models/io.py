"""Saved models: `model.safetensors` (weights and buffers) + `config.json` (ModelConfig, mrigen version).

Loading rebuilds the architecture from the config with this project's code and fills it from safetensors:
nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import mrigen
from mrigen.models.config import ModelConfig
from mrigen.models.registry import build_model

__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "WEIGHTS_FILE", "load_model", "read_config", "save_model"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1  # bump when the on-disk layout changes


def save_model(model: nn.Module, directory: str | Path) -> Path:
    """Write `directory/model.safetensors` and `directory/config.json` (creating the directory).

    Args:
        model: a model from `build_model` (it carries its ModelConfig as `model.config`).
        directory: target folder; existing files of the same names are replaced.

    Returns:
        The directory as a Path.
    """
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"save_model needs a model built by build_model (with a ModelConfig .config), "
                         f"got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # contiguous copies: channels_last weights are not contiguous, safetensors needs row-major storage
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format_version": FORMAT_VERSION, "mrigen_version": mrigen.__version__, "model": dataclasses.asdict(cfg)}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory


def read_config(directory: str | Path) -> ModelConfig:
    """Parse `directory/config.json` into a ModelConfig.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: it is not valid JSON, has an unsupported format version, or an invalid model config.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"saved model {directory}: missing {CONFIG_FILE}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"saved model {directory}: {CONFIG_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ValueError(f"saved model {directory}: {CONFIG_FILE} has no 'model' object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"saved model {directory}: format_version={version!r}, this mrigen reads {FORMAT_VERSION}")
    saved = dict(meta["model"])
    saved.setdefault("encoder_stem", "norm")    # saved before the field existed: the encoder started conv -> norm
    try:
        return ModelConfig.from_dict(saved)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"saved model {directory}: invalid model config in {CONFIG_FILE}: {exc}") from exc


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved model from its config and load its weights (safetensors only), in eval mode.

    Args:
        directory: folder written by `save_model`.
        device: where to put the model.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the config is invalid or the weights do not match the architecture it describes.
    """
    cfg = read_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"saved model {directory}: missing {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise ValueError(f"saved model {directory}: {WEIGHTS_FILE} is not a readable safetensors file ({exc})") from exc
    model = build_model(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"saved model {directory}: {WEIGHTS_FILE} does not match the architecture in {CONFIG_FILE} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]})"
        )
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()
