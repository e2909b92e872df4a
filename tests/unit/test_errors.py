"""Which exceptions the jobs explain in one line, and which stay loud."""

from __future__ import annotations

from sd3ray.checkpoint import CheckpointError
from sd3ray.errors import explained_error


def _raise(make):
    try:
        make()
    except BaseException as exc:
        return exc
    raise AssertionError("nothing raised")


def test_an_explained_error_is_found_through_its_causes_and_ray_wrappers() -> None:
    original = CheckpointError("checkpoint x is corrupt")

    def wrapped() -> None:
        try:
            raise original
        except CheckpointError as exc:
            raise RuntimeError("wrapper") from exc

    assert explained_error(_raise(wrapped)) is original

    class WorkerGroupError(Exception):  # the shape of Ray Train's: failures by rank, each wrapped once more
        def __init__(self, failures: dict) -> None:
            self.worker_failures = failures

    class UserExceptionWithTraceback(Exception):
        def __init__(self, exc: BaseException) -> None:
            self._base_exc = exc

    ray_error = WorkerGroupError({0: UserExceptionWithTraceback(original)})
    assert explained_error(ray_error) is original


def test_a_bug_in_an_error_handler_stays_loud() -> None:
    def buggy_handler() -> None:
        try:
            raise CheckpointError("expected")
        except CheckpointError:
            {}["missing"]  # a KeyError while handling it is a bug, not the expected error

    assert explained_error(_raise(buggy_handler)) is None
    assert explained_error(KeyError("x")) is None
