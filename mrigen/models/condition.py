"""Conditioning on per-slice attributes: which ones exist, how rows become tensors, and the learned embedding.

The attributes are the store's per-slice columns (`mrigen.data.store.SLICE_COLUMNS`):

    slice_pos  continuous, position in the axial band, 0 (bottom) .. 1 (top)
    age        continuous, years (IXI: missing for some subjects)
    site       categorical, one of IXI's sites (Guys, HH, IOP)
    sex        categorical, "F" or "M" (IXI: missing for some subjects)

Encoded attributes are one float tensor `(N, A)` with a column per attribute in `ModelConfig.conditions` order:
a continuous value as is, a categorical value as its level index, and a missing value as NaN. NaN is never fed
to a layer: `ConditionEmbedding` replaces it with a learned "unknown" vector per attribute (training also drops
known values to unknown at random, `TrainConfig.condition_dropout`, so that vector means "any value").

Default sampling ("match the real distribution") draws whole rows from a bank of the training rows kept in the
model's weights, so the joint distribution of the attributes (e.g. site x age) is the training set's.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = ["ATTRIBUTES", "BANK_ROWS", "SITES", "ConditionEmbedding", "ConditionRequest", "check_names",
           "decode_rows", "encode_rows", "hide_for_guidance", "parse_condition"]

SITES = ("Guys", "HH", "IOP")  # IXI's sites; equal to mrigen.data.ixi.SITES (tested), not imported: models stay
                               # importable without the data stack
# name -> levels (categorical) or None (continuous)
ATTRIBUTES: dict[str, tuple[str, ...] | None] = {"slice_pos": None, "age": None, "site": SITES, "sex": ("F", "M")}
_SCALE = {"slice_pos": (0.5, 0.5), "age": (50.0, 20.0)}  # (centre, half-range): continuous inputs to about [-1, 1]
_FOURIER = 4  # sin/cos frequencies per continuous attribute (a smooth response to position, not only linear)
BANK_ROWS = 4096  # training rows kept for default sampling (a random subset when the training set is larger)


def check_names(names: Sequence[str]) -> None:
    """Raise ValueError unless `names` are distinct known attributes."""
    unknown = [n for n in names if n not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"conditions={tuple(names)!r}: unknown attribute(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(ATTRIBUTES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"conditions={tuple(names)!r} lists an attribute twice")


def _encode_value(name: str, value: Any, where: str) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    levels = ATTRIBUTES[name]
    if levels is not None:
        if str(value) not in levels:
            raise ValueError(f"{where}: {name}={value!r} is not a known level ({', '.join(levels)})")
        return float(levels.index(str(value)))
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name}={value!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{where}: {name}={value!r} is not finite")
    return v


def encode_rows(names: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """Store-style rows (dicts with the attribute keys; None = missing) -> `(N, len(names))` float32, NaN = missing.

    Raises:
        ValueError: naming the row and value for an unknown level, a non-number, or a missing key.
    """
    check_names(names)
    out = torch.empty(len(rows), len(names), dtype=torch.float32)
    for i, row in enumerate(rows):
        for j, name in enumerate(names):
            if name not in row:
                raise ValueError(f"condition row {i} has no {name!r} value (row keys: {', '.join(row)})")
            out[i, j] = _encode_value(name, row[name], f"condition row {i}")
    return out


def decode_rows(names: Sequence[str], attrs: torch.Tensor) -> list[dict[str, Any]]:
    """Inverse of `encode_rows`: `(N, A)` -> rows with level names, rounded numbers and None for missing."""
    rows = []
    for values in attrs.detach().cpu().tolist():
        row: dict[str, Any] = {}
        for name, v in zip(names, values):
            levels = ATTRIBUTES[name]
            if math.isnan(v):
                row[name] = None
            elif levels is not None:
                row[name] = levels[int(round(v))]
            else:
                row[name] = round(v, 4)
        rows.append(row)
    return rows


def hide_for_guidance(names: Sequence[str], attrs: torch.Tensor, guidance_on: Sequence[str]) -> torch.Tensor:
    """The "hidden" rows of classifier-free guidance: `attrs` `(n, A)` with the `guidance_on` attributes (all of
    `names` when empty) set to unknown (NaN), a copy.

    Raises:
        ValueError: `guidance_on` names an attribute not in `names` (naming the ones the model knows).
    """
    stray = [a for a in guidance_on if a not in names]
    if stray:
        raise ValueError(f"guidance_on names {stray}, which this prior is not conditioned on; it knows {list(names)}")
    hidden = attrs.clone()
    hidden[:, [list(names).index(a) for a in (guidance_on or names)]] = float("nan")
    return hidden


class ConditionRequest:
    """What a user asks `generate` for, per attribute: a fixed value, a uniform range `LO:HI` (continuous), or
    nothing (drawn with the other unspecified attributes from the training rows).

    Args:
        names: the model's conditioning attributes.
        spec: attribute -> value (str / number) or (lo, hi) tuple.

    Raises:
        ValueError: an attribute the model was not trained on (naming the ones it knows), a bad level, or a range
            on a categorical attribute / with lo > hi.
    """

    def __init__(self, names: Sequence[str], spec: Mapping[str, Any]) -> None:
        self.names = tuple(names)
        self.fixed: dict[int, float] = {}
        self.ranges: dict[int, tuple[float, float]] = {}
        for name, value in spec.items():
            if name not in self.names:
                known = ", ".join(self.names) if self.names else "none (the model is unconditional)"
                raise ValueError(f"--condition {name}: the model was not trained on {name!r}; it knows: {known}")
            j = self.names.index(name)
            if isinstance(value, tuple):
                if ATTRIBUTES[name] is not None:
                    raise ValueError(f"--condition {name}={value[0]}:{value[1]}: a range needs a continuous "
                                     f"attribute; {name} takes one of {', '.join(ATTRIBUTES[name])}")
                lo, hi = (_encode_value(name, v, f"--condition {name}") for v in value)
                if not lo <= hi:
                    raise ValueError(f"--condition {name}={value[0]}:{value[1]}: the range is empty (lo > hi)")
                self.ranges[j] = (lo, hi)
            else:
                v = _encode_value(name, value, f"--condition {name}")
                if math.isnan(v):
                    raise ValueError(f"--condition {name}: give a value")
                self.fixed[j] = v

    def as_dict(self) -> dict[str, Any]:
        """The request as JSON-able settings: {name: value | [lo, hi]} (level names for categorical)."""
        out: dict[str, Any] = {}
        for j, v in self.fixed.items():
            levels = ATTRIBUTES[self.names[j]]
            out[self.names[j]] = levels[int(v)] if levels is not None else v
        for j, (lo, hi) in self.ranges.items():
            out[self.names[j]] = [lo, hi]
        return out

    def draw(self, bank: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """`(n, A)` attribute rows: rows of `bank` drawn at random, then the fixed values and ranges applied."""
        rows = bank[torch.randint(0, len(bank), (n,), generator=generator)].clone()
        for j, (lo, hi) in self.ranges.items():
            rows[:, j] = lo + (hi - lo) * torch.rand(n, generator=generator)
        for j, v in self.fixed.items():
            rows[:, j] = v
        return rows


def parse_condition(text: str) -> tuple[str, Any]:
    """`NAME=VALUE` or `NAME=LO:HI` (the CLI's --condition) -> (name, value or (lo, hi)).

    Raises:
        ValueError: if the text has no `=` or an empty side.
    """
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value:
        raise ValueError(f"--condition {text!r}: expected NAME=VALUE or NAME=LO:HI (e.g. site=HH, slice_pos=0.2:0.8)")
    if ":" in value:
        lo, _, hi = value.partition(":")
        if not lo.strip() or not hi.strip():
            raise ValueError(f"--condition {text!r}: a range needs both ends, LO:HI")
        return name, (lo.strip(), hi.strip())
    return name, value


class ConditionEmbedding(nn.Module):
    """Encoded attributes `(B, A)` (NaN = unknown) -> one conditioning vector `(B, dim)`.

    Each continuous attribute: its scaled value and `_FOURIER` sin/cos features through a linear layer; each
    categorical one: an embedding table. Every attribute has a learned vector used where its value is unknown. The
    per-attribute vectors are summed and passed through a small MLP.

    Also holds `bank`, up to `BANK_ROWS` encoded training rows for default sampling (`set_bank`, `draw`).

    Args:
        names: attribute names, the column order of the encoded rows.
        dim: output width.
    """

    def __init__(self, names: Sequence[str], dim: int) -> None:
        super().__init__()
        check_names(names)
        if not names:
            raise ValueError("ConditionEmbedding needs at least one attribute")
        self.names = tuple(names)
        self.inputs = nn.ModuleList()
        for name in self.names:
            levels = ATTRIBUTES[name]
            self.inputs.append(nn.Embedding(len(levels), dim) if levels is not None
                               else nn.Linear(1 + 2 * _FOURIER, dim))
        self.unknown = nn.Parameter(torch.randn(len(self.names), dim) * 0.02)   # (A, dim)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))
        self.register_buffer("bank", torch.full((BANK_ROWS, len(self.names)), math.nan))
        self.register_buffer("bank_rows", torch.tensor(0))

    def forward(self, attrs: torch.Tensor) -> torch.Tensor:
        """attrs: `(B, A)` float (NaN = unknown) -> `(B, dim)`."""
        if attrs.dim() != 2 or attrs.shape[1] != len(self.names):
            raise ValueError(f"conditions must be (B, {len(self.names)}) for {self.names}, got {tuple(attrs.shape)}")
        out = 0
        for j, (name, layer) in enumerate(zip(self.names, self.inputs)):
            v = attrs[:, j]
            known = ~torch.isnan(v)
            safe = torch.where(known, v, torch.zeros_like(v))
            if ATTRIBUTES[name] is not None:
                e = layer(safe.long().clamp(0, layer.num_embeddings - 1))
            else:
                centre, half = _SCALE[name]
                s = ((safe - centre) / half).unsqueeze(1)                                # (B, 1)
                k = torch.arange(1, _FOURIER + 1, device=s.device, dtype=s.dtype) * math.pi
                e = layer(torch.cat([s, torch.sin(k * s), torch.cos(k * s)], dim=1))
            out = out + torch.where(known.unsqueeze(1), e, self.unknown[j].to(e.dtype).expand_as(e))
        return self.mlp(out)

    @torch.no_grad()
    def set_bank(self, attrs: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Keep up to `BANK_ROWS` of the training rows `attrs` `(N, A)` (a random subset if N is larger)."""
        attrs = attrs.detach().to(self.bank.device, torch.float32)
        if len(attrs) > BANK_ROWS:
            attrs = attrs[torch.randperm(len(attrs), generator=generator, device="cpu")[:BANK_ROWS].to(attrs.device)]
        self.bank.fill_(math.nan)
        self.bank[: len(attrs)] = attrs
        self.bank_rows.fill_(len(attrs))

    def training_rows(self) -> torch.Tensor:
        """The banked training rows `(M, A)` on CPU.

        Raises:
            RuntimeError: if the bank is empty (the model was never trained).
        """
        m = int(self.bank_rows)
        if m == 0:
            raise RuntimeError("this conditional model has no training rows banked (it was never trained); pass "
                               "conditions explicitly")
        return self.bank[:m].cpu()

    def resolve(self, n: int, conditions: Any, generator: torch.Generator | None) -> torch.Tensor:
        """`(n, A)` encoded rows for sampling, on CPU.

        Args:
            conditions: None (n rows drawn from the training bank), a `ConditionRequest`, a list of n store-style
                row dicts, or an `(n, A)` tensor of encoded rows.
            generator: CPU RNG for the draws (a fresh unseeded one when None).
        """
        gen = generator if generator is not None and generator.device.type == "cpu" else None
        if gen is None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
                            if generator is not None else int(torch.seed() % 2**62))
        if conditions is None:
            conditions = ConditionRequest(self.names, {})
        if isinstance(conditions, ConditionRequest):
            if conditions.names != self.names:
                raise ValueError(f"the request is for {conditions.names}, the model is conditioned on {self.names}")
            return conditions.draw(self.training_rows(), n, gen)
        attrs = conditions if isinstance(conditions, torch.Tensor) else encode_rows(self.names, conditions)
        if tuple(attrs.shape) != (n, len(self.names)):
            raise ValueError(f"{n} samples need {n} condition rows of {len(self.names)} attributes "
                             f"{self.names}, got shape {tuple(attrs.shape)}")
        return attrs.float().cpu()
