"""Pull a trained model and write a synthetic, traceable augmentation set.

    python -m mrigen.generate --model models:/mrigen-vae@champion -n 1000 --out synth/ [--format png|nifti]
    python -m mrigen.generate --model runs:/<run_id>/model -n 64 --out synth/ --seed 3
    python -m mrigen.generate --model out/model -n 64 --out synth/         # a local save_model directory

Writes `slice_00000.png` (8-bit grayscale) or `slice_00000.nii.gz` (float32 in [0, 1], (H, W, 1), 1 mm identity
affine) plus `manifest.json` (model name, version, run id, seed, batch size, mrigen version, format, per-file
sha256). Deterministic: the same model, seed, n and batch size give byte-identical slice files (batch k draws its
noise from a CPU generator seeded from (seed, k), so the device does not change the noise). Output is written to a
temporary sibling folder and renamed into place, so a crash never leaves a half-written set under --out.
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

__all__ = ["sample_slices", "batch_seed", "ResolvedModel", "resolve_model", "write_slices", "generate", "main",
           "FORMATS"]

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
        b = min(int(batch_size), int(n) - start)
        gen = torch.Generator(device="cpu").manual_seed(batch_seed(seed, k))
        x = model.sample(b, generator=gen)                          # (b, 1, H, W) in [0, 1]
        if x.ndim != 4 or x.shape[0] != b or x.shape[1] != 1:
            raise RuntimeError(f"model.sample({b}) returned shape {tuple(x.shape)}, expected ({b}, 1, H, W)")
        yield x[:, 0].float().clamp_(0, 1).cpu().numpy()            # (b, 1, H, W) -> (b, H, W)


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

    client, uri = make_client(tracking_uri, announce=False)
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


def _write_one(path: Path, image: np.ndarray, fmt: str) -> None:
    if fmt == "png":
        from PIL import Image

        Image.fromarray((image * 255.0 + 0.5).astype(np.uint8), mode="L").save(path, format="PNG")
    else:
        import nibabel as nib

        nib.save(nib.Nifti1Image(image[:, :, None].astype(np.float32), affine=np.eye(4)), str(path))


def write_slices(batches: Iterator[np.ndarray], out_dir: Path, fmt: str, n: int, progress: bool = True) -> list[dict]:
    """Write batches of (b, H, W) slices as numbered files in `out_dir`; return [{file, sha256}, ...]."""
    from tqdm.auto import tqdm

    ext = ".png" if fmt == "png" else ".nii.gz"
    width = max(5, len(str(n - 1)))
    files: list[dict] = []
    with tqdm(total=n, desc="generate", unit="slice", disable=not progress) as bar:
        for batch in batches:
            for image in batch:
                path = out_dir / f"slice_{len(files):0{width}d}{ext}"
                _write_one(path, image, fmt)
                files.append({"file": path.name, "sha256": _sha256(path)})
            bar.update(len(batch))
    return files


def generate(resolved: ResolvedModel, n: int, out: Path, *, fmt: str = "png", seed: int = 0, batch_size: int = 64,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Write `n` slices and `manifest.json` to `out` atomically; return the manifest.

    Raises:
        ValueError: bad n / format / batch size, or `out` exists, is not empty and `overwrite` is False.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not one of {FORMATS}")
    if int(n) < 1 or int(batch_size) < 1:
        raise ValueError(f"n={n} and batch_size={batch_size} must be >= 1")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = write_slices(sample_slices(resolved.model, n, seed=seed, batch_size=batch_size), tmp, fmt, n, progress)
        cfg = getattr(resolved.model, "config", None)
        manifest = {"model": resolved.uri, "model_name": resolved.name, "model_version": resolved.version,
                    "run_id": resolved.run_id, "family": getattr(cfg, "family", None),
                    "image_size": getattr(cfg, "image_size", None), "n": int(n), "seed": int(seed),
                    "batch_size": int(batch_size), "format": fmt, "mrigen_version": mrigen.__version__,
                    "value_range": [0.0, 1.0], "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


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
    p.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="slices per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, "
                                          "else sqlite:///mlflow.db in the working directory)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (errors are one line on stderr)."""
    from mrigen.tracking.client import TrackingError, error_line

    args = _parser().parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        print(f"mrigen.generate: error: -n ({args.n}) and --batch-size ({args.batch_size}) must be >= 1",
              file=sys.stderr)
        return 2
    try:
        resolved = resolve_model(args.model, tracking_uri=args.tracking_uri, device=args.device)
        manifest = generate(resolved, args.n, args.out, fmt=args.format, seed=args.seed, batch_size=args.batch_size,
                            overwrite=args.overwrite, progress=not args.no_progress)
    except (TrackingError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"mrigen.generate: error: {error_line(exc)}", file=sys.stderr)
        return 1
    where = f"{manifest['model_name']} v{manifest['model_version']}" if manifest["model_name"] else manifest["model"]
    print(f"wrote {manifest['n']} {args.format} slices from {where} (seed {args.seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
