"""Ctrl-C, SIGTERM and `ray job stop` under Ray, as in local mode: the run stops within a few steps, saves, and the
driver names the checkpoint to resume from and exits 130 or 143.

The signal reaches the driver only (Ray's workers are not its children), so the driver relays it: a small actor
holds the first signal received, and each worker polls it from a thread. Every rank must stop at the same step, to
report the same checkpoint, so several ranks agree on the largest signal seen every few steps
(`RayContext.stop_signal`). Ray Train's own SIGINT handler, which aborts the workers without a checkpoint, is left
out (`Sd3rayTrainer`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from sd3ray.training.signals import StopRequest, stop_on_signals

RELAY_EVERY_S = 0.2  # how often the driver looks for a signal to pass on
POLL_EVERY_S = 0.5  # how often a worker asks whether one came


@ray.remote(num_cpus=0)
class StopFlag:
    """The first signal the driver received, for the workers to read."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def set(self, signum: int) -> None:
        self.signum = self.signum or signum

    def get(self) -> int | None:
        return self.signum


@contextmanager
def relayed_stop() -> Iterator[tuple[StopRequest, Any]]:
    """Driver side: SIGINT/SIGTERM go to a StopRequest (a second one exits at once), and the first is passed on to
    the flag the workers poll. Yields the request and the flag's handle (for the trainer's loop config)."""
    flag = StopFlag.remote()
    done = threading.Event()
    with stop_on_signals() as stop:

        def relay() -> None:  # not in the signal handler: a Ray call there could re-enter a blocked ray.get
            while not done.wait(RELAY_EVERY_S):
                if stop.requested is not None:
                    flag.set.remote(stop.requested)
                    return

        threading.Thread(target=relay, name="sd3ray-stop-relay", daemon=True).start()
        try:
            yield stop, flag
        finally:
            done.set()


class StopWatcher:
    """Worker side: polls the driver's flag in a daemon thread; `requested` is the signal number once there is one.
    A flag that is gone (its driver died) stops the polling; Ray then ends the workers itself."""

    def __init__(self, flag: Any, every_s: float = POLL_EVERY_S) -> None:
        self.requested: int | None = None
        self._flag, self._every_s = flag, every_s
        threading.Thread(target=self._poll, name="sd3ray-stop-watch", daemon=True).start()

    def _poll(self) -> None:
        while self.requested is None:
            try:
                self.requested = ray.get(self._flag.get.remote(), timeout=30)
            except Exception:  # the driver and its flag are gone
                return
            time.sleep(self._every_s)
