"""Console output of the command-line tools: the lines a person reads, with the details one flag away.

Every `python -m mrigen.*` command calls `add_arguments(parser)` and, first thing in `main`, `setup(args)`:

- mrigen's messages at INFO, written as plain lines; warnings and errors as ``WARNING logger: message``.
- MLflow, Optuna, alembic, urllib3, boto and the other libraries at WARNING: their INFO chatter (database
  migrations, "created version 3", system-metrics monitor start/stop) is hidden, their warnings still show.
- MLflow's "Downloading artifacts" bars off (registering a model downloads it once more to verify it).
- Progress bars (tqdm) only when stderr is a terminal: through a pipe or into a file they are carriage-return
  spam. `progress()` says whether to show them (what tqdm's ``disable=None`` decides for itself).

``-v`` / ``--verbose`` brings the details back (every logger at INFO, with its name, and MLflow's bars), except
the `INTERNALS` (SQLAlchemy's per-table mapper and engine lines: 3,085 of them in one `make tune`), which stay at
WARNING; ``--log-level LEVEL`` sets every logger, mrigen's, the libraries' and the internals', to LEVEL.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["INTERNALS", "LEVELS", "LIBRARIES", "add_arguments", "setup", "progress"]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Libraries whose INFO messages are details; the ones with their own handler (mlflow, optuna) are set directly.
LIBRARIES = ("mlflow", "optuna", "alembic", "urllib3", "botocore", "boto3", "s3transfer", "matplotlib", "PIL",
             "sqlalchemy", "httpx", "huey", "git", "py4j", "fsspec")
# Libraries whose INFO messages describe their own machinery, not the run: at WARNING even with -v.
INTERNALS = ("sqlalchemy",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``-v/--verbose`` and ``--log-level`` to a command's parser."""
    group = parser.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="show the details: every logger at INFO with its name (MLflow, Optuna, ...; not "
                            "SQLAlchemy's internals) and MLflow's artifact download bars")
    group.add_argument("--log-level", type=str.upper, choices=LEVELS, metavar="LEVEL",
                       help=f"level of every logger, mrigen's and the libraries' ({', '.join(LEVELS)}); "
                            "default: mrigen INFO, libraries WARNING")


_QUIETED: set[str] = set()


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (a test's capture, a redirected stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:                 # StreamHandler.__init__ assigns it; the property wins
        pass


class _Format(logging.Formatter):
    """Plain message for mrigen's INFO lines; ``LEVEL logger: message`` for warnings, errors and details."""

    def __init__(self, named: bool) -> None:
        super().__init__("%(message)s")
        self.named = named

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.named or record.levelno >= logging.WARNING or not record.name.startswith("mrigen"):
            return f"{record.levelname} {record.name}: {text}"
        return text


def setup(args: argparse.Namespace | None = None, *, quiet: tuple[str, ...] = ()) -> None:
    """Configure logging and progress output for a command (idempotent; call it again to change the levels).

    Args:
        args: the parsed arguments (``verbose``, ``log_level`` from `add_arguments`); None = the defaults.
        quiet: mrigen loggers whose INFO messages are details for this command (e.g. per-run tracking lines in
            a study that starts many runs); they show with ``-v``.

    Libraries imported after this call configure their own loggers on import (MLflow from
    ``MLFLOW_LOGGING_LEVEL``, which is set here; Optuna resets its level to INFO), so a command that uses Optuna
    imports it before calling `setup`.
    """
    verbose = bool(getattr(args, "verbose", False))
    level = getattr(args, "log_level", None) or ("INFO" if verbose else None)
    ours = level or "INFO"
    libraries = level or "WARNING"

    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Stderr)), None)
    if handler is None:
        handler = _Stderr()
        root.addHandler(handler)
    handler.setFormatter(_Format(named=verbose or level == "DEBUG"))
    root.setLevel(libraries)                         # loggers that propagate (urllib3, botocore, matplotlib...)
    logging.getLogger("mrigen").setLevel(ours)
    for name in _QUIETED - set(quiet):              # quieted by an earlier set-up in this process (tests)
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name in quiet:
        logging.getLogger(name).setLevel(level or "WARNING")
    _QUIETED.clear()
    _QUIETED.update(quiet)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(libraries)
    for name in INTERNALS:
        logging.getLogger(name).setLevel(getattr(args, "log_level", None) or "WARNING")
    os.environ["MLFLOW_LOGGING_LEVEL"] = libraries       # read when mlflow is imported (it resets its level then)
    if "optuna" in sys.modules:
        import optuna

        optuna.logging.set_verbosity(getattr(logging, libraries))
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "true" if verbose else "false"


def progress() -> bool:
    """Whether to draw progress bars: only when stderr is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):             # replaced or closed stream
        return False
