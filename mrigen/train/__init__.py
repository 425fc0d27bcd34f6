"""Training: one loop (`train`) shared by the CLI, the tuner and the tests, with hooks for logging/pruning."""

from mrigen.train.config import TrainConfig
from mrigen.train.hooks import Hook, LocalLogger, StopTraining, TrainContext
from mrigen.train.loop import TrainResult, train

__all__ = ["TrainConfig", "Hook", "LocalLogger", "StopTraining", "TrainContext", "TrainResult", "train"]
