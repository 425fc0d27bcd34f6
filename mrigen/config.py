"""Shared by every config dataclass: building one from a plain dict (JSON, YAML, a manifest, file metadata)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["config_from_dict"]

T = TypeVar("T")


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """`cls(**data)` for a frozen config dataclass, refusing unknown keys by name; lists become tuples (JSON and
    YAML have no tuples). Field validation stays in the class's `__post_init__`.

    Raises:
        ValueError: "<Class>: unknown key(s) [...]; valid keys: [...]", or the class's own field errors.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
