"""Resumable checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory holds `state.safetensors` (model weights, optimiser tensors) and `state.json`
(epoch, history, configs, optimiser scalars). It is written to a temporary directory and renamed into place,
so a crash never leaves a half-written checkpoint. `CheckpointWriter` does the writing on a background thread
(safetensors releases the GIL while it writes) from a host copy of the state, so training, the final
evaluation and the model save go on while ~0.7 GB of thesis-VAE state reaches the disk.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "CheckpointWriter"]

_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the run being resumed."""


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], copy: bool = False) -> Any:
    """Replace every tensor in a nested dict/list by a reference into `tensors` (JSON-safe result).

    With `copy`, every tensor is copied to the host even when it is there already (a snapshot that later
    training steps cannot change)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu", copy=copy, memory_format=torch.contiguous_format)  # one copy at most
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_split(k, f"{prefix}.k{i}", tensors, copy), _split(v, f"{prefix}.{i}", tensors, copy)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, f"{prefix}.{i}", tensors, copy) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, f"{prefix}.{i}", tensors, copy) for i, v in enumerate(obj)]
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


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
              copy: bool) -> tuple[dict[str, torch.Tensor], str]:
    """Host tensors + the JSON document of a checkpoint (meta is serialised now, so later edits do not leak in)."""
    tensors: dict[str, torch.Tensor] = {}
    doc = {
        "format": _FORMAT,
        "meta": meta,
        "model": _split(model.state_dict(), "model", tensors, copy),
        "optimizer": _split(optimizer.state_dict(), "optim", tensors, copy),
    }
    return tensors, json.dumps(doc)


def save_checkpoint(directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any]) -> None:
    """Atomically write model + optimiser state and JSON metadata (epoch, history, configs) to `directory`."""
    _write(Path(directory), *_snapshot(model, optimizer, meta, copy=False))


class CheckpointWriter:
    """Writes checkpoints on one background thread, one at a time.

    `submit` takes a host copy of the state (the only part that holds up training) and returns; `wait` blocks
    until the last submitted checkpoint is on disk and re-raises the error of a failed write. A new `submit`
    first waits for the previous write. Call `wait` before relying on the checkpoint, and in a `finally`.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               meta: dict[str, Any]) -> None:
        """Snapshot `model` + `optimizer` + `meta` now and write them to `directory` in the background."""
        self.wait()
        tensors, text = _snapshot(model, optimizer, meta, copy=True)
        thread = threading.Thread(target=self._run, args=(Path(directory), tensors, text),
                                  name="mrigen-checkpoint")  # not a daemon: exit waits for the rename
        thread.start()
        self._thread = thread  # only once started: wait() may run from an interrupt at any point

    def _run(self, directory: Path, tensors: dict[str, torch.Tensor], text: str) -> None:
        try:
            _write(directory, tensors, text)
        except BaseException as exc:  # noqa: BLE001 -- handed to the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the last submitted checkpoint is written; raise `CheckpointError` if that write failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint failed ({type(error).__name__}: {error})") from error


def _write(directory: Path, tensors: dict[str, torch.Tensor], text: str) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(text)
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
