"""Shared by every config dataclass: building one from a plain dict (JSON, YAML, a manifest, file metadata), and
reading the YAML that people write (`--set train.lr=1e-4`, run configs, study files)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import yaml

__all__ = ["config_from_dict", "load_yaml"]

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading floats the YAML 1.2 way: `1e-4` and `2E3` are numbers, not strings (YAML 1.1,
    which PyYAML follows, wants a dot: `1.0e-4`)."""


_Loader.add_implicit_resolver(                    # copies the inherited table first: SafeLoader is untouched
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, except that `1e-4` is the float 0.0001 (YAML 1.2), as anyone writing a learning rate means.

    Raises:
        yaml.YAMLError: on malformed YAML.
    """
    loader = _Loader(text)                  # what yaml.safe_load does, with the float rule above
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _numeric(hint: Any) -> type | None:
    """int or float when a field's type hint is one of them (or it or None), else None."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [o for o in options if o is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (int, float) else None


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """`cls(**data)` for a frozen config dataclass, refusing unknown keys by name; lists become tuples (JSON and
    YAML have no tuples). Field validation stays in the class's `__post_init__`.

    Raises:
        ValueError: "<Class>: unknown key(s) [...]; valid keys: [...]", "<Class>.<field>='fast' must be a number"
            (a text value in an int or float field), or the class's own field errors.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        kind = _numeric(hints.get(name))
        if kind is not None and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{cls.__name__}.{name}={value!r} must be {'an integer' if kind is int else 'a number'}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
