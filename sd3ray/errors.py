"""The errors sd3ray expects and explains. Each message names the problem and the fix, so the jobs print it alone
(no traceback); anything else is a bug and stays loud. Every module's error type derives from `Sd3rayError`."""

from __future__ import annotations


class Sd3rayError(RuntimeError):
    """A problem with the user's input, data, storage or services, explained in the message."""


class ResourceError(Sd3rayError):
    """The cluster lacks what the run asks for (workers, GPUs, CPUs) and never will on its own."""


class DataError(Sd3rayError):
    """Data is missing or malformed; the message says where files go or how to make them."""


class StorageError(Sd3rayError):
    """A storage location cannot be opened or written (unreachable, read-only, or full)."""


def explained_error(exc: BaseException) -> Sd3rayError | None:
    """The Sd3rayError behind `exc`, if any: the exception itself, its explicit causes (`raise ... from`), or what a
    Ray worker or Tune trial raised (Ray wraps worker errors in its own types, keeping the original in `cause`,
    `worker_failures` or Train's `_base_exc`). An exception raised *while handling* an Sd3rayError (`__context__`
    only) is a bug in the handler and is not explained away."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, Sd3rayError):
            return current
        pending += [current.__cause__, getattr(current, "cause", None), getattr(current, "_base_exc", None),
                    getattr(current, "controller_failure", None)]
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            pending += list(failures.values())
    return None


class TrackingError(Sd3rayError):
    """The tracking backend cannot be reached or refused a request."""
