"""Tracker writes delivered in order by one background thread, so training never waits on the tracking server.

While the server is down (restarting, a network blip, a locked SQLite file), writes wait here, in order, and the
thread retries the oldest one every `retry_s`; when the server answers again they go out in the order they were
made. Metrics carry the timestamp of when they were recorded, so a write re-sent after a lost reply is the same
row to MLflow, which keeps one copy: no step is duplicated.

Memory is bounded: at most `max_pending` writes wait (images count `IMAGE_WEIGHT` each). When the bound is reached
the oldest waiting write is dropped, counted and reported. A write the server rejects for good (a 4xx answer:
bad request, no permission) is dropped with a warning instead of blocking every write behind it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

IMAGE_WEIGHT = 50  # an image grid weighs about as much memory as 50 metric batches


@dataclass
class Write:
    """One tracker call, ready to run. `weight` is its share of the memory bound."""

    apply: Callable[[], None]
    what: str
    weight: int = 1
    record: dict[str, Any] | None = None  # what the write carries, in JSON, to save if it is never delivered
    image: Any = None  # an image's pixels (uint8 array), saved beside the record if it is never delivered


def is_permanent(exc: BaseException) -> bool:
    """A rejection that retrying cannot fix: an HTTP 4xx other than 408/429 from the tracking server."""
    status = getattr(exc, "get_http_status_code", lambda: None)()
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


class Outbox:
    """A FIFO of writes drained by one daemon thread. `put` never blocks on the network."""

    def __init__(self, where: str, max_pending: int = 20_000, retry_s: float = 5.0,
                 say: Callable[[str], None] = print) -> None:
        self.where, self.max_pending, self.retry_s, self.say = where, max_pending, retry_s, say
        self._queue: deque[Write] = deque()
        self._weight = 0
        self._cond = threading.Condition()
        self._closed = False
        self.outage_started: float | None = None
        self.delivered = self.dropped = self.rejected = 0
        self._thread = threading.Thread(target=self._run, name="sd3ray-tracker-outbox", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)  # the write being delivered stays first in the queue until it is done

    def put(self, write: Write) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("Outbox.put after close")
            self._queue.append(write)
            self._weight += write.weight
            while self._weight > self.max_pending and len(self._queue) > 1:
                dropped = self._queue.popleft()
                self._weight -= dropped.weight
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    self.say(f"sd3ray: warning: {self.dropped} tracker write(s) dropped (oldest first) while "
                             f"{self.where} is unreachable; at most {self.max_pending} wait in memory")
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                write = self._queue[0]
            ok = self._deliver(write)
            with self._cond:
                if ok and self._queue and self._queue[0] is write:
                    self._queue.popleft()
                    self._weight -= write.weight
                self._cond.notify_all()
            if not ok:
                time.sleep(self.retry_s)

    def _deliver(self, write: Write) -> bool:
        """True when the write is done with (delivered, or rejected for good); False to retry it later."""
        try:
            write.apply()
        except Exception as exc:
            if is_permanent(exc):
                self.rejected += 1
                self.say(f"sd3ray: warning: {self.where} rejected {write.what}; dropped it: {exc}")
                return True
            if self.outage_started is None:
                self.outage_started = time.monotonic()
                self.say(f"sd3ray: warning: {self.where} is unreachable ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); training goes on and tracker "
                         f"writes wait in memory, retried every {self.retry_s:g} s")
            return False
        self.delivered += 1
        if self.outage_started is not None:
            down = time.monotonic() - self.outage_started
            self.outage_started = None
            self.say(f"sd3ray: {self.where} is back after {down:.0f} s; delivering the {self.pending - 1} write(s) "
                     f"that waited")
        return True

    def flush(self, timeout_s: float) -> bool:
        """Wait (up to `timeout_s`) until every write so far is delivered, unless the store is down: then return at
        once, since waiting would stall training for the length of the outage. True when nothing is waiting."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue and self.outage_started is None and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(timeout=min(left, 1.0))
            return not self._queue

    def close(self, timeout_s: float) -> list[Write]:
        """Stop taking writes, wait up to `timeout_s` for the queue to drain, and return what was not delivered."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            if self._queue and self.outage_started is not None:
                self.say(f"sd3ray: waiting up to {timeout_s:g} s for {self.where} to take {len(self._queue)} "
                         f"waiting write(s)")
            while self._queue and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(timeout=min(left, 1.0))
            rest = list(self._queue)
            self._queue.clear()
            self._weight = 0
        return rest
