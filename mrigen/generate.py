"""Pull a trained model and write a synthetic, traceable augmentation set.

    python -m mrigen.generate --model models:/mrigen-vae@champion -n 1000 --out synth/ [--format png|nifti]
    python -m mrigen.generate --model runs:/<run_id>/model -n 64 --out synth/ --seed 3
    python -m mrigen.generate --model out/model -n 64 --out synth/         # a local save_model directory
    python -m mrigen.generate --model models:/NAME@champion -n 1000 --condition slice_pos=0.2:0.8 \
        --condition site=HH --out synth/                                  # a conditional model: fix / range

Writes `slice_00000.png` (8-bit grayscale) or `slice_00000.nii.gz` (float32 in [0, 1], (H, W, 1), 1 mm identity
affine) plus `manifest.json` (model name, version, run id, seed, batch size, mrigen version, format, per-file
sha256). Deterministic: the same model, seed, n and batch size give byte-identical slice files (batch k draws its
noise from a CPU generator seeded from (seed, k), so the device does not change the noise).

A conditional model (trained with `model.conditions`) takes `--condition NAME=VALUE` (a fixed value: `site=HH`,
`sex=F`, `age=70`) or `--condition NAME=LO:HI` (uniform in a range: `slice_pos=0.2:0.8`); attributes not given
are drawn together from the model's training rows ("match the real distribution", the default). Each file's
attributes are recorded in the manifest.

Output is built in `OUT.partial/` (each file through a temp file + rename, its sha256 appended to a completion log)
and renamed to OUT at the end, so a crash or Ctrl-C never leaves a half-written set under --out. Rerun the same
command with `--resume` to keep the verified files of an interrupted run and generate only the rest:

    python -m mrigen.generate --model models:/mrigen-vae@champion -n 100000 --out synth/ --resume
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

import mrigen
from mrigen import logs
from mrigen.models.condition import ConditionRequest, decode_rows, parse_condition

__all__ = ["sample_slices", "batch_seed", "ResolvedModel", "resolve_model", "write_slices", "generate", "main",
           "FORMATS", "model_fingerprint", "partial_dir"]

FORMATS = ("png", "nifti")


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of batch `batch_index` of a generation with `seed` (a pure function: reruns are identical)."""
    return (int(seed) * 1_000_003 + int(batch_index) * 7_919 + 17) % (2**63 - 1)


@torch.no_grad()
def sample_slices(model: torch.nn.Module, n: int, *, seed: int = 0, batch_size: int = 64) -> Iterator[np.ndarray]:
    """Generate `n` slices in batches.

    Args:
        model: a mrigen VAE / VQ-VAE (with a trained prior) in eval mode, on any device.
        n: number of slices (>= 1).
        seed: generation seed.
        batch_size: slices per forward pass (>= 1); part of what determines the output.

    Yields:
        float32 arrays (b, H, W) in [0, 1], b <= batch_size, n rows in total.
    """
    if int(n) < 1:
        raise ValueError(f"n={n} must be >= 1")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    model.eval()
    for k, start in enumerate(range(0, int(n), int(batch_size))):
        yield _sample_batch(model, min(int(batch_size), int(n) - start), seed, k)


@torch.no_grad()
def _sample_batch(model: torch.nn.Module, b: int, seed: int, k: int) -> np.ndarray:
    """Batch `k` of a generation with `seed`: float32 (b, H, W) in [0, 1]; depends only on (model, seed, k, b)."""
    return _sample_conditioned(model, b, seed, k, None)[0]


@torch.no_grad()
def _sample_conditioned(model: torch.nn.Module, b: int, seed: int, k: int, request: ConditionRequest | None
                        ) -> tuple[np.ndarray, list[dict] | None]:
    """Batch `k`: (float32 (b, H, W) in [0, 1], each slice's attributes for a conditional model else None).
    The attributes are drawn from the same (seed, k) generator first, so a batch depends only on its inputs."""
    gen = torch.Generator(device="cpu").manual_seed(batch_seed(seed, k))
    emb = getattr(model, "condition_embedding", None)
    rows = None
    if emb is None:
        x = model.sample(b, generator=gen)                          # (b, 1, H, W) in [0, 1]
    else:
        attrs = emb.resolve(b, request, gen)                        # (b, A)
        rows = decode_rows(emb.names, attrs)
        x = model.sample(b, generator=gen, conditions=attrs)
    if x.ndim != 4 or x.shape[0] != b or x.shape[1] != 1:
        raise RuntimeError(f"model.sample({b}) returned shape {tuple(x.shape)}, expected ({b}, 1, H, W)")
    return x[:, 0].float().clamp_(0, 1).cpu().numpy(), rows         # (b, 1, H, W) -> (b, H, W)


