"""Train a slice store's feature network in a child process, on one core, while the first model trains.

The feature network (mrigen.metrics.features: by default three networks, ~65 s each on one core at 64 px) is
trained once per store, when the first evaluation needs it: with one network that was ~40 s of a 3-minute `make
tune`. A network gains little from a second core (300 of its steps: 12.5 s on one thread, 10.7 s on two) while a
model's training gains much more (the preview's VAE: 209 vs 340 img/s), so the two side by side, one core each,
finish sooner than one after the other (bench/RESULTS.md, session 19). `mrigen.tune`, `python -m mrigen.train` and
`bench/quality.py` start it on a CPU.

`start_feature_net` starts the child (`python -m mrigen.metrics.background --store DIR --digest SHA --members K`)
and gives this process's training the remaining threads; `poll` (each epoch of a tuning trial) gives them back once
the child has ended, and the first `get_feature_net` call for the store waits for the child if it still runs, then
loads the file the child cached. If the child failed, that call says so and trains the network itself. The network
is the same either way: `train_feature_net` trains on `CPU_THREADS` threads on any CPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .features import (_PENDING, CPU_THREADS, StoreLike, cache_path, default_config, save_feature_net,
                       train_feature_net)

__all__ = ["BackgroundFeatureNet", "poll", "start_feature_net"]

log = logging.getLogger(__name__)


class BackgroundFeatureNet:
    """A child process that trains `store`'s feature network of `members` networks and caches it
    (`cache_path(store, members)`).

    While it runs, this process computes on `torch.get_num_threads() - CPU_THREADS` threads (at least one);
    `wait`, `poll` or `close` gives the threads back. Registered with `get_feature_net`, which waits for it before
    it looks for the cached file.
    """

    def __init__(self, store: StoreLike, members: int) -> None:
        self.path = cache_path(store, members)
        self._threads_before = torch.get_num_threads()
        package_root = str(Path(__file__).resolve().parents[2])           # the child imports this same mrigen
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "mrigen.metrics.background", "--store", str(store.path), "--digest", store.digest,
             "--members", str(members)],
            env=env, stdin=subprocess.DEVNULL)
        self._started = time.monotonic()
        self._ended = False
        torch.set_num_threads(max(1, self._threads_before - CPU_THREADS))
        _PENDING[self.path] = self.wait
        _RUNNING.append(self)

    @property
    def running(self) -> bool:
        """True until `wait`, `poll` or `close` has ended it."""
        return not self._ended

    def wait(self) -> bool:
        """Block until the child ends and give this process its threads back.

        Returns:
            True if the child cached the network at `self.path`; False (after a warning naming the exit code) if it
            failed, in which case the caller trains the network itself.
        """
        if not self._ended:
            self._process.wait()
            self._end()
            if self.cached:
                log.info("feature network %s trained in a background process (%.0f s after it started)",
                         self.path.name, time.monotonic() - self._started)
            else:
                log.warning("training the feature network in a background process failed (exit code %s; its error "
                            "is printed above); training it here instead", self._process.returncode)
        return self.cached

    @property
    def cached(self) -> bool:
        """True once the child has ended successfully and its network is in the cache file."""
        return self._process.returncode == 0 and self.path.is_file()

    def poll(self) -> None:
        """If the child has ended, end it here as `wait` does (this process gets its threads back); never blocks."""
        if not self._ended and self._process.poll() is not None:
            self.wait()

    def close(self) -> None:
        """Stop the child if it still runs (nothing needed the network), and give this process its threads back."""
        if self._ended:
            return
        if self._process.poll() is None:
            self._process.terminate()
            log.info("stopped training the feature network in the background: nothing needed it")
        self._process.wait()
        self._end()

    def _end(self) -> None:
        self._ended = True
        if _PENDING.get(self.path) == self.wait:
            del _PENDING[self.path]
        if self in _RUNNING:
            _RUNNING.remove(self)
        torch.set_num_threads(self._threads_before)


_RUNNING: list[BackgroundFeatureNet] = []       # started and not yet ended (see `poll`)


def poll() -> None:
    """End every background training whose child has finished, so this process gets its threads back before a
    caller needs the network (a training hook calls it each epoch); never blocks."""
    for job in list(_RUNNING):
        job.poll()


def start_feature_net(store: StoreLike, device: torch.device | str, members: int | None = None
                      ) -> BackgroundFeatureNet | None:
    """Train `store`'s feature network of `members` networks (None: `default_config()`'s) in a background process
    when that can save time; else return None.

    It can when the network will be trained on the CPU (`device`), is not cached yet and not already being trained,
    this process has at least two threads to share, and the store's directory is writable (the child hands the
    network over through the cache file).
    """
    members = default_config().members if members is None else members
    path = cache_path(store, members)
    if (torch.device(device).type != "cpu" or path.is_file() or path in _PENDING
            or torch.get_num_threads() <= CPU_THREADS or not os.access(Path(store.path), os.W_OK)):
        return None
    return BackgroundFeatureNet(store, members)


def main(argv: list[str] | None = None) -> int:
    """The child process: open the store, check it is the one the parent meant, train and cache its network."""
    parser = argparse.ArgumentParser(prog="python -m mrigen.metrics.background",
                                     description="Train and cache a slice store's feature network (started by "
                                                 "mrigen.tune, mrigen.train and bench/quality.py while the first "
                                                 "model trains).")
    parser.add_argument("--store", required=True, help="slice store directory")
    parser.add_argument("--digest", required=True, help="the store digest the caller expects")
    parser.add_argument("--members", type=int, default=None,
                        help="networks in the ensemble (default: MRIGEN_FEATURE_NET_MEMBERS, else 3)")
    args = parser.parse_args(argv)
    from mrigen.data import SliceStore, StoreError

    try:
        store = SliceStore.open(args.store)
        if store.digest != args.digest:
            raise ValueError(f"--store {args.store}: its digest is {store.digest[:12]}, not the {args.digest[:12]} "
                             "the caller opened (the store changed)")
        cfg = default_config(args.members)
        net, summary = train_feature_net(store, cfg, progress=False)
        save_feature_net(net, cache_path(store, cfg.members), store_digest=store.digest, summary=summary)
    except (StoreError, ValueError, OSError) as exc:
        print(f"mrigen.metrics.background: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
