"""Registry against a local SQLite store: register (verified, model card), promote (compare-and-set, promotion
rules with `require` conditions), CLI."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from mlflow import MlflowClient

from mlflow_testlib import log_untrained_model
from mrigen.registry import (CHAMPION, PromotionRule, RegistryError, list_models, promote_if_better, register,
                             show, verify_model_artifacts)
from mrigen.registry.__main__ import main as registry_cli
from mrigen.registry.core import CANDIDATE_TAG, _converge


@pytest.fixture(scope="module")
def runs(sqlite_uri):
    """Three runs with logged (untrained) models, each with a final_val_ssim metric."""
    return [log_untrained_model(sqlite_uri, "registry-tests", seed=i, metrics={"final_val_ssim": 0.1 * i})
            for i in range(3)]


def _champion(uri: str, name: str) -> str:
    return str(MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(name, CHAMPION).version)


def test_verify_lists_and_hashes_the_model_files(tracking_env, runs):
    files = verify_model_artifacts(runs[0])
    assert {"MLmodel", "pyfunc_model.py"} <= set(files)
    assert any(f.endswith("/model.safetensors") for f in files)
    assert all(len(h) == 64 for h in files.values())


def test_register_records_metric_config_digest_and_card(tracking_env, runs):
    version = register(runs[1], "reg-card", metric="val_ssim", value=0.5, greater_is_better=True,
                       tags={"study": "unit"})
    mv = MlflowClient(tracking_env, registry_uri=tracking_env).get_model_version("reg-card", version)
    assert mv.run_id == runs[1] and mv.tags["mrigen.metric"] == "val_ssim" and float(mv.tags["mrigen.metric_value"]) == 0.5
    assert mv.tags["mrigen.data_digest"] == "d" * 64 and mv.tags["study"] == "unit"
    assert mv.tags["metric.final_val_ssim"] == repr(0.1)
    assert json.loads(mv.tags["mrigen.artifact_sha256"]) == verify_model_artifacts(runs[1])
    assert "d" * 64 in mv.description and "val_ssim" in mv.description and "@champion" in mv.description


def test_register_refuses_unknown_run_and_run_without_model(tracking_env):
    with pytest.raises(RegistryError, match="no run with id"):
        register("0" * 32, "reg-bad", metric="m", value=1.0, greater_is_better=True)
    client = MlflowClient(tracking_env)
    bare = client.create_run(client.get_experiment_by_name("registry-tests").experiment_id).info.run_id
    with pytest.raises(RegistryError, match="has no logged model"):
        register(bare, "reg-bad", metric="m", value=1.0, greater_is_better=True)
    with pytest.raises(RegistryError, match="not a finite number"):
        register(bare, "reg-bad", metric="m", value=float("nan"), greater_is_better=True)


@pytest.mark.parametrize("greater", [True, False])
def test_promotion_only_when_better(tracking_env, runs, greater):
    name = f"reg-promote-{greater}"
    values = [0.5, 0.3, 0.7] if greater else [0.5, 0.7, 0.3]      # middle is worse, last is better
    versions = [register(r, name, metric="val_ssim", value=v, greater_is_better=greater) for r, v in zip(runs, values)]
    assert promote_if_better(name, versions[0], metric="val_ssim", greater_is_better=greater)
    assert not promote_if_better(name, versions[1], metric="val_ssim", greater_is_better=greater)
    assert _champion(tracking_env, name) == versions[0]
    assert promote_if_better(name, versions[2])                 # metric and direction recorded at registration
    assert _champion(tracking_env, name) == versions[2]
    assert promote_if_better(name, versions[1], force=True)     # forced: retires the other candidates
    assert _champion(tracking_env, name) == versions[1]
    assert not promote_if_better(name, versions[0]) or (values[0] > values[1]) == greater


def test_concurrent_promotions_leave_the_better_one(tracking_env, runs):
    name = "reg-race"
    good = register(runs[0], name, metric="val_ssim", value=0.9, greater_is_better=True)
    bad = register(runs[1], name, metric="val_ssim", value=0.2, greater_is_better=True)
    barrier, results, errors = threading.Barrier(2), {}, []

    def promote(version):
        try:
            barrier.wait()
            results[version] = promote_if_better(name, version, metric="val_ssim", greater_is_better=True)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in (bad, good)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # The worse one may win for a moment if its promoter runs first (then it was the best promoted so far);
    # what must hold is the end state and that the better promotion succeeded.
    assert _champion(tracking_env, name) == good and results[good] is True


def test_a_stale_write_of_the_worse_version_is_repaired(tracking_env, runs):
    name = "reg-stale"
    good = register(runs[0], name, metric="val_ssim", value=0.9, greater_is_better=True)
    bad = register(runs[1], name, metric="val_ssim", value=0.2, greater_is_better=True)
    assert promote_if_better(name, good)
    client = MlflowClient(tracking_env, registry_uri=tracking_env)
    client.set_model_version_tag(name, bad, CANDIDATE_TAG, "true")
    client.set_registered_model_alias(name, CHAMPION, bad)          # a racing promoter's late write
    assert _converge(client, name, "val_ssim", True) == good
    assert _champion(tracking_env, name) == good


def test_unknown_model_and_version_are_clear_errors(tracking_env, runs):
    with pytest.raises(RegistryError, match="no registered model named 'nope'"):
        promote_if_better("nope", "1", metric="m", greater_is_better=True)
    register(runs[0], "reg-known", metric="val_ssim", value=0.5, greater_is_better=True)
    with pytest.raises(RegistryError, match="has no version 99"):
        promote_if_better("reg-known", "99")
    with pytest.raises(RegistryError, match="no registered model"):
        show("nope")


def test_list_and_show(tracking_env, runs):
    v = register(runs[2], "reg-list", metric="val_ssim", value=0.4, greater_is_better=True)
    promote_if_better("reg-list", v)
    row = next(r for r in list_models() if r["name"] == "reg-list")
    assert row["champion"] == v and row["metric"] == "val_ssim"
    info = show("reg-list")
    assert info["champion"] == v and info["versions"][-1]["aliases"] == [CHAMPION]


def test_cli(tracking_env, runs, capsys):
    v1 = register(runs[0], "reg-cli", metric="val_ssim", value=0.5, greater_is_better=True)
    v2 = register(runs[1], "reg-cli", metric="val_ssim", value=0.6, greater_is_better=True)
    assert registry_cli(["promote", "reg-cli", v1]) == 0
    assert registry_cli(["promote", "reg-cli", v2]) == 0
    assert f"v{v2} is now champion" in capsys.readouterr().out
    assert registry_cli(["promote", "reg-cli", v1]) == 0
    assert "did not beat" in capsys.readouterr().out
    assert registry_cli(["list"]) == 0 and f"reg-cli\tlatest=v{v2}\tchampion=v{v2}" in capsys.readouterr().out
    assert registry_cli(["show", "reg-cli"]) == 0 and "# reg-cli" in capsys.readouterr().out
    assert registry_cli(["show", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no registered model named 'no-such-model'" in err


def test_cli_server_down_is_one_line_without_secrets(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert registry_cli(["--tracking-uri", f"http://u:pw-secret@127.0.0.1:{port}", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach" in err and "pw-secret" not in err


# -- promotion rules: a metric plus `require` conditions (see mrigen.registry.rule) --------------------------------
RULE = PromotionRule.parse({"metric": "val_fd_ratio", "require": {"val_ssim": ">= 0.6", "val_memorised": "<= 0.05"}})


@pytest.fixture(scope="module")
def sample_runs(sqlite_uri):
    """Runs whose final evaluation recorded sample metrics: (fd_ratio, ssim, memorised) per run."""
    values = [(2.0, 0.7, 0.0), (1.5, 0.7, 0.3), (1.2, 0.4, 0.0), (2.5, 0.8, 0.0), (1.8, 0.65, 0.01)]
    return [log_untrained_model(sqlite_uri, "registry-rule-tests", seed=i,
                                metrics={"final_fd_ratio": f, "final_ssim": s, "final_memorised": m})
            for i, (f, s, m) in enumerate(values)]


def _register(run, name, value, rule=RULE):
    return register(run, name, metric=rule.metric, value=value, greater_is_better=rule.greater_is_better,
                    require=rule.require)


def test_register_records_the_rule_and_the_sample_metrics(tracking_env, sample_runs):
    v = _register(sample_runs[0], "rule-card", 2.0)
    mv = MlflowClient(tracking_env, registry_uri=tracking_env).get_model_version("rule-card", v)
    assert mv.tags["mrigen.metric"] == "val_fd_ratio" and float(mv.tags["mrigen.metric_value"]) == 2.0
    assert mv.tags["mrigen.greater_is_better"] == "False"
    assert json.loads(mv.tags["mrigen.require"]) == {"val_memorised": "<= 0.05", "val_ssim": ">= 0.6"}
    assert mv.tags["metric.final_fd_ratio"] == repr(2.0) and mv.tags["metric.final_memorised"] == repr(0.0)
    assert "`val_ssim >= 0.6`" in mv.description


def test_a_version_that_fails_require_is_never_champion(tracking_env, sample_runs):
    name = "rule-require"
    ok = _register(sample_runs[0], name, 2.0)
    copies = _register(sample_runs[1], name, 1.5)           # better fd_ratio, but memorised 0.3
    blurry = _register(sample_runs[2], name, 1.2)           # best fd_ratio, but ssim 0.4
    assert promote_if_better(name, ok)
    for v, needle in ((copies, "val_memorised=0.3 fails <= 0.05"), (blurry, "val_ssim=0.4 fails >= 0.6")):
        with pytest.raises(RegistryError, match=needle):
            promote_if_better(name, v)                      # the rule recorded at registration applies
    assert _champion(tracking_env, name) == ok
    client = MlflowClient(tracking_env, registry_uri=tracking_env)
    client.set_model_version_tag(name, copies, CANDIDATE_TAG, "true")   # a stray candidate mark (e.g. the UI)
    assert _converge(client, name, RULE.metric, False, RULE.require) == ok
    assert promote_if_better(name, copies, force=True)                  # --force still overrides
    assert _champion(tracking_env, name) == copies


def test_a_champion_failing_a_newer_rule_is_replaced_even_by_a_worse_score(tracking_env, sample_runs):
    name = "rule-newer"
    lax = PromotionRule.parse({"metric": "val_fd_ratio"})
    old = _register(sample_runs[1], name, 1.5, rule=lax)    # champion under a rule without require
    assert promote_if_better(name, old)
    new = _register(sample_runs[0], name, 2.0)              # worse fd_ratio, meets the stricter rule
    assert promote_if_better(name, new)
    assert _champion(tracking_env, name) == new
    better = _register(sample_runs[4], name, 1.8)
    assert promote_if_better(name, better) and _champion(tracking_env, name) == better


def test_a_champion_ranked_on_another_metric_is_compared_through_its_recorded_value(tracking_env, sample_runs):
    name = "rule-switch"
    old = register(sample_runs[4], name, metric="val_ssim", value=0.65, greater_is_better=True)
    assert promote_if_better(name, old)
    worse = _register(sample_runs[3], name, 2.5)            # fd_ratio 2.5 vs the champion's recorded 1.8
    assert not promote_if_better(name, worse)
    better = _register(sample_runs[0], name, 2.0)
    assert not promote_if_better(name, better)
    assert _champion(tracking_env, name) == old
    bare = register(sample_runs[0], "rule-bare", metric="val_ssim", value=0.5, greater_is_better=True)
    assert promote_if_better("rule-bare", bare)
    v = register(sample_runs[3], "rule-bare", metric="val_precision", value=0.5, greater_is_better=True)
    with pytest.raises(RegistryError, match="ranked on 'val_ssim' and recorded no 'val_precision'"):
        promote_if_better("rule-bare", v)


def test_cli_promote_with_require(tracking_env, sample_runs, capsys):
    name = "rule-cli"
    v1 = register(sample_runs[0], name, metric="val_fd_ratio", value=2.0, greater_is_better=False)
    v2 = register(sample_runs[1], name, metric="val_fd_ratio", value=1.5, greater_is_better=False)
    assert registry_cli(["promote", name, v1]) == 0
    capsys.readouterr()                                     # registering prints download progress
    assert registry_cli(["promote", name, v2, "--require", "val_memorised<=0.05"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "val_memorised=0.3 fails <= 0.05" in err
    assert registry_cli(["promote", name, v2, "--require", "val_memorised at most 0.05"]) == 1
    assert "expected METRIC OP VALUE" in capsys.readouterr().err
    assert registry_cli(["promote", name, v2]) == 0 and _champion(tracking_env, name) == v2
