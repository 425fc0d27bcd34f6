"""Tuning: Optuna studies (experiments/*.yaml) whose trials train models through `mrigen.train`."""

from mrigen.tune.runner import TuneOptions, run_study, run_worker
from mrigen.tune.study import (Budget, Objective, ParamSpec, PrunerSpec, StudyFileError, StudySpec, list_studies,
                               load_study)

__all__ = ["Budget", "Objective", "ParamSpec", "PrunerSpec", "StudyFileError", "StudySpec", "TuneOptions",
           "list_studies", "load_study", "run_study", "run_worker"]
