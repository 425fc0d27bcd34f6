"""Run-time device choice: CUDA when present, else CPU. No module-level device globals."""

from __future__ import annotations

import torch

__all__ = ["pick_device"]


def pick_device(requested: str = "auto") -> torch.device:
    """Return the device to run on.

    Args:
        requested: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".

    Raises:
        ValueError: if `requested` is not a valid device string or names CUDA when none is present.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ValueError(f"device={requested!r} is not a valid device (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={requested!r} asked for CUDA but no CUDA device is available")
    return device
