"""Study files: every file in experiments/ loads; bad files give one error naming the file and the key."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from mrigen.train.configs import build_configs
from mrigen.registry.rule import DEFAULT_RULE, is_sample_metric
from mrigen.tune.study import Objective, StudyFileError, list_studies, load_study

REQUIRED = {"vae-kernels", "vae-latent", "vae-depth", "vqvae-codebook", "thesis-replica", "vae-quality", "vqvae-grid"}


def test_required_studies_ship():
    assert REQUIRED <= set(list_studies())


@pytest.mark.parametrize("name", list_studies())
def test_every_study_file_is_valid_and_every_choice_builds(name):
    spec = load_study(name)
    assert spec.description and spec.space
    # every categorical choice and both ends of each range must make a valid config at the study's sizes
    for budget in (spec.budget, spec.demo_budget):
        for p in spec.space:
            values = list(p.choices) if p.type == "categorical" else [p.low, p.high]
            for v in values:
                v = int(v) if p.type == "int" else v
                section, _, field = p.name.partition(".")
                layer = budget.layer()
                layer[section][field] = v
                build_configs(spec.family, spec.base, layer)


def write(tmp_path, body: str):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(body))
    return path


GOOD = """
description: test
family: vae
search_space:
  train.lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
"""


def test_minimal_study_gets_defaults(tmp_path):
    spec = load_study(write(tmp_path, GOOD))
    assert spec.metric == "val_ssim" and spec.direction == "maximize" and not spec.multi_objective
    assert spec.demo_budget.trials >= 1
    assert (spec.pruner.type, spec.pruner.metric) == ("median", "val_ssim")
    assert spec.promotion == DEFAULT_RULE and (spec.promotion.metric, spec.promotion.direction) == (
        "val_fd_ratio", "minimize")


def test_a_budget_may_set_config_fields_and_a_search_parameter_still_wins(tmp_path):
    spec = load_study(write(tmp_path, GOOD + "demo_budget: {trials: 2, epochs: 3, image_size: 32, "
                                             "set: {model.width: 0.5, train.lr: 1.0e-2}}\n"))
    b = spec.demo_budget
    assert (b.trials, b.epochs, b.overrides) == (2, 3, (("model.width", 0.5), ("train.lr", 1.0e-2)))
    assert b.describe() == "2 trials x 3 epochs at 32px (model.width=0.5, train.lr=0.01)"
    model_cfg, train_cfg = build_configs(spec.family, spec.base, b.layer(), {"train": {"lr": 1e-3}})
    assert (model_cfg.width, model_cfg.image_size, train_cfg.epochs, train_cfg.lr) == (0.5, 32, 3, 1e-3)
    assert spec.budget.overrides == () and "(" not in spec.budget.describe()
    many = dataclasses.replace(b, overrides=b.overrides + (("train.beta", 2.0), ("train.seed", 3), ("model.grid", 4)))
    assert many.describe() == ("2 trials x 3 epochs at 32px (model.width=0.5, train.lr=0.01, train.beta=2.0, "
                               "2 more settings in the study file)")
    assert dataclasses.replace(b, overrides=b.overrides + (("train.beta", 2.0), ("train.seed", 3))).describe() == (
        "2 trials x 3 epochs at 32px (model.width=0.5, train.lr=0.01, train.beta=2.0, 1 more setting in the study "
        "file)")


def test_a_budget_may_change_the_pruner_s_options_and_the_run_s_study_uses_them(tmp_path):
    """A 2-trial preview cannot wait for the default 4 startup trials: `demo_budget.pruner` changes the study
    pruner's options for runs on that budget only; the study's own options stay for the full budget."""
    import optuna

    from mrigen.tune.runner import TuneOptions, open_study

    spec = load_study(write(tmp_path, GOOD + "pruner: {type: median, n_startup_trials: 4, n_warmup_steps: 5}\n"
                                             "demo_budget: {trials: 2, pruner: {n_startup_trials: 1, "
                                             "n_warmup_steps: 1}}\n"))
    assert spec.demo_budget.pruner == (("n_startup_trials", 1), ("n_warmup_steps", 1)) and spec.budget.pruner == ()
    for full, startup, warmup in ((False, 1, 1), (True, 4, 5)):
        opts = TuneOptions(study=str(spec.path), storage=f"sqlite:///{tmp_path}/optuna-{full}.db", tracking_uri=None,
                           work_dir=tmp_path, full_budget=full)
        pruner = open_study(spec, opts).pruner
        assert isinstance(pruner, optuna.pruners.MedianPruner)
        assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (startup, warmup)


def test_a_budget_may_name_the_first_trial_s_values(tmp_path):
    spec = load_study(write(tmp_path, GOOD + "  train.batch_size: {type: categorical, choices: [16, 32]}\n"
                                             "demo_budget: {trials: 2, first: {train.lr: 5.0e-4, "
                                             "train.batch_size: 16}}\n"))
    assert spec.demo_budget.first == (("train.lr", 5.0e-4), ("train.batch_size", 16))
    assert spec.budget.first == ()


@pytest.mark.parametrize("body,key", [
    ("demo_budget: {trials: 1, first: {model.nope: 1}}", "demo_budget.first.model.nope"),
    ("demo_budget: {trials: 1, first: {train.lr: 1.0e-2}}", "demo_budget.first.train.lr"),       # above high
    ("budget: {trials: 1, first: {train.lr: fast}}", "budget.first.train.lr"),
    ("budget: {trials: 1, first: [train.lr]}", "budget.first"),
    ("  model.grid: {type: categorical, choices: [4, 16]}\n"                    # valid alone, not at 16 px
     "base: {model: {latent: spatial, grid: 4}}\ndemo_budget: {trials: 1, image_size: 16, first: {model.grid: 16}}",
     "demo_budget.first: grid"),
    ("demo_budget: {trials: 1, set: {model.nope: 1}}", "demo_budget.set.model.nope"),
    ("demo_budget: {trials: 1, set: {model.image_size: 64}}", "demo_budget.set.model.image_size"),
    ("budget: {trials: 1, set: [model.width]}", "budget.set"),
    ("demo_budget: {trials: 1, set: {model.width: -1}}", "demo_budget.set"),
    ("base: {model: {latent: spatial, grid: 16}}\ndemo_budget: {trials: 1, image_size: 16}", "demo_budget: grid"),
    ("demo_budget: {trials: 1, pruner: {n_warmup_steps: -1}}", "demo_budget.pruner"),
    ("demo_budget: {trials: 1, pruner: {patience: 3}}", "demo_budget.pruner"),          # not a median option
    ("budget: {trials: 1, pruner: {type: hyperband}}", "budget.pruner"),
    ("budget: {trials: 1, pruner: [n_startup_trials]}", "budget.pruner"),
    ("pruner: {type: none}\ndemo_budget: {trials: 1, pruner: {n_startup_trials: 1}}", "demo_budget.pruner"),
])
def test_a_bad_budget_set_names_the_file_and_key(tmp_path, body, key):
    with pytest.raises(StudyFileError) as err:
        load_study(write(tmp_path, GOOD + body + "\n"))
    assert "s.yaml" in str(err.value) and key in str(err.value) and "\n" not in str(err.value)


def test_every_shipped_study_selects_for_generation():
    """Every promotion rule looks at samples; every objective but the thesis replica's includes a sample metric."""
    for name in list_studies():
        spec = load_study(name)
        assert spec.promotion.looks_at_samples, name
        if name != "thesis-replica":
            assert any(is_sample_metric(m) for m in spec.metrics), name
        assert "prior_epochs" not in spec.path.read_text(), name


