"""`python -m mrigen.registry list | show NAME | promote NAME VERSION [--require M>=V] [--force]` for people who skip the UI."""

from __future__ import annotations

import argparse
import sys

from mrigen.registry.core import CHAMPION, list_models, promote_if_better, show
from mrigen.registry.rule import Condition
from mrigen.tracking.client import TrackingError, error_line

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mrigen.registry",
                                description="Registered mrigen generators and their champion alias.")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, else "
                                          "./mrigen-work/mlflow.db, what `python -m mrigen.tune` writes)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered models with their latest version and champion")
    s = sub.add_parser("show", help="one model: description, versions, metrics, aliases")
    s.add_argument("name")
    pr = sub.add_parser("promote", help=f"make VERSION the '{CHAMPION}' if it beats the current one")
    pr.add_argument("name")
    pr.add_argument("version")
    pr.add_argument("--metric", help="compare on this metric (default: the one recorded at registration)")
    direction = pr.add_mutually_exclusive_group()
    direction.add_argument("--greater-is-better", dest="greater", action="store_true", default=None)
    direction.add_argument("--lower-is-better", dest="greater", action="store_false")
    pr.add_argument("--require", action="append", metavar="METRIC>=VALUE",
                    help="a condition the version (and the champion) must meet, e.g. 'val_memorised<=0.05'; "
                         "repeatable (default: the conditions recorded at registration)")
    pr.add_argument("--force", action="store_true", help="promote even if it is worse (retires other candidates)")
    return p


def _utility_line(task: str, u: dict) -> str:
    """One line of a version's utility result, e.g. `utility site (acc): real 0.71 -> +1000 synthetic 0.78 (gain)`."""
    try:
        return (f"utility {task} ({u['metric']}, F={u['real_fraction']:g}, {u['seeds']} seeds): real "
                f"{u['real']:.4g}+-{u['real_std']:.2g} -> +{u['n_synthetic']} synthetic {u['real_synthetic']:.4g}"
                f"+-{u['real_synthetic_std']:.2g} ({u['verdict']}); synthetic only {u['synthetic']:.4g} (TSTR "
                f"{u['tstr_ratio']:.2f}); classic aug {u['classic']:.4g}; labels: {u['label_source']}")
    except (KeyError, TypeError, ValueError):
        return f"utility {task}: {u}"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; errors are one line on stderr with exit status 1."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            rows = list_models(args.tracking_uri)
            if not rows:
                print("no registered models")
            for r in rows:
                champ = f"{CHAMPION}=v{r['champion']} ({r['metric']}={r['value']})" if r["champion"] else "no champion"
                print(f"{r['name']}\tlatest=v{r['latest_version']}\t{champ}")
        elif args.command == "show":
            info = show(args.name, args.tracking_uri)
            print(f"{info['name']}  ({CHAMPION}: v{info['champion']})" if info["champion"] else info["name"])
            for v in info["versions"]:
                aliases = f" [{', '.join(v['aliases'])}]" if v["aliases"] else ""
                print(f"  v{v['version']}{aliases}\t{v['status']}\t{v['metric']}={v['value']}\trun {v['run_id']}")
                for task, u in v.get("utility", {}).items():
                    print(f"    {_utility_line(task, u)}")
            if info["description"]:
                print("\n" + info["description"])
            if info["champion_card"]:
                print("\n" + info["champion_card"])
        else:
            require = None if args.require is None else tuple(Condition.parse_expr(r) for r in args.require)
            won = promote_if_better(args.name, args.version, metric=args.metric, greater_is_better=args.greater,
                                    require=require, force=args.force, tracking_uri=args.tracking_uri)
            print(f"{args.name} v{args.version} is now {CHAMPION}" if won
                  else f"{args.name} v{args.version} did not beat the current {CHAMPION}; unchanged")
    except (TrackingError, ValueError) as exc:
        print(f"mrigen.registry: error: {error_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
