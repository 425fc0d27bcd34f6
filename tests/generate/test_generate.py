"""`python -m mrigen.generate`: determinism, formats, manifest, atomic output, pulling by alias, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from mlflow_testlib import log_untrained_model, tiny_model_cfg
from mrigen.generate import ResolvedModel, generate, main, resolve_model, sample_slices
from mrigen.models import build_model, save_model
from mrigen.registry import promote_if_better, register


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model(build_model(tiny_model_cfg()), tmp_path_factory.mktemp("gen") / "model")


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_same_seed_same_bytes_other_seed_other_slices(model_dir, tmp_path):
    args = ["--model", str(model_dir), "-n", "5", "--batch-size", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a"), "--seed", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--seed", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "c"), "--seed", "2"]) == 0
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert [k for k in a if k != "manifest.json" and a[k] != c[k]], "another seed must change the slices"
    assert len([k for k in a if k.endswith(".png")]) == 5


def test_png_manifest_hashes_and_values(model_dir, tmp_path):
    resolved = resolve_model(str(model_dir), device="cpu")
    manifest = generate(resolved, 3, tmp_path / "out", fmt="png", seed=4, batch_size=2, progress=False)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest and manifest["seed"] == 4 and manifest["format"] == "png"
    for entry in manifest["files"]:
        data = (tmp_path / "out" / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    expected = np.concatenate(list(sample_slices(resolved.model, 3, seed=4, batch_size=2)))
    img = np.asarray(Image.open(tmp_path / "out" / manifest["files"][0]["file"]))
    assert img.dtype == np.uint8 and img.shape == (32, 32)
    np.testing.assert_allclose(img / 255.0, expected[0], atol=1 / 255)


def test_nifti_is_float32_with_1mm_affine(model_dir, tmp_path):
    resolved = resolve_model(str(model_dir), device="cpu")
    manifest = generate(resolved, 2, tmp_path / "nii", fmt="nifti", seed=0, batch_size=8, progress=False)
    image = nib.load(tmp_path / "nii" / manifest["files"][1]["file"])
    data = np.asarray(image.dataobj)
    assert data.dtype == np.float32 and data.shape == (32, 32, 1)
    np.testing.assert_array_equal(image.affine, np.eye(4))
    expected = np.concatenate(list(sample_slices(resolved.model, 2, seed=0, batch_size=8)))
    np.testing.assert_array_equal(data[:, :, 0], expected[1])


def test_refuses_non_empty_out_unless_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["--model", str(model_dir), "-n", "2", "--out", str(out), "--no-progress"]) == 1
    assert "exists and is not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["--model", str(model_dir), "-n", "2", "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "slice_00000.png", "slice_00001.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]                # no temp dirs left behind


def test_failure_leaves_nothing_behind(tmp_path, capsys):
    vq = save_model(build_model(tiny_model_cfg(family="vqvae", latent="spatial")), tmp_path / "vq")
    assert main(["--model", str(vq), "-n", "2", "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prior" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vq"]


@pytest.mark.parametrize("kwargs, match", [({"fmt": "jpeg"}, "format='jpeg'"), ({"n": 0}, "n=0"),
                                           ({"batch_size": 0}, "batch_size=0")])
def test_invalid_settings(model_dir, tmp_path, kwargs, match):
    resolved = ResolvedModel(model=build_model(tiny_model_cfg()), uri="x")
    args = {"n": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(resolved, args.pop("n"), tmp_path / "o", progress=False, **args)


def test_missing_local_model_is_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "-n", "1", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such directory" in err


def test_pull_by_alias_and_by_run(tracking_env, tmp_path, capsys):
    run_id = log_untrained_model(tracking_env, "generate-tests", seed=1)
    version = register(run_id, "gen-model", metric="val_ssim", value=0.5, greater_is_better=True)
    assert promote_if_better("gen-model", version)
    assert main(["--model", "models:/gen-model@champion", "-n", "3", "--out", str(tmp_path / "alias"),
                 "--seed", "7", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "alias" / "manifest.json").read_text())
    assert (manifest["model_name"], manifest["model_version"], manifest["run_id"]) == ("gen-model", version, run_id)
    assert main(["--model", f"runs:/{run_id}/model", "-n", "3", "--out", str(tmp_path / "run"), "--seed", "7",
                 "--no-progress"]) == 0
    alias_files = {k: v for k, v in _files(tmp_path / "alias").items() if k != "manifest.json"}
    assert alias_files == {k: v for k, v in _files(tmp_path / "run").items() if k != "manifest.json"}
    assert main(["--model", "models:/gen-model@nope", "-n", "1", "--out", str(tmp_path / "x")]) == 1
    assert main(["--model", "models:/unknown-model@champion", "-n", "1", "--out", str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert any("has no alias 'nope'" in e for e in err) and any("no registered model named 'unknown-model'" in e
                                                                 for e in err)


def test_tampered_download_is_refused(tracking_env, tmp_path):
    from mlflow import MlflowClient

    run_id = log_untrained_model(tracking_env, "generate-tests", seed=2)
    version = register(run_id, "gen-tamper", metric="val_ssim", value=0.5, greater_is_better=True)
    client = MlflowClient(tracking_env, registry_uri=tracking_env)
    sha = json.loads(client.get_model_version("gen-tamper", version).tags["mrigen.artifact_sha256"])
    key = next(k for k in sha if k.endswith("model.safetensors"))
    client.set_model_version_tag("gen-tamper", version, "mrigen.artifact_sha256", json.dumps({**sha, key: "0" * 64}))
    from mrigen.registry import RegistryError

    with pytest.raises(RegistryError, match="do not match the sha256"):
        resolve_model(f"models:/gen-tamper/{version}", device="cpu")


def test_pulling_with_no_store_configured_names_the_default_and_creates_nothing(tmp_path, monkeypatch, capsys):
    from mrigen.tracking.client import DEFAULT_WORK_DIR
    from mrigen.tune.__main__ import _parser as tune_parser

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert str(tune_parser().parse_args(["--study", "vae-kernels"]).work_dir) == DEFAULT_WORK_DIR  # same place
    code = main(["--model", "models:/mrigen-vae-kernels@champion", "-n", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and f"{DEFAULT_WORK_DIR}/mlflow.db" in err
    assert not list(tmp_path.rglob("*.db"))                             # a read-only command created no store