def condition_request(model: torch.nn.Module, spec: dict) -> ConditionRequest | None:
    """The request for `model` from {attribute: value or (lo, hi)}; None for an unconditional model asked nothing.

    Raises:
        ValueError: an attribute the model does not know (naming the ones it does), or a bad value.
    """
    emb = getattr(model, "condition_embedding", None)
    names = emb.names if emb is not None else ()
    if emb is None and not spec:
        return None
    return ConditionRequest(names, spec)


@dataclass
class ResolvedModel:
    """A model ready to sample from, and where it came from (for the manifest)."""

    model: torch.nn.Module
    uri: str                                   # what the user asked for (redacted)
    name: str | None = None                    # registered model name
    version: str | None = None                 # registered version
    run_id: str | None = None                  # training run
    info: dict = field(default_factory=dict)   # family, image_size, tags...


def _find_model_dir(local: Path) -> Path:
    """The save_model folder inside a downloaded MLflow model (via MLmodel) or `local` itself."""
    if (local / "config.json").is_file() and (local / "model.safetensors").is_file():
        return local
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        import yaml

        meta = yaml.safe_load(mlmodel.read_text())
        artifacts = (meta.get("flavors", {}).get("python_function", {}).get("artifacts") or {})
        rel = (artifacts.get("model_dir") or {}).get("path")
        if rel and (local / rel / "config.json").is_file():
            return local / rel
        raise ValueError(f"{local}: MLflow model without an mrigen 'model_dir' artifact (not an mrigen model?)")
    raise FileNotFoundError(f"{local}: neither a saved mrigen model (config.json + model.safetensors) nor an MLflow "
                            f"model (MLmodel)")


def resolve_model(spec: str, *, tracking_uri: str | None = None, device: str = "auto",
                  work_dir: Path | None = None) -> ResolvedModel:
    """Load the model named by `spec`: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/model` or a dir.

    Registered models have their downloaded files checked against the sha256 recorded at registration.

    Raises:
        TrackingError: unknown model / alias / run, or the tracking server is unreachable.
        FileNotFoundError, ValueError: a local path that is not a model.
    """
    from mrigen.device import pick_device
    from mrigen.models import load_model

    dev = pick_device(device)
    if not spec.startswith(("models:/", "runs:/")):
        local = Path(spec)
        if not local.exists():
            raise FileNotFoundError(f"--model {spec}: no such directory (and not a models:/ or runs:/ URI)")
        model_dir = _find_model_dir(local)
        return ResolvedModel(load_model(model_dir, device=dev), uri=str(local), info={"source": "local"})

    import mlflow.artifacts

    from mrigen.registry import describe_model_uri, verify_downloaded
    from mrigen.tracking.client import TrackingError, error_line, make_client, redact, use_tracking_uri

    client, uri = make_client(tracking_uri, announce=False, read_only=True)
    meta = describe_model_uri(client, spec)           # name/version/run_id/tags; TrackingError when unknown
    dst = Path(tempfile.mkdtemp(prefix="mrigen-pull-", dir=work_dir))
    try:
        try:
            with use_tracking_uri(uri):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=meta["download_uri"],
                                                                 dst_path=str(dst), tracking_uri=uri))
        except Exception as exc:
            raise TrackingError(f"could not download {spec}: {error_line(exc)}") from None
        if meta.get("tags"):
            verify_downloaded(local, meta["tags"], spec)
        model_dir = _find_model_dir(local)
        model = load_model(model_dir, device=dev)
    finally:
        shutil.rmtree(dst, ignore_errors=True)
    return ResolvedModel(model, uri=redact(spec), name=meta.get("name"), version=meta.get("version"),
                         run_id=meta.get("run_id"), info={"source": redact(uri)})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes, bytes): identifies the weights a set came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_one(path: Path, image: np.ndarray, fmt: str) -> None:
    if fmt == "png":
        from PIL import Image

        Image.fromarray((image * 255.0 + 0.5).astype(np.uint8), mode="L").save(path, format="PNG")
    else:
        import nibabel as nib

        nib.save(nib.Nifti1Image(image[:, :, None].astype(np.float32), affine=np.eye(4)), str(path))


