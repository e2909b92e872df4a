"""The unit tier: no Ray, no servers, no subprocesses, so it runs in a few minutes on two cores. The guard makes
that rule fail loudly instead of drifting: a test here that starts a process or a Ray cluster belongs in
tests/integration."""

from __future__ import annotations

import subprocess

import pytest

# Processes that only answer a question and exit (the tracker's commit tag, the platform module's uname).
ALLOWED_COMMANDS = {"git", "uname"}


@pytest.fixture(autouse=True)
def _no_processes_or_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    real_init = subprocess.Popen.__init__

    def guarded_init(self, args, *rest, **kwargs):
        program = args[0] if isinstance(args, (list, tuple)) else str(args).split()[0]
        if str(program).rsplit("/", 1)[-1] not in ALLOWED_COMMANDS:
            raise AssertionError(f"a unit test started a process ({program}); move it to tests/integration")
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_init)
    try:
        import ray
    except ImportError:
        return

    def no_cluster(*args, **kwargs):
        raise AssertionError("a unit test started Ray; move it to tests/integration")

    monkeypatch.setattr(ray, "init", no_cluster)
