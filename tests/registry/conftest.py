"""Fixtures: a session-wide local SQLite MLflow store (`sqlite_uri`, `tracking_env`) and a fake slice store."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracking"))
from mlflow_testlib import fake_store, sqlite_uri, tracking_env  # noqa: E402,F401
