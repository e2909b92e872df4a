"""The outbox's rules on their own: order, retry after failures, the memory bound, rejections, closing."""

from __future__ import annotations

import threading
import time

from sd3ray.tracking.outbox import Outbox, Write, is_permanent


class Rejected(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status

    def get_http_status_code(self) -> int:
        return self.status


class FlakyStore:
    """Refuses every write while `down` is set, like a stopped server; records what it accepts, in order."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.received: list[int] = []

    def write(self, value: int) -> Write:
        def apply() -> None:
            if self.down.is_set():
                raise ConnectionError("connection refused")
            self.received.append(value)

        return Write(apply, f"value {value}", record={"value": value})


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def test_writes_made_during_an_outage_arrive_in_order_once_it_ends() -> None:
    store, said = FlakyStore(), []
    outbox = Outbox("store", retry_s=0.05, say=said.append)
    store.down.set()
    for value in range(20):
        outbox.put(store.write(value))
    wait_for(lambda: outbox.outage_started is not None)
    assert store.received == [] and outbox.pending == 20
    store.down.clear()
    assert outbox.close(timeout_s=30) == []
    assert store.received == list(range(20))
    assert any("unreachable" in line for line in said) and any("is back" in line for line in said)


def test_the_memory_bound_drops_the_oldest_writes_and_counts_them() -> None:
    store, said = FlakyStore(), []
    outbox = Outbox("store", max_pending=10, retry_s=0.05, say=said.append)
    store.down.set()
    for value in range(25):
        outbox.put(store.write(value))
    assert outbox.dropped == 15 and outbox.pending == 10
    store.down.clear()
    outbox.close(timeout_s=30)
    assert store.received == list(range(15, 25))
    assert any("15 tracker write(s) dropped" in line or "1 tracker write(s) dropped" in line for line in said)


def test_a_rejected_write_is_dropped_without_blocking_the_rest() -> None:
    received, said = [], []

    def reject() -> None:
        raise Rejected(400)

    outbox = Outbox("store", retry_s=0.05, say=said.append)
    outbox.put(Write(lambda: received.append(1), "first"))
    outbox.put(Write(reject, "bad"))
    outbox.put(Write(lambda: received.append(3), "third"))
    assert outbox.close(timeout_s=30) == []
    assert received == [1, 3] and outbox.rejected == 1 and any("rejected bad" in line for line in said)


def test_close_returns_what_never_went_out_when_the_store_stays_down() -> None:
    store = FlakyStore()
    outbox = Outbox("store", retry_s=0.05, say=lambda _: None)
    store.down.set()
    for value in range(3):
        outbox.put(store.write(value))
    left = outbox.close(timeout_s=0.3)
    assert [write.record["value"] for write in left] == [0, 1, 2] and store.received == []


def test_only_client_errors_are_permanent() -> None:
    assert is_permanent(Rejected(400)) and is_permanent(Rejected(403))
    assert not is_permanent(Rejected(429)) and not is_permanent(Rejected(503))
    assert not is_permanent(ConnectionError("refused"))


def test_flush_waits_for_delivery_but_not_for_an_outage() -> None:
    store = FlakyStore()
    outbox = Outbox("store", retry_s=0.05, say=lambda _: None)
    for value in range(50):
        outbox.put(store.write(value))
    assert outbox.flush(timeout_s=30) and store.received == list(range(50))
    store.down.set()
    outbox.put(store.write(50))
    wait_for(lambda: outbox.outage_started is not None)
    began = time.monotonic()
    assert not outbox.flush(timeout_s=30) and time.monotonic() - began < 5
    store.down.clear()
    assert outbox.close(timeout_s=30) == [] and store.received == list(range(51))
