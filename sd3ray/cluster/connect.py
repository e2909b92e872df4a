"""Joining a Ray cluster, or starting a lean one on this machine when there is none: no dashboard, workers at nice 0,
no preemption watcher. A cluster that does not answer fails fast with what to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train

from sd3ray.errors import Sd3rayError


class ClusterUnreachable(Sd3rayError):
    """The Ray cluster sd3ray was told (or found) to join does not answer."""


def cluster_address() -> tuple[str | None, str]:
    """The cluster `ray.init()` would join and where that address comes from: $RAY_ADDRESS, else the address file
    that the last `ray start --head` on this machine wrote; (None, "") when Ray will start a local cluster."""
    from ray._common.utils import get_ray_address_file

    if address := os.environ.get("RAY_ADDRESS", "").strip():
        return address, "the RAY_ADDRESS environment variable"
    address_file = Path(get_ray_address_file(None))
    if address_file.is_file() and (address := address_file.read_text().strip()):
        return address, f"{address_file}, written by the last `ray start --head` on this machine"
    return None, ""


def gcs_answers(address: str, timeout_s: float) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


DASHBOARD_ENV = "SD3RAY_RAY_DASHBOARD"


# Ray starts its workers at nice 15 (worker_niceness), so on a busy machine a Train worker loses every CPU
# contest with the driver and Ray's own daemons. On the cluster sd3ray starts for one run, the worker is the run.
WORKER_NICENESS = 0
# Ray Train's preemption watcher polls for node drain notices that a single machine never receives.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def local_cluster_options() -> dict[str, Any]:
    """How sd3ray starts the one-machine cluster a run without a cluster gets: workers at nice 0, no dashboard and
    no metrics export unless SD3RAY_RAY_DASHBOARD=1. On a small machine those daemons take CPU from the training
    step (docs/performance.md: Ray Train against local mode); a run on one machine has the console and MLflow to
    watch instead."""
    system = {"worker_niceness": WORKER_NICENESS}
    if os.environ.get(DASHBOARD_ENV, "") not in ("", "0"):
        return {"include_dashboard": True, "_system_config": system}
    return {"include_dashboard": False, "_system_config": {**system, "enable_metrics_collection": False}}


class OwnCluster:
    """Whether this driver started the cluster it runs on (and so ends it when it exits)."""

    started = False


def lean_for_own_cluster() -> None:
    """On a cluster this driver started, the Train controller needs no preemption watcher (a single machine gets
    no drain notices); the placement-group cleaner is left out by `own_cluster_trainer`."""
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")  # Ray propagates it from the driver to the controller


TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def quiet_token_notices(own_cluster: bool) -> Iterator[None]:
    """A cluster this driver starts turns on Ray's token auth and says so in two log lines on every run (the token
    is kept in ~/.ray/auth_token; docs/distributed.md says when a later `ray start` needs it). They are left out
    of the console, so Ray's one start-up line is "Started a local Ray instance"."""
    if not own_cluster:
        yield
        return
    setup_logger, drop = logging.getLogger(TOKEN_SETUP_LOGGER), logging.Filter("sd3ray.never")
    setup_logger.addFilter(drop)  # a filter with another name passes no record
    try:
        yield
    finally:
        setup_logger.removeFilter(drop)


# Addresses with which `ray.init()` starts a new cluster on this machine instead of joining one: no address, and
# Ray's documented "local" (which ignores a running cluster and its address file).
STARTS_OWN_CLUSTER = (None, "local")


@contextlib.contextmanager
def own_session_processes() -> Iterator[None]:
    """While `ray.init()` starts a cluster, its processes (GCS, raylet, and through the raylet every Ray worker)
    start in a session of their own, outside the driver's process group.

    `timeout`, Slurm, systemd and a terminal signal a whole process group. Ray blocks SIGINT in the processes it
    starts, but not SIGTERM: a SIGTERM to the group ended the GCS and raylet while the driver was still stopping
    its workers after a step, so no checkpoint was saved. Out of the group, only the driver gets the signal and
    stops the run as a signal to it alone does (sd3ray.cluster.stop). They still end with the driver: Ray ties
    them to it with the kernel's parent-death signal, and `ray.shutdown()` stops them by PID.

    Ray has no public option for this. Its process launcher (`ray._private.services.ConsolePopen`) gets
    `start_new_session` only where the kernel ties children to their parent (Linux); elsewhere, or where a Ray
    version lacks that class, nothing changes and Ray's reaper, which signals the driver's group, stays in charge.
    """
    from ray._private import services, utils

    launcher = getattr(services, "ConsolePopen", None)
    if launcher is None or os.name != "posix" or not utils.detect_fate_sharing_support():
        yield
        return

    class OwnSessionPopen(launcher):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnSessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = launcher


def connect(timeout_s: float = 10.0) -> None:
    """Join $RAY_ADDRESS / the cluster a `ray job submit` runs on / the one `ray start` left, or start a local one.

    Ray itself retries a dead address for as long as it takes (minutes, forever for a stale address file); a
    cluster that does not answer within `timeout_s` ends here instead, with what to do about it.
    """
    if ray.is_initialized():
        return
    address, source = cluster_address()
    if address and ":" in address and not address.startswith(("ray://", "local", "auto")) \
            and not gcs_answers(address, timeout_s):
        stale_file = "" if source.startswith("the RAY_ADDRESS") else f" (or delete {source.split(',')[0]})"
        raise ClusterUnreachable(
            f"the Ray cluster at {address} (from {source}) does not answer within {timeout_s:g} s. Start it again, "
            f"point RAY_ADDRESS at a live cluster, or run on a fresh local cluster: unset RAY_ADDRESS{stale_file}.")
    own = address in STARTS_OWN_CLUSTER
    try:
        with quiet_token_notices(own_cluster=own), own_session_processes() if own else contextlib.nullcontext():
            ray.init(address=address, **(local_cluster_options() if own else {}))
        OwnCluster.started = own
    except ConnectionError as exc:
        raise ClusterUnreachable(f"cannot join the Ray cluster at {address} (from {source}): {exc}") from exc


def cluster_gpus() -> float:
    """GPUs in the cluster sd3ray joins (connecting first)."""
    connect()
    return ray.cluster_resources().get("GPU", 0)
