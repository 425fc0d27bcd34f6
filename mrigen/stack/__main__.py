"""`python -m mrigen.stack up|down|status [--dir DIR]`: the tracking stack on loopback without Docker."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from mrigen.stack.core import Stack, StackConfig
from mrigen.stack.procs import StackError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the stack CLI."""
    parser = argparse.ArgumentParser(
        prog="python -m mrigen.stack",
        description="Run PostgreSQL, SeaweedFS S3 and the MLflow tracking server on 127.0.0.1 (free ports), "
        "data, logs, pid files and generated credentials under DIR.",
        epilog="Example: python -m mrigen.stack up && eval \"$(python -m mrigen.stack env)\"",
    )
    parser.add_argument("command", choices=("up", "down", "status", "env"),
                        help="up: start (idempotent) and print the variables to export; down: stop all; "
                             "status: what runs where; env: print the export lines of a running stack")
    parser.add_argument("--dir", type=Path, default=Path(".stack"), help="stack directory (default: ./.stack)")
    parser.add_argument("--postgres-url", default=None,
                        help="use this existing PostgreSQL (postgresql://USER:PASSWORD@HOST:PORT/DB, a role "
                             "allowed to create the databases mlflow, mlflow_auth, optuna) instead of the embedded one")
    parser.add_argument("--bucket", default="mlflow", help="S3 bucket for MLflow artifacts (default: mlflow)")
    parser.add_argument("--auth", action="store_true",
                        help="enable MLflow basic auth (admin password generated into DIR/credentials.json)")
    parser.add_argument("--workers", type=int, default=1, help="MLflow server worker processes (default: 1)")
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="seconds to wait for each server to become healthy (default: 90)")
    return parser


def _print_env(stack: Stack) -> None:
    for key, value in stack.info().client_env().items():
        print(f"export {key}={shlex.quote(value)}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        config = StackConfig(directory=args.dir, bucket=args.bucket, auth=args.auth, workers=args.workers,
                             postgres_url=args.postgres_url, start_timeout_s=args.timeout)
        stack = Stack(config)
        if args.command == "up":
            t0 = time.monotonic()
            info = stack.up(progress=True)
            print(f"stack up in {time.monotonic() - t0:.1f} s; MLflow UI and tracking URI: {info.tracking_uri}")
            print(f"credentials: {stack.dir / 'credentials.json'} (0600); logs: {info.log_dir}")
            print("# export these to use it (they hold the database password: keep them out of logs):")
            _print_env(stack)
        elif args.command == "env":
            if not stack.is_running():
                raise StackError(f"the stack in {stack.dir} is not running: run `up` first")
            _print_env(stack)
        elif args.command == "down":
            killed = stack.down()
            note = f" (SIGKILL needed for: {', '.join(killed)})" if killed else ""
            print(f"stack in {stack.dir} stopped{note}")
        else:
            rows = stack.status()
            if not any(r.address for r in rows):
                print(f"no stack in {stack.dir}")
                return 1
            for r in rows:
                pid = f"pid {r.pid}" if r.pid else ""
                print(f"{r.name:9s} {r.state:9s} {r.address:28s} {pid:10s} {r.log}")
            return 0 if all(r.state in ("running", "external") for r in rows) else 1
    except (StackError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