def test_sample_objective_prunes_on_a_per_epoch_metric_reported_the_study_way(tmp_path):
    spec = load_study(write(tmp_path, GOOD + "objective: {metric: val_fd_ratio, direction: minimize}\n"))
    assert spec.objectives == (Objective("val_fd_ratio", "minimize"),) and spec.objectives[0].final_only
    assert (spec.pruner.metric, spec.pruner.direction) == ("val_ssim", "maximize")   # negated when reported
    assert load_study(write(tmp_path, GOOD + "objective: {metric: val_fd_ratio}\n")).direction == "minimize"


def test_multi_objective_study(tmp_path):
    body = GOOD + textwrap.dedent("""
        objective:
          - {metric: val_fd_ratio, direction: minimize}
          - {metric: val_ssim, direction: maximize}
        pruner: {type: none}
        promotion: {metric: val_fd_ratio, require: {val_ssim: ">= 0.6", val_memorised: "<= 0.05"}}
        """)
    spec = load_study(write(tmp_path, body))
    assert spec.multi_objective and spec.metrics == ("val_fd_ratio", "val_ssim")
    assert spec.directions == ["minimize", "maximize"] and spec.pruner.type == "none"
    assert [str(c) for c in spec.promotion.require] == ["val_ssim >= 0.6", "val_memorised <= 0.05"]
    no_pruner = body.replace("pruner: {type: none}\n", "")
    assert load_study(write(tmp_path, no_pruner)).pruner.type == "none"


