"""Model registry: register a run's model with a model card, promote `champion` by compare-and-set, list, show.

A version competes on one metric (recorded at registration, or any `final_*` metric the run logged) and may carry
`require` conditions (`val_memorised <= 0.05`): a version that fails them is never champion, and a champion that
fails the conditions of a newer promotion is replaced by a version that meets them.

Promotion converges instead of trusting one read: every promoter first marks its version a candidate, then
(after its own compare-and-set write) re-reads all candidates and re-points `champion` at the best one until a
read finds the alias already there. The last promoter to finish has seen every candidate, so two promoters racing
can never leave the worse model as champion. Ties keep the lower version number.
"""

from __future__ import annotations

import json
import math
import random
import time

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mrigen.registry.artifacts import SHA_TAG, RegistryError, _not_found, _registered, lookup, verify_model_artifacts
from mrigen.registry.rule import Condition, find_metric
from mrigen.tracking.client import error_line, make_client, redact, use_tracking_uri

__all__ = ["CHAMPION", "register", "promote_if_better", "list_models", "show", "champion", "model_card",
           "recorded_metrics"]

CHAMPION = "champion"
METRIC_TAG, VALUE_TAG, DIRECTION_TAG = "mrigen.metric", "mrigen.metric_value", "mrigen.greater_is_better"
CANDIDATE_TAG = "mrigen.candidate"          # "true" while a version competes for champion (cleared by --force)
REQUIRE_TAG = "mrigen.require"              # JSON {metric: "op threshold"}: conditions a champion must meet
_MAX_ROUNDS = 50


def model_card(name: str, run, metric: str, value: float, greater_is_better: bool,
               require: tuple[Condition, ...] = ()) -> str:
    """A readable description (markdown) of one model version: data, metrics, config, how to use it."""
    params, tags = run.data.params, run.data.tags
    finals = {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith("final_")}
    lines = [f"# {name}: mrigen {tags.get('mrigen.family', '?')} generator of 2D brain-MRI slices", "",
             f"Trained in run `{run.info.run_id}` (mrigen {tags.get('mrigen.version', '?')}, git "
             f"{tags.get('mrigen.git_commit', 'n/a')}).", "",
             "## Data", f"Slice store with digest `{tags.get('mrigen.data_digest', '?')}` "
             f"({params.get('data.n_train', '?')} training / {params.get('data.n_val', '?')} validation slices, "
             f"{params.get('model.image_size', '?')} px).", "",
             "## Quality", f"Selection metric: `{metric}` = {value:.6g} ({'higher' if greater_is_better else 'lower'} "
             f"is better)."]
    if require:
        lines += [f"Required to compete for `{CHAMPION}`: {'; '.join(f'`{c}`' for c in require)}."]
    lines += [f"- `{k}` = {v:.6g}" for k, v in finals.items()]
    lines += ["", "## Config", "```json", json.dumps({k: params[k] for k in sorted(params)}, indent=1)[:3000], "```",
              "", "## Use", "```", f"python -m mrigen.generate --model models:/{name}@{CHAMPION} -n 1000 --out synth/",
              f"mlflow.pyfunc.load_model('models:/{name}@{CHAMPION}').predict({{'n': 16, 'seed': 0}})  "
              f"# float32 (16, H, W) in [0, 1]", "```"]
    return redact("\n".join(lines))[:20000]