def _slice_name(i: int, n: int, fmt: str) -> str:
    return f"slice_{i:0{max(5, len(str(n - 1)))}d}{'.png' if fmt == 'png' else '.nii.gz'}"


def _write_atomic(path: Path, image: np.ndarray, fmt: str) -> str:
    """Write one slice through a hidden temp file + rename (never half a file under its name); return sha256."""
    tmp = path.with_name(f".tmp-{path.name}")                 # same suffix: nibabel picks the format from it
    _write_one(tmp, image, fmt)
    os.replace(tmp, path)
    return _sha256(path)


def write_slices(batches: Iterator[np.ndarray], out_dir: Path, fmt: str, n: int, progress: bool = True) -> list[dict]:
    """Write batches of (b, H, W) slices as numbered files in `out_dir`; return [{file, sha256}, ...]."""
    from tqdm.auto import tqdm

    files: list[dict] = []
    with tqdm(total=n, desc="generate", unit="slice", disable=not progress) as bar:
        for batch in batches:
            for image in batch:
                path = out_dir / _slice_name(len(files), n, fmt)
                files.append({"file": path.name, "sha256": _write_atomic(path, image, fmt)})
            bar.update(len(batch))
    return files


# -- resumable output: OUT.partial/ holds the settings, the finished files and a log of their sha256 ---------------
SETTINGS_FILE, DONE_FILE, LOCK_FILE = ".settings.json", ".completed.jsonl", ".lock"


