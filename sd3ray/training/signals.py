"""Ctrl-C and SIGTERM that keep the work: the first asks the loop to stop after the step in flight (it then saves
and names the checkpoint to resume from), a second one ends the process at once. Local mode installs it; the loop
only reads `requested`."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sd3ray.errors import Sd3rayError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Sd3rayError):
    """The run stopped on a signal, cleanly; the message names the checkpoint to resume from."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopRequest:
    """The first SIGINT/SIGTERM received, if any."""

    def __init__(self) -> None:
        self.requested: int | None = None

    def handle(self, signum: int, frame: object) -> None:
        if self.requested is not None:  # the second: leave now; checkpoints are renamed into place, never half-written
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.requested = signum
        print(f"\nsd3ray: {signal.Signals(signum).name} received: stopping after this step and saving "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Route SIGINT and SIGTERM to a StopRequest for the duration (main thread only; elsewhere nothing changes)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop.handle) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
