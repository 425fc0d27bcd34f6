"""Augmentation utility: does adding a generator's synthetic slices help a downstream model trained on few real ones?

    python -m mrigen.utility --model models:/NAME@champion --task site --real-fraction 0.25 --seeds 3

`run_utility(model, store, UtilityConfig(task=...))` trains one small CNN per arm and seed and scores it on the
store's real test split (held-out subjects): real only, real + N synthetic, synthetic only (TSTR), real +
classic augmentation (`workers=N`: the trainings run in N processes on the CPU, same scores).
docs/UTILITY.md explains the protocol and how to read the table.
"""

from .config import UtilityConfig
from .report import Paired, learnable, paired, plot, summary, table, tstr_ratio, verdict
from .runner import ArmResult, UtilityResult, run_utility
from .tasks import TASKS, Task, get_task

__all__ = ["TASKS", "ArmResult", "Paired", "Task", "UtilityConfig", "UtilityResult", "get_task", "learnable", "paired",
           "plot", "run_utility", "summary", "table", "tstr_ratio", "verdict"]
