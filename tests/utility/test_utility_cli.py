"""`python -m mrigen.utility` end to end on a registered model: a run nested under the model's run (table,
JSON, plot), tags on the version that `python -m mrigen.registry show` prints; argument errors in one line."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from mlflow_testlib import log_untrained_model
from mrigen.registry import Condition, RegistryError, promote_if_better, register
from mrigen.registry.__main__ import main as registry_cli
from mrigen.utility.__main__ import main as utility_cli


def test_cli_logs_a_nested_run_and_tags_the_version(tracking_env, demo_store, capsys):
    run_id = log_untrained_model(tracking_env, "utility-tests", seed=0, metrics={"final_val_ssim": 0.5})
    version = register(run_id, "util-model", metric="val_ssim", value=0.5, greater_is_better=True)
    rc = utility_cli(["--model", f"models:/util-model/{version}", "--task", "slice_pos", "--task", "site",
                      "--data", str(demo_store.path), "--seeds", "2", "--synthetic", "8,16", "--steps", "3",
                      "--device", "cpu", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| real+synthetic | 16 |" in out and out.count("logged run") == 2       # --task repeats: one run each
    assert out.index("task `slice_pos`") < out.index("task `site`")
    client = MlflowClient(tracking_env, registry_uri=tracking_env)
    parent = client.get_run(run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(c.data.tags["mrigen.utility.task"] for c in children) == ["site", "slice_pos"]
    child = next(c for c in children if c.data.tags["mrigen.utility.task"] == "slice_pos")
    assert child.data.tags["mrigen.kind"] == "utility" and child.info.status == "FINISHED"
    assert "utility_slice_pos_real_mean" in child.data.metrics
    assert "utility_slice_pos_real_synthetic_16_mean" in child.data.metrics
    files = {f.path for f in client.list_artifacts(child.info.run_id, "utility")}
    assert files == {f"utility/utility_slice_pos.{ext}" for ext in ("md", "json", "png")}
    mv = client.get_model_version("util-model", version)
    tag = json.loads(mv.tags["utility.slice_pos"])
    assert tag["run_id"] == child.info.run_id and tag["n_synthetic"] == 16 and tag["label_source"] == "probe"
    assert float(mv.tags["metric.utility_slice_pos_gain"]) == pytest.approx(tag["gain"], abs=1e-6)
    assert registry_cli(["show", "util-model"]) == 0
    shown = capsys.readouterr().out
    assert "utility slice_pos (mae, F=0.25, 2 seeds): real" in shown and "+16 synthetic" in shown
    # A promotion rule can require a utility figure like any recorded metric.
    with pytest.raises(RegistryError, match="utility_slice_pos_tstr_ratio=.* fails >= 1e"):
        promote_if_better("util-model", version, require=(Condition.parse_expr("val_utility_slice_pos_tstr_ratio>=1e9"),))
    assert promote_if_better("util-model", version, require=(Condition.parse_expr("val_utility_slice_pos_gain>=-1e9"),))


@pytest.mark.parametrize("args, message", [
    (["--task", "volume"], "unknown task 'volume' (allowed: slice_pos, site, age, sex)"),
    (["--task", "site", "--task", "volume"], "unknown task 'volume'"),      # every task checked before any runs
    (["--task", "site", "--real-fraction", "1.5"], "real_fraction=1.5 is out of range (allowed: 0 < F <= 1)"),
    (["--task", "site", "--real-fraction", "0"], "real_fraction=0.0 is out of range"),
    (["--task", "site", "--synthetic", "x"], "--synthetic 'x': expected counts"),
])
def test_argument_errors_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        utility_cli(["--model", "nowhere", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err


def test_missing_attribute_and_missing_model_are_one_line_errors(demo_store, tmp_path, capsys):
    assert utility_cli(["--model", str(tmp_path / "none"), "--task", "site", "--data", str(demo_store.path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mrigen.utility: error:") and "no such directory" in err and len(err.splitlines()) == 1
    assert utility_cli(["--model", "m", "--task", "site", "--data", str(tmp_path)]) == 1
    assert "not a slice store" in capsys.readouterr().err