def test_promotion_on_a_reconstruction_metric_gated_by_samples_is_allowed(tmp_path):
    spec = load_study(write(tmp_path, GOOD + "promotion: {metric: val_ssim, require: {val_fd_ratio: '<= 3'}}\n"))
    assert spec.promotion.greater_is_better and spec.promotion.looks_at_samples


MULTI = GOOD + "objective: [{metric: val_fd_ratio, direction: minimize}, {metric: val_ssim, direction: maximize}]\n"


@pytest.mark.parametrize("body,key", [
    (GOOD + "objective: {metric: val_fd_ratio, direction: maximize}\n", "objective.direction"),
    (GOOD + "objective: {metric: val_fd_real}\n", "objective.metric"),
    (GOOD + "objective: [{metric: val_ssim}, {metric: val_ssim}]\n", "objective"),
    (GOOD + "objective: [{metric: val_ssim}, {metric: fd}]\n", "objective[1].metric"),
    (GOOD + "objective: []\n", "objective"),
    (MULTI + "pruner: {type: median}\n", "pruner.type"),
    (GOOD + "pruner: {type: median, metric: val_fd_ratio}\n", "pruner.metric"),
    (GOOD + "pruner: {type: median, metric: val_ssim, direction: minimize}\n", "pruner.direction"),
    (GOOD + "pruner: {type: median, metric: val_custom}\n", "pruner.direction"),
    (GOOD + "pruner: {type: median, n_warmup_steps: -1}\n", "pruner"),
    (GOOD + "promotion: {metric: val_ssim}\n", "promotion.metric"),
    (GOOD + "promotion: {metric: val_ssim, require: {val_psnr: '>= 20'}}\n", "promotion.metric"),
    (GOOD + "promotion: {metric: val_fd_ratio, direction: maximize}\n", "promotion.direction"),
    (GOOD + "promotion: {metric: val_fd_ratio, require: {val_ssim: 'at least 0.6'}}\n", "promotion.require.val_ssim"),
    (GOOD + "promotion: {metric: val_fd_ratio, require: {val_fd_real: '<= 1'}}\n", "promotion.require.val_fd_real"),
    (GOOD + "promotion: {metric: val_fd_ratio, require: [val_ssim]}\n", "promotion.require"),
    (GOOD + "promotion: {metric: val_fd_ratio, when: always}\n", "promotion.when"),
    (GOOD + "promotion: val_fd_ratio\n", "promotion"),
    (GOOD + "base: {train: {final_eval: false}}\n", "base.train.final_eval"),
    (GOOD.replace("family: vae", "family: vqvae") + "base: {train: {prior_steps: 0}}\n", "base.train.prior_steps"),
])
def test_bad_objective_pruner_or_promotion_names_file_and_key(tmp_path, body, key):
    path = write(tmp_path, body)
    with pytest.raises(StudyFileError) as err:
        load_study(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: ") and "\n" not in message, message


@pytest.mark.parametrize("body,key", [
    (GOOD + "extra: 1\n", "extra"),
    (GOOD.replace("family: vae", "family: gan"), "family"),
    (GOOD.replace("train.lr", "train.nope"), "search_space.train.nope"),
    (GOOD.replace("low: 1.0e-4", "low: 1.0e-2"), "search_space.train.lr"),
    (GOOD.replace("low: 1.0e-4", "low: 0"), "search_space.train.lr"),
    (GOOD.replace("type: float", "type: normal"), "search_space.train.lr"),
    (GOOD + "objective: {metric: val_ssim, direction: up}\n", "objective.direction"),
    (GOOD + "objective: {metric: fid}\n", "objective.metric"),
    (GOOD + "pruner: {type: magic}\n", "pruner.type"),
    (GOOD + "budget: {trials: 0}\n", "budget.trials"),
    (GOOD + "budget: {image_size: 100}\n", "budget.image_size"),
    (GOOD + "base: {model: {kernel_size: 7}}\n", "base"),
    (GOOD.replace("description: test", ""), "description"),
])
def test_bad_study_file_names_file_and_key(tmp_path, body, key):
    path = write(tmp_path, body)
    with pytest.raises(StudyFileError) as err:
        load_study(path)
    message = str(err.value)
    assert str(path) in message and key in message and "\n" not in message


def test_unknown_study_lists_known_ones():
    with pytest.raises(StudyFileError, match="vae-kernels"):
        load_study("no-such-study")


def test_unreadable_yaml_is_reported(tmp_path):
    path = write(tmp_path, "description: [unclosed\n")
    with pytest.raises(StudyFileError, match="cannot read"):
        load_study(path)


UTILITY_OBJECTIVE = "objective: {metric: val_utility_site_gain, direction: maximize}\npruner: {type: none}\n"


def test_utility_objective_needs_a_utility_section_for_its_task(tmp_path):
    with pytest.raises(StudyFileError, match=r"utility: missing, but val_utility_site_gain come from a utility run"):
        load_study(write(tmp_path, GOOD + UTILITY_OBJECTIVE))
    with pytest.raises(StudyFileError, match=r"utility: task 'slice_pos' produces .* not val_utility_site_gain"):
        load_study(write(tmp_path, GOOD + UTILITY_OBJECTIVE + "utility: {task: slice_pos}\n"))
    with pytest.raises(StudyFileError, match=r"s.yaml: utility: .*real_fraction=2"):
        load_study(write(tmp_path, GOOD + UTILITY_OBJECTIVE + "utility: {task: site, real_fraction: 2}\n"))
    spec = load_study(write(tmp_path, GOOD + UTILITY_OBJECTIVE + "utility: {task: site, seeds: 2}\n"))
    assert spec.utility.task == "site" and spec.utility.seeds == 2
    assert spec.utility.eval_split == "val"           # studies select on val; the benchmark reports test
    assert spec.objectives[0].final_only and spec.promotion.looks_at_samples


def test_utility_objective_direction_is_known():
    from mrigen.registry.rule import known_direction

    assert known_direction("val_utility_site_gain") == "maximize"
    assert known_direction("val_utility_age_tstr_ratio") == "maximize"


def test_sharpness_is_a_sample_metric_without_a_direction(tmp_path):
    from mrigen.registry.rule import FINAL_ONLY_METRICS, PromotionRule, RuleError, known_direction

    assert is_sample_metric("val_hf_ratio") and not is_sample_metric("val_hf_ratio_real")
    assert known_direction("val_hf_ratio") is None                  # read against ~1, like diversity
    assert "recon_hf_ratio" in FINAL_ONLY_METRICS and not is_sample_metric("val_recon_hf_ratio")
    # a metric with no known better way needs its direction stated (noise scores high, blur low)
    with pytest.raises(StudyFileError, match=r"objective.direction: val_hf_ratio has no better way .* state direction"):
        load_study(write(tmp_path, GOOD + "objective: {metric: val_hf_ratio}\n"))
    with pytest.raises(StudyFileError, match=r"objective.direction: val_diversity has no better way"):
        load_study(write(tmp_path, GOOD + "objective: {metric: val_diversity}\n"))
    assert load_study(write(tmp_path, GOOD + "objective: {metric: val_hf_ratio, direction: maximize}\n"))
    with pytest.raises(RuleError, match="val_hf_ratio has no better way"):
        PromotionRule.parse({"metric": "val_hf_ratio"})
