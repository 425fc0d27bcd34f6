"""Resumable checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory holds `state.safetensors` (model weights, optimiser tensors) and `state.json`
(epoch, history, configs, optimiser scalars). It is written to a temporary directory and renamed into place,
so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]

_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the run being resumed."""


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a reference into `tensors` (JSON-safe result)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_split(k, f"{prefix}.k{i}", tensors), _split(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix}")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__tuple__" in obj:
        return tuple(_join(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, dict) and "__dict__" in obj:
        return {_join(k, tensors): _join(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_checkpoint(directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any]) -> None:
    """Atomically write model + optimiser state and JSON metadata (epoch, history, configs) to `directory`."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    doc = {
        "format": _FORMAT,
        "meta": meta,
        "model": _split(model.state_dict(), "model", tensors),
        "optimizer": _split(optimizer.state_dict(), "optim", tensors),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(doc))
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(directory: Path, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load state written by `save_checkpoint` into `model` and `optimizer`; return the metadata dict."""
    directory = Path(directory)
    for name in ("state.json", "state.safetensors"):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: no {name}; cannot resume (start without --resume)")
    try:
        doc = json.loads((directory / "state.json").read_text())
        tensors = load_file(str(directory / "state.safetensors"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory}: unreadable checkpoint ({exc})") from exc
    if doc.get("format") != _FORMAT:
        raise CheckpointError(f"{directory}: checkpoint format {doc.get('format')!r}, expected {_FORMAT}")
    device = next(model.parameters()).device
    state = {k: v.to(device) for k, v in _join(doc["model"], tensors).items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: weights do not fit this model config ({exc})") from exc
    optimizer.load_state_dict(_join(doc["optimizer"], tensors))
    _match_param_layout(optimizer)
    return doc["meta"]


def _match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give per-parameter state (exp_avg...) its parameter's strides: safetensors stores tensors contiguous,
    but a channels_last model's conv weights are not, and CUDA's fused Adam refuses mismatched layouts."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
