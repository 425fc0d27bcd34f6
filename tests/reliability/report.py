"""Print the figures the reliability tests wrote (tests/reliability/.results/*.json) as a Markdown table.

    python -m pytest -m reliability && python tests/reliability/report.py

docs/RELIABILITY.md quotes this output from a full run; rerun both to refresh it.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / ".results"


def main() -> None:
    files = sorted(RESULTS.glob("*.json"))
    if not files:
        raise SystemExit(f"no results in {RESULTS}: run `python -m pytest -m reliability` first")
    print("| result file | figures |\n| --- | --- |")
    for path in files:
        data = json.loads(path.read_text())
        items = data.items() if isinstance(data, dict) else enumerate(data)
        figures = "; ".join(f"{k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in items)
        print(f"| `{path.stem}` | {figures.replace('|', '/')} |")


if __name__ == "__main__":
    main()
