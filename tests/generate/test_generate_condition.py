"""`python -m mrigen.generate --condition`: requested attributes, per-file attributes in the manifest, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlflow_testlib import tiny_model_cfg
from mrigen.generate import main
from mrigen.models import build_model, save_model
from mrigen.models.condition import encode_rows

NAMES = ("slice_pos", "site", "age")


@pytest.fixture(scope="module")
def cond_model_dir(tmp_path_factory) -> Path:
    """A tiny conditional VAE whose banked training rows are all site Guys, age 30 or 70 (untrained weights)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(conditions=NAMES))
    rows = [{"slice_pos": i / 9, "site": "Guys", "age": 30.0 if i % 2 else 70.0} for i in range(10)]
    model.condition_embedding.set_bank(encode_rows(NAMES, rows))
    return save_model(model, tmp_path_factory.mktemp("cond") / "model")


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_fixed_values_and_ranges_are_honoured_and_recorded_per_file(cond_model_dir, tmp_path):
    out = tmp_path / "s"
    assert main(["--model", str(cond_model_dir), "-n", "40", "--out", str(out), "--batch-size", "16",
                 "--condition", "site=HH", "--condition", "slice_pos=0.2:0.4", "--no-progress"]) == 0
    m = _manifest(out)
    assert m["conditions"] == {"site": "HH", "slice_pos": [0.2, 0.4]}
    assert m["condition_attributes"] == list(NAMES)
    conds = [f["conditions"] for f in m["files"]]
    assert len(conds) == 40 and all(c["site"] == "HH" for c in conds)
    assert all(0.2 <= c["slice_pos"] <= 0.4 for c in conds)
    assert len({c["slice_pos"] for c in conds}) > 20
    assert {c["age"] for c in conds} == {30.0, 70.0}          # unspecified: drawn from the training rows


def test_default_matches_the_training_rows_and_is_deterministic(cond_model_dir, tmp_path):
    for name in ("a", "b"):
        assert main(["--model", str(cond_model_dir), "-n", "12", "--out", str(tmp_path / name), "--no-progress"]) == 0
    a, b = _manifest(tmp_path / "a"), _manifest(tmp_path / "b")
    assert a["files"] == b["files"] and a["conditions"] == {}
    assert {f["conditions"]["site"] for f in a["files"]} == {"Guys"}


def test_resume_with_other_conditions_is_refused(cond_model_dir, tmp_path, capsys):
    out = tmp_path / "s"
    (out.parent / "s.partial").mkdir()
    (out.parent / "s.partial" / ".settings.json").write_text(json.dumps({"conditions": {"site": "IOP"}}))
    rc = main(["--model", str(cond_model_dir), "-n", "4", "--out", str(out), "--condition", "site=HH", "--resume",
               "--no-progress"])
    assert rc == 1 and "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("cond,match", [("sex=F", "not trained on 'sex'; it knows: slice_pos, site, age"),
                                        ("site=Mars", "site='Mars' is not a known level"),
                                        ("site=HH:IOP", "a range needs a continuous attribute"),
                                        ("slice_pos", "expected NAME=VALUE")])
def test_bad_conditions_are_one_line_errors_and_write_nothing(cond_model_dir, tmp_path, capsys, cond, match):
    out = tmp_path / "s"
    assert main(["--model", str(cond_model_dir), "-n", "4", "--out", str(out), "--condition", cond]) == 1
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "s.partial").exists()


def test_unconditional_model_refuses_conditions(tmp_path, capsys):
    model_dir = save_model(build_model(tiny_model_cfg()), tmp_path / "m")
    assert main(["--model", str(model_dir), "-n", "2", "--out", str(tmp_path / "s"), "--condition", "site=HH"]) == 1
    assert "it knows: none (the model is unconditional)" in capsys.readouterr().err