def register(run_id: str, name: str, *, metric: str, value: float, greater_is_better: bool,
             require: tuple[Condition, ...] = (), tags: dict[str, str] | None = None,
             tracking_uri: str | None = None) -> str:
    """Register the run's logged model as a new version of `name` (created if missing).

    The model's files are downloaded, checked (complete, no pickle-format files) and their sha256 recorded as a
    version tag; the version also carries the selection metric and value, the `require` conditions of its
    promotion rule, the final metrics, the config, the data digest and a model card as its description.

    Returns:
        The new version number, as a string.

    Raises:
        RegistryError: unknown run, no / incomplete / pickled model, or a non-finite metric value.
    """
    if not name:
        raise ValueError("register: name must be a non-empty model name")
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise RegistryError(f"register: metric {metric}={value!r} is not a finite number")
    client, uri = make_client(tracking_uri, announce=False)
    model_id, files = verify_model_artifacts(run_id, client=client, tracking_uri=uri)
    run = client.get_run(run_id)
    _ensure_registered(client, name)
    version_tags = {METRIC_TAG: metric, VALUE_TAG: repr(float(value)), DIRECTION_TAG: str(bool(greater_is_better)),
                    CANDIDATE_TAG: "false", SHA_TAG: json.dumps(files, sort_keys=True),
                    "mrigen.data_digest": run.data.tags.get("mrigen.data_digest", ""),
                    "mrigen.family": run.data.tags.get("mrigen.family", ""),
                    "mrigen.version": run.data.tags.get("mrigen.version", ""),
                    "mrigen.config": json.dumps(run.data.params, sort_keys=True)[:5000],
                    REQUIRE_TAG: _require_json(require)}
    version_tags.update({f"metric.{k}": repr(v) for k, v in run.data.metrics.items() if k.startswith("final_")})
    version_tags.update({str(k): redact(v) for k, v in (tags or {}).items()})
    card = model_card(name, run, metric, float(value), greater_is_better, tuple(require))
    try:
        with use_tracking_uri(uri):       # the store resolves the models:/ source through the global URI
            mv = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                             tags=version_tags, description=card)
    except MlflowException as exc:
        raise RegistryError(f"could not register run {run_id} as {name!r}: {error_line(exc)}") from None
    return str(mv.version)