def partial_dir(out: Path) -> Path:
    """Where an unfinished `generate` into `out` keeps its work (`OUT.partial/`)."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _verified(folder: Path, entries: list[dict], settings: dict) -> dict[int, dict]:
    """{index: entry} of the recorded files whose name fits their index and whose bytes match their sha256."""
    ok: dict[int, dict] = {}
    for e in entries:
        i = e.get("index")
        if (isinstance(i, int) and 0 <= i < settings["n"] and e.get("file") == _slice_name(i, settings["n"],
                settings["format"]) and (folder / e["file"]).is_file() and _sha256(folder / e["file"]) == e["sha256"]):
            ok[i] = {"file": e["file"], "sha256": e["sha256"],
                     **({"conditions": e["conditions"]} if "conditions" in e else {})}
    return ok


def _read_partial(folder: Path) -> tuple[dict | None, list[dict]]:
    """(settings, recorded files) of an unfinished output folder; (None, []) when it records nothing usable."""
    if (folder / SETTINGS_FILE).is_file():
        settings = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
        entries = []
        if (folder / DONE_FILE).is_file():
            for line in (folder / DONE_FILE).read_text(encoding="utf-8").splitlines():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:          # a torn last line (killed mid-append): that file is redone
                    continue
        return settings, entries
    if (folder / "manifest.json").is_file():         # stopped between writing the manifest and the rename
        m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        keys = ("model_sha256", "n", "seed", "batch_size", "format") + (("conditions",) if "conditions" in m else ())
        return ({k: m.get(k) for k in keys},
                [{**f, "index": i} for i, f in enumerate(m.get("files", []))])
    return None, []


def _lock(folder: Path):
    import fcntl

    f = open(folder / LOCK_FILE, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(f"{folder}: another mrigen.generate is writing this output right now") from None
    return f


def _completed_out(out: Path, settings: dict) -> dict | None:
    """The manifest of a finished `out` made with the same settings whose files all verify, else None."""
    if not (out / "manifest.json").is_file():
        return None
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    if {k: manifest.get(k) for k in settings} != settings:
        return None
    entries = [{**f, "index": i} for i, f in enumerate(manifest.get("files", []))]
    return manifest if len(_verified(out, entries, settings)) == settings["n"] else None


def generate(resolved: ResolvedModel, n: int, out: Path, *, fmt: str = "png", seed: int = 0, batch_size: int = 64,
             overwrite: bool = False, resume: bool = False, progress: bool = True,
             conditions: dict | None = None) -> dict:
    """Write `n` slices and `manifest.json` to `out` atomically; return the manifest.

    The set is built in `OUT.partial/`: each slice is written through a temp file and rename, and its sha256 is
    appended to a completion log. An interrupted run leaves `OUT.partial/` behind (never a partial `out`);
    `resume=True` keeps every recorded file that still verifies, samples only the batches with a missing file
    (batch k's noise depends only on (seed, k)), and gives byte-identical files and manifest to an uninterrupted
    run. With `resume=True` an `out` already finished with the same model and settings is returned as is.
    `conditions` ({attribute: value or (lo, hi)}) asks a conditional model for those attributes; the manifest
    records the request and every file's attributes.

    Raises:
        ValueError: bad n / format / batch size; `out` not empty and not `overwrite`; `OUT.partial/` present
            without `resume` or `overwrite`, or written for another model or other settings.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not one of {FORMATS}")
    if int(n) < 1 or int(batch_size) < 1:
        raise ValueError(f"n={n} and batch_size={batch_size} must be >= 1")
    n, batch_size, out = int(n), int(batch_size), Path(out)
    request = condition_request(resolved.model, conditions or {})
    settings = {"model_sha256": model_fingerprint(resolved.model), "n": n, "seed": int(seed),
                "batch_size": batch_size, "format": fmt}
    if request is not None:
        settings["conditions"] = request.as_dict()
    if resume and (done_before := _completed_out(out, settings)) is not None:
        print(f"{out}: already complete ({n} slices verified); nothing to do", file=sys.stderr)
        return done_before
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    partial = partial_dir(out)
    old_settings, entries = _read_partial(partial) if partial.is_dir() else (None, [])
    if partial.exists() and not resume and old_settings is not None:
        if not overwrite:
            raise ValueError(f"{partial} holds an interrupted run: pass --resume to continue it or --overwrite to "
                             f"start over")
        shutil.rmtree(partial)
        old_settings, entries = None, []
    if old_settings is not None and old_settings != settings:
        diff = sorted(k for k in settings if old_settings.get(k) != settings[k])
        raise ValueError(f"--resume: {partial} was written with other settings ({', '.join(diff)} differ); "
                         f"pass --overwrite without --resume to start over")
    partial.mkdir(parents=True, exist_ok=True)
    lock = _lock(partial)
    done: dict[int, dict] = {}
    try:
        if old_settings is None:
            (partial / DONE_FILE).unlink(missing_ok=True)
            _write_json(partial / SETTINGS_FILE, settings)
        else:
            done = _verified(partial, entries, settings)
        keep = {e["file"] for e in done.values()} | {SETTINGS_FILE, DONE_FILE, LOCK_FILE}
        for stray in partial.iterdir():               # temp files, unrecorded or failed-verification slices
            if stray.name not in keep:
                shutil.rmtree(stray) if stray.is_dir() else stray.unlink()
        if done:
            print(f"resuming {partial}: {len(done)}/{n} slices already written and verified", file=sys.stderr)
        _write_json(partial / SETTINGS_FILE, settings)
        _fill(resolved.model, partial, settings, done, progress, request)
        cfg = getattr(resolved.model, "config", None)
        manifest = {"model": resolved.uri, "model_name": resolved.name, "model_version": resolved.version,
                    "run_id": resolved.run_id, "model_sha256": settings["model_sha256"],
                    "family": getattr(cfg, "family", None), "image_size": getattr(cfg, "image_size", None),
                    "n": n, "seed": int(seed), "batch_size": batch_size, "format": fmt,
                    "mrigen_version": mrigen.__version__, "value_range": [0.0, 1.0],
                    **({"conditions": settings["conditions"], "condition_attributes": list(request.names)}
                       if request is not None else {}),
                    "files": [done[i] for i in range(n)]}
        _write_json(partial / "manifest.json", manifest)
        for name in (SETTINGS_FILE, DONE_FILE, LOCK_FILE):
            (partial / name).unlink(missing_ok=True)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(partial, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(partial, out)
    except BaseException:
        if partial.is_dir() and not done:             # nothing worth resuming: leave nothing behind
            shutil.rmtree(partial, ignore_errors=True)
        elif partial.is_dir():
            for tmp in partial.glob(".tmp-slice_*"):
                tmp.unlink(missing_ok=True)
        raise
    finally:
        lock.close()
    return manifest


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _fill(model: torch.nn.Module, folder: Path, settings: dict, done: dict[int, dict], progress: bool,
          request: ConditionRequest | None = None) -> None:
    """Sample and write every slice missing from `done` (updated in place), batch by batch; log each file."""
    from tqdm.auto import tqdm

    n, bs, seed, fmt = settings["n"], settings["batch_size"], settings["seed"], settings["format"]
    model.eval()
    with open(folder / DONE_FILE, "a", encoding="utf-8") as log_file, \
            tqdm(total=n, initial=len(done), desc="generate", unit="slice", disable=not progress) as bar:
        for k, start in enumerate(range(0, n, bs)):
            todo = [i for i in range(start, min(start + bs, n)) if i not in done]
            if not todo:                              # finished work is not redone
                continue
            batch, rows = _sample_conditioned(model, min(bs, n - start), seed, k, request)
            for i in todo:
                entry = {"file": _slice_name(i, n, fmt)}
                entry["sha256"] = _write_atomic(folder / entry["file"], batch[i - start], fmt)
                if rows is not None:
                    entry["conditions"] = rows[i - start]
                log_file.write(json.dumps({"index": i, **entry}) + "\n")
                log_file.flush()
                os.fsync(log_file.fileno())
                done[i] = entry
            bar.update(len(todo))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mrigen.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Output: slice files + manifest.json (model, version, run id, seed, sha256).")
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or a local model directory")
    p.add_argument("-n", type=int, required=True, help="number of slices to generate")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--format", choices=FORMATS, default="png",
                   help="png: 8-bit grayscale; nifti: float32 .nii.gz in [0, 1] with a 1 mm affine (default png)")
    p.add_argument("--condition", action="append", default=[], metavar="NAME=VALUE|NAME=LO:HI",
                   help="conditional models: fix an attribute (site=HH, sex=F, age=70) or draw it uniformly from a "
                        "range (slice_pos=0.2:0.8); repeat for several; attributes not given follow the training "
                        "distribution (default)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="slices per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, "
                                          "else ./mrigen-work/mlflow.db, where `python -m mrigen.tune` tracks by default)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (and discard an interrupted OUT.partial/ unless --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT.partial/ (same model and settings): files already "
                        "written are verified by sha256 and kept; the result is identical to an uninterrupted run")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (never drawn into a pipe or file)")
    logs.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (errors are one line on stderr)."""
    from mrigen.tracking.client import TrackingError, error_line

    args = _parser().parse_args(argv)
    logs.setup(args)
    if args.n < 1 or args.batch_size < 1:
        print(f"mrigen.generate: error: -n ({args.n}) and --batch-size ({args.batch_size}) must be >= 1",
              file=sys.stderr)
        return 2
    try:
        conditions = dict(parse_condition(c) for c in args.condition)
        resolved = resolve_model(args.model, tracking_uri=args.tracking_uri, device=args.device)
        manifest = generate(resolved, args.n, args.out, fmt=args.format, seed=args.seed, batch_size=args.batch_size,
                            overwrite=args.overwrite, resume=args.resume,
                            progress=not args.no_progress and logs.progress(), conditions=conditions)
    except KeyboardInterrupt:
        partial = partial_dir(args.out)
        kept = len(_read_partial(partial)[1]) if partial.is_dir() else 0
        print(f"mrigen.generate: interrupted; {args.out} was not written. "
              + (f"{kept} finished slices are kept in {partial}: rerun with --resume to continue" if kept
                 else "Nothing was kept."), file=sys.stderr)
        return 130
    except (TrackingError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"mrigen.generate: error: {error_line(exc)}", file=sys.stderr)
        return 1
    where = f"{manifest['model_name']} v{manifest['model_version']}" if manifest["model_name"] else manifest["model"]
    print(f"wrote {manifest['n']} {args.format} slices from {where} (seed {args.seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
