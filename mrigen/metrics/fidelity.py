"""Conditioning fidelity: does a conditional model generate the attributes it was asked for?

The attributes of generated slices are read back by probes trained on real training slices only
(`mrigen.metrics.probe`), and scored against the requested values. The same probes scored on the real held-out
slices against their true values give the yardstick: a generator is faithful when its error is close to the probe's
own error on real slices (issue targets: position MAE <= 1.5x the real MAE, site accuracy >= 0.9x the real one).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mrigen.models.condition import encode_rows

__all__ = ["conditioning_fidelity", "requested_rows"]

log = logging.getLogger(__name__)


def requested_rows(rows: list[dict[str, Any]], names: tuple[str, ...], n: int, seed: int) -> list[dict[str, Any]]:
    """n attribute rows drawn (seeded, with replacement) from real rows, keeping only `names`: what the generator
    is asked for, so the request follows the held-out split's joint attribute distribution."""
    if not rows:
        raise ValueError("no rows to draw conditions from")
    pick = torch.randint(0, len(rows), (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [{k: rows[i].get(k) for k in names} for i in pick]


@torch.no_grad()
def conditioning_fidelity(model: torch.nn.Module, store: Any, probes: Any, *, split: str = "val", n: int = 500,
                          seed: int = 0, batch_size: int = 256) -> dict[str, float]:
    """Probe scores of n slices generated under the attributes of real `split` rows, beside the probe's scores on
    the real `split` slices.

    Args:
        model: a conditional mrigen model (`model.config.conditions` non-empty).
        store: the slice store the probes belong to.
        probes: `mrigen.metrics.probe.Probes` trained on the store's real training slices.
        split: held-out split whose rows are requested and whose slices give the real yardstick.
        n: number of generated slices.
        seed: seeds the rows drawn and the sampling noise.
        batch_size: slices per `model.sample` call.

    Returns:
        For each conditioned attribute the probe can read: `cond_<metric>` (generated vs requested) and
        `cond_<metric>_real` (real vs true), where metric is `slice_pos_mae`, `site_acc`, `age_mae` or `sex_acc`.
        Empty for an unconditional model.
    """
    names = tuple(getattr(model.config, "conditions", ()))
    if not names:
        return {}
    rows = store.slices(split)
    asked = requested_rows(rows, names, n, seed)
    attrs = encode_rows(names, asked)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        fake = torch.cat([model.sample(len(attrs[i:i + batch_size]), generator=gen,
                                       conditions=attrs[i:i + batch_size]).float().cpu()
                          for i in range(0, n, batch_size)])
    finally:
        model.train(was_training)
    generated = probes.score(fake, asked)
    real = probes.score(store.tensor(split, probes.device), [{k: r.get(k) for k in names} for r in rows])
    out = {}
    for key, value in generated.items():
        if key in real:
            out[f"cond_{key}"] = float(value)
            out[f"cond_{key}_real"] = float(real[key])
    log.info("conditioning fidelity on %r (%d samples): %s", split, n,
             ", ".join(f"{k} {out[f'cond_{k}']:.3f} (real {out[f'cond_{k}_real']:.3f})"
                       for k in generated if f"cond_{k}" in out))
    return out