def _ensure_registered(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if not _not_found(exc):
            raise
    try:
        client.create_registered_model(name, description=f"mrigen generator `{name}`: synthetic 2D brain-MRI slices. "
                                       f"Alias `{CHAMPION}` = the best version on its selection metric.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":     # another process created it first: fine
            raise


def _write(fn, *args, attempts: int = 6) -> None:
    """A registry write that tolerates a concurrent writer's conflict (the store's get-then-insert of an alias or
    tag can hit a unique-constraint error when two promoters write at once); convergence re-checks the result."""
    for i in range(attempts):
        try:
            fn(*args)
            return
        except MlflowException as exc:
            conflict = exc.error_code in ("RESOURCE_ALREADY_EXISTS", "INTERNAL_ERROR") or "unique" in str(exc).lower()
            if not conflict or i == attempts - 1:
                raise RegistryError(f"registry write failed: {error_line(exc)}") from None
            time.sleep(random.uniform(0.01, 0.05 * (i + 1)))


def _require_json(require) -> str:
    return json.dumps({c.metric: f"{c.op} {c.threshold!r}" for c in require}, sort_keys=True)


def _require_of(mv) -> tuple[Condition, ...]:
    """The `require` conditions recorded on a version (none for versions registered before rules existed)."""
    raw = json.loads((mv.tags or {}).get(REQUIRE_TAG) or "{}")
    return tuple(Condition.parse(k, v) for k, v in sorted(raw.items()))


def recorded_metrics(mv) -> dict[str, float]:
    """The metrics a version recorded: its `final_*` run metrics (tags `metric.final_*`)."""
    out = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith("metric."):
            try:
                out[k.removeprefix("metric.")] = float(v)
            except ValueError:
                continue
    return out


def _value(mv, metric: str) -> float | None:
    """The version's value of `metric`: the selection value if it was ranked on it, else its recorded final
    metric of that name (so a champion ranked under an older rule can still be compared), else None."""
    tags = mv.tags or {}
    if tags.get(METRIC_TAG) == metric and VALUE_TAG in tags:
        v = float(tags[VALUE_TAG])
    else:
        v = find_metric(recorded_metrics(mv), metric)
        if v is None:
            return None
    return v if math.isfinite(v) else None


def _failures(mv, require: tuple[Condition, ...]) -> list[str]:
    """The `require` conditions the version does not meet (a metric it never recorded fails)."""
    recorded = recorded_metrics(mv)
    if (mv.tags or {}).get(METRIC_TAG) and VALUE_TAG in (mv.tags or {}):
        recorded[mv.tags[METRIC_TAG]] = float(mv.tags[VALUE_TAG])
    out = []
    for c in require:
        v = find_metric(recorded, c.metric)
        if v is None or not c.holds(v):
            out.append(f"{c.metric}={'not recorded' if v is None else format(v, '.4g')} fails {c.op} {c.threshold:g}")
    return out


def _eligible(mv, metric: str, require: tuple[Condition, ...]) -> float | None:
    """The version's value of `metric` if it may hold `champion` under `require`, else None."""
    v = _value(mv, metric)
    return None if v is None or _failures(mv, require) else v


def _better(a: float, b: float, greater_is_better: bool) -> bool:
    return a > b if greater_is_better else a < b


def _versions(client: MlflowClient, name: str) -> list:
    safe = name.replace("'", "\\'")
    return list(client.search_model_versions(f"name = '{safe}'"))


def _best_candidate(versions: list, metric: str, greater_is_better: bool, require: tuple[Condition, ...] = ()):
    best, best_v = None, None
    for mv in sorted(versions, key=lambda m: int(m.version)):
        v = _eligible(mv, metric, require)
        if (mv.tags or {}).get(CANDIDATE_TAG) != "true" or v is None:
            continue
        if best is None or _better(v, best_v, greater_is_better):
            best, best_v = mv, v
    return best


def champion(client: MlflowClient, name: str):
    """The version holding the `champion` alias, or None."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if _not_found(exc) or exc.error_code == "INVALID_PARAMETER_VALUE":
            return None
        raise


def promote_if_better(name: str, version: str | int, *, metric: str | None = None,
                      greater_is_better: bool | None = None, require: tuple[Condition, ...] | None = None,
                      force: bool = False, tracking_uri: str | None = None) -> bool:
    """Point `champion` at `version` if it meets `require` and beats the current champion on `metric`
    (compare-and-set, converging).

    Args:
        name, version: the registered model version to promote.
        metric, greater_is_better, require: the rule; default: what the version recorded at registration. A
            champion ranked on another metric is compared through its recorded final value of `metric`; a
            champion that fails `require` is replaced by any version that meets it.
        force: make it champion regardless, and retire every other candidate.
        tracking_uri: tracking/registry URI (default: MLFLOW_TRACKING_URI, else ./mrigen-work/mlflow.db).

    Returns:
        True if `version` is the champion when the alias has converged.

    Raises:
        RegistryError: unknown model / version, version without a value for the metric or failing `require`, or
            a champion with no value for the metric (it was ranked on another one and did not record it).
    """
    client, _ = make_client(tracking_uri, announce=False)
    _registered(client, name)
    version = str(version)
    mv = lookup(lambda: client.get_model_version(name, version), f"model {name!r} has no version {version}")
    tags = mv.tags or {}
    metric = metric or tags.get(METRIC_TAG)
    if greater_is_better is None:
        greater_is_better = tags.get(DIRECTION_TAG, "True") == "True"
    require = _require_of(mv) if require is None else tuple(require)
    if not metric or _value(mv, metric) is None:
        raise RegistryError(f"{name} v{version} has no recorded value for metric {metric!r} (register it with one)")
    failed = _failures(mv, require)
    if failed and not force:
        raise RegistryError(f"{name} v{version} does not meet the promotion requirements: {'; '.join(failed)}")
    current = champion(client, name)
    if current is not None and not force and _value(current, metric) is None:
        raise RegistryError(f"{name}: the champion v{current.version} is ranked on "
                            f"{(current.tags or {}).get(METRIC_TAG)!r} and recorded no {metric!r}; "
                            f"use --force to replace it")
    if force:
        for other in _versions(client, name):
            if str(other.version) != version and (other.tags or {}).get(CANDIDATE_TAG) == "true":
                _write(client.set_model_version_tag, name, other.version, CANDIDATE_TAG, "retired")
    _write(client.set_model_version_tag, name, version, CANDIDATE_TAG, "true")   # visible before any alias write
    if current is not None and not force and (current.tags or {}).get(CANDIDATE_TAG) != "true":
        _write(client.set_model_version_tag, name, current.version, CANDIDATE_TAG, "true")   # e.g. set in the UI
    mine = _value(mv, metric)
    theirs = None if current is None else _eligible(current, metric, require)
    if force or theirs is None or _better(mine, theirs, greater_is_better):
        _write(client.set_registered_model_alias, name, CHAMPION, version)
    return _converge(client, name, metric, greater_is_better, require) == version


def _converge(client: MlflowClient, name: str, metric: str, greater_is_better: bool,
              require: tuple[Condition, ...] = ()) -> str | None:
    """Re-point `champion` at the best eligible candidate until a fresh read finds it there; return its version."""
    for _ in range(_MAX_ROUNDS):
        best = _best_candidate(_versions(client, name), metric, greater_is_better, require)
        current = champion(client, name)
        if best is None:
            return str(current.version) if current is not None else None
        if current is not None and str(current.version) == str(best.version):
            return str(best.version)
        _write(client.set_registered_model_alias, name, CHAMPION, str(best.version))
        time.sleep(random.uniform(0.0, 0.05))               # de-synchronise racing promoters
    raise RegistryError(f"{name}: champion alias did not settle after {_MAX_ROUNDS} rounds")


def list_models(tracking_uri: str | None = None) -> list[dict]:
    """One dict per registered model: name, latest version, champion version and its metric."""
    client, _ = make_client(tracking_uri, announce=False)
    out = []
    for rm in client.search_registered_models(max_results=1000):
        champ = champion(client, rm.name)
        ctags = (champ.tags or {}) if champ is not None else {}
        latest = max((int(v.version) for v in (rm.latest_versions or [])), default=None)
        out.append({"name": rm.name, "latest_version": str(latest) if latest is not None else None,
                    "champion": str(champ.version) if champ is not None else None,
                    "metric": ctags.get(METRIC_TAG), "value": ctags.get(VALUE_TAG)})
    return sorted(out, key=lambda d: d["name"])


def _utility_tags(mv) -> dict[str, dict]:
    """{task: summary} from a version's `utility.<task>` tags (written by `python -m mrigen.utility`)."""
    out = {}
    for k, v in sorted((mv.tags or {}).items()):
        if k.startswith("utility."):
            try:
                out[k.removeprefix("utility.")] = json.loads(v)
            except json.JSONDecodeError:
                out[k.removeprefix("utility.")] = {"raw": v}
    return out


def show(name: str, tracking_uri: str | None = None) -> dict:
    """A registered model: description, the champion's model card, and each version's run, metric, aliases and
    augmentation-utility results (`utility`: {task: summary}).

    Raises:
        RegistryError: no registered model with that name.
    """
    client, _ = make_client(tracking_uri, announce=False)
    rm = _registered(client, name)
    champ = champion(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, v in (rm.aliases or {}).items():                  # search results carry no aliases: use the model's
        by_version.setdefault(str(v), []).append(alias)
    versions = [{"version": str(v.version), "run_id": v.run_id, "status": v.status,
                 "metric": (v.tags or {}).get(METRIC_TAG), "value": (v.tags or {}).get(VALUE_TAG),
                 "data_digest": (v.tags or {}).get("mrigen.data_digest"), "aliases": sorted(by_version.get(str(v.version), [])),
                 "created": v.creation_timestamp, "utility": _utility_tags(v)}
                for v in sorted(_versions(client, name), key=lambda m: int(m.version))]
    return {"name": rm.name, "description": rm.description, "champion": str(champ.version) if champ else None,
            "champion_card": champ.description if champ else None, "versions": versions}
