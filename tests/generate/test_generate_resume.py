"""`mrigen.generate --resume`: an interrupted set is continued from its verified files, byte-identical to one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mrigen.generate as gen
from mlflow_testlib import tiny_model_cfg
from mrigen.generate import ResolvedModel, generate, main, partial_dir
from mrigen.models import build_model, save_model

N, BS = 11, 3            # 4 batches: 3 + 3 + 3 + 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model(build_model(tiny_model_cfg()), tmp_path_factory.mktemp("gen-resume") / "model")


@pytest.fixture
def resolved(model_dir) -> ResolvedModel:
    return gen.resolve_model(str(model_dir), device="cpu")


@pytest.fixture
def sample_calls(monkeypatch) -> list[int]:
    """Batch indices the generator samples (spied on `_sample_conditioned`)."""
    calls: list[int] = []
    real = gen._sample_conditioned

    def spy(model, b, seed, k, request):
        calls.append(k)
        return real(model, b, seed, k, request)

    monkeypatch.setattr(gen, "_sample_conditioned", spy)
    return calls


def _interrupt_after(monkeypatch, files: int) -> None:
    """Ctrl-C (KeyboardInterrupt) while writing slice number `files` (0-based): `files` slices are finished."""
    real, count = gen._write_one, {"n": 0}

    def write(path, image, fmt):
        if count["n"] == files:
            path.write_bytes(b"half")                   # a torn temp file, as a real interrupt could leave
            raise KeyboardInterrupt
        count["n"] += 1
        real(path, image, fmt)

    monkeypatch.setattr(gen, "_write_one", write)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def reference(resolved, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "out"
    generate(resolved, N, out, seed=5, batch_size=BS, progress=False)
    return _tree(out)


@pytest.mark.parametrize("fmt", ["png", "nifti"])
def test_interrupted_then_resumed_equals_one_run(resolved, tmp_path, monkeypatch, sample_calls, fmt):
    ref_out = tmp_path / "ref"
    generate(resolved, N, ref_out, fmt=fmt, seed=5, batch_size=BS, progress=False)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, files=7)
        with pytest.raises(KeyboardInterrupt):
            generate(resolved, N, out, fmt=fmt, seed=5, batch_size=BS, progress=False)
    partial = partial_dir(out)
    assert not out.exists()                                           # no half-written set under --out
    kept = sorted(p.name for p in partial.iterdir() if p.name.startswith("slice_"))
    assert len(kept) == 7 and not list(partial.glob(".tmp-*"))        # 7 whole files, no temp file
    ref = _tree(ref_out)
    assert all((partial / k).read_bytes() == ref[k] for k in kept)
    sample_calls.clear()
    manifest = generate(resolved, N, out, fmt=fmt, seed=5, batch_size=BS, resume=True, progress=False)
    assert sample_calls == [2, 3]               # slices 0-5 (batches 0, 1) are not redone; batch 2 had slice 6 only
    assert _tree(out) == ref and not partial.exists()
    assert manifest == json.loads(ref["manifest.json"])


def test_damaged_kept_files_are_redone(resolved, reference, tmp_path, monkeypatch, sample_calls):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, files=9)
        with pytest.raises(KeyboardInterrupt):
            generate(resolved, N, out, seed=5, batch_size=BS, progress=False)
    partial = partial_dir(out)
    (partial / "slice_00001.png").write_bytes(b"not the png that was written")     # bit rot / tampering
    (partial / "slice_00004.png").unlink()
    with open(partial / gen.DONE_FILE, "a") as f:
        f.write('{"index": 9, "file": "slice_0')                                  # torn last line
    (partial / "stray.txt").write_text("x")
    sample_calls.clear()
    generate(resolved, N, out, seed=5, batch_size=BS, resume=True, progress=False)
    assert sample_calls == [0, 1, 3]                                              # batch 2 (slices 6-8) kept
    assert _tree(out) == reference


def test_partial_without_resume_is_refused_and_overwrite_starts_over(resolved, reference, tmp_path, monkeypatch,
                                                                      sample_calls):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, files=4)
        with pytest.raises(KeyboardInterrupt):
            generate(resolved, N, out, seed=5, batch_size=BS, progress=False)
    with pytest.raises(ValueError, match=r"interrupted run: pass --resume"):
        generate(resolved, N, out, seed=5, batch_size=BS, progress=False)
    sample_calls.clear()
    generate(resolved, N, out, seed=5, batch_size=BS, overwrite=True, progress=False)
    assert sample_calls == [0, 1, 2, 3] and _tree(out) == reference


@pytest.mark.parametrize("change, field", [({"seed": 6}, "seed"), ({"batch_size": 4}, "batch_size"),
                                           ({"fmt": "nifti"}, "format"), ({"model": True}, "model_sha256")])
def test_resume_with_other_settings_is_refused(resolved, tmp_path, monkeypatch, change, field):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, files=4)
        with pytest.raises(KeyboardInterrupt):
            generate(resolved, N, out, seed=5, batch_size=BS, progress=False)
    kwargs = {"seed": 5, "batch_size": BS, "fmt": "png", **change}
    model = resolved
    if kwargs.pop("model", False):
        torch.manual_seed(1)
        model = ResolvedModel(model=build_model(tiny_model_cfg()), uri="other")
    with pytest.raises(ValueError, match=rf"other settings \({field} differ"):
        generate(model, N, out, resume=True, progress=False, **kwargs)
    assert len(list(partial_dir(out).glob("slice_*"))) == 4               # the kept work is untouched


def test_resume_of_a_finished_set_does_nothing(resolved, reference, tmp_path, sample_calls):
    out = tmp_path / "out"
    generate(resolved, N, out, seed=5, batch_size=BS, resume=True, progress=False)   # nothing to resume: fresh
    assert sample_calls == [0, 1, 2, 3] and _tree(out) == reference
    sample_calls.clear()
    generate(resolved, N, out, seed=5, batch_size=BS, resume=True, progress=False)
    assert sample_calls == [] and _tree(out) == reference
    with pytest.raises(ValueError, match="exists and is not empty"):               # other settings: not "done"
        generate(resolved, N, out, seed=6, batch_size=BS, resume=True, progress=False)


def test_second_writer_is_refused_while_one_holds_the_partial(resolved, tmp_path):
    out = tmp_path / "out"
    partial = partial_dir(out)
    partial.mkdir()
    holder = gen._lock(partial)
    try:
        with pytest.raises(ValueError, match="another mrigen.generate is writing"):
            generate(resolved, N, out, seed=5, batch_size=BS, resume=True, progress=False)
    finally:
        holder.close()


def test_failure_before_any_file_leaves_nothing(tmp_path, monkeypatch):
    vq = ResolvedModel(model=build_model(tiny_model_cfg(family="vqvae", latent="spatial")), uri="vq")
    with pytest.raises(RuntimeError, match="prior"):
        generate(vq, 2, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_interrupt_says_how_to_resume(model_dir, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "-n", str(N), "--batch-size", str(BS), "--seed", "5", "--out", str(out),
            "--no-progress"]
    with monkeypatch.context() as m:
        _interrupt_after(m, files=5)
        assert main(args) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "5 finished slices are kept" in err and "--resume" in err
    assert main(args) == 1 and "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert "resuming" in capsys.readouterr().err and _tree(out) == reference
