"""Study files: every file in experiments/ loads; bad files give one error naming the file and the key."""

from __future__ import annotations

import textwrap

import pytest

from mrigen.train.configs import build_configs
from mrigen.tune.study import StudyFileError, list_studies, load_study

REQUIRED = {"vae-kernels", "vae-latent", "vae-depth", "vqvae-codebook", "thesis-replica"}


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
                layer = {"model": {"image_size": budget.image_size}, "train": {}}
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
    assert spec.metric == "val_ssim" and spec.direction == "maximize"
    assert spec.demo_budget.trials >= 1


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
