"""Shared fixtures. Real MNIST lives in ../shared/data (torchvision layout); tests never touch the network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# --cpu-table FILE: each test's cost in the machine's CPU seconds, beside its wall time (docs/testing.md)
from tests.cpu_table import (  # noqa: F401
    pytest_addoption,
    pytest_configure,
    pytest_runtest_protocol,
    pytest_terminal_summary,
)
from tests.support import (
    BUCKET,
    MICRO,
    MNIST_ROOT,
    REPO_ROOT,
    S3_KEYS,
    free_port,
    http_status,
    start_in_own_session,
    stop_process_group,
    wait_until,
)

# pytest-xdist runs one test file per core. torch's default is one thread per core in every process, and its OpenMP
# threads spin while they wait for one another: two processes of two threads on two cores ran a small training loop
# 40 times slower than either alone (140 s against 3.6 s; docs/testing.md). Each worker, and everything it starts
# (jobs, Ray nodes and their workers, which keep an OMP_NUM_THREADS they inherit), gets its share of the cores.
# xdist names the worker count before this file is imported; a serial run (-n 0) keeps torch's default.
_xdist_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _xdist_workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _xdist_workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Ray rewrites a loopback --node-ip-address to the machine's address and then listens on every interface, unless
# its single-machine mode is on: then every Ray server of the tests listens on 127.0.0.1 only. Ray reads this once,
# at import, so it is set before any test module imports ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# A local `ray.init()` turns on token auth and leaves ~/.ray/auth_token, which every later cluster then requires.
# The tests' cluster is reachable from this machine only; pin the mode so runs do not depend on leftovers.
os.environ["RAY_AUTH_MODE"] = "disabled"
# Ray Train's controller acts on what its workers did (started, reported a checkpoint, finished, died) when it next
# polls them, every 2 s by default: a few seconds of idle waiting per fit, and the suite runs dozens of fits. Every
# process of the tests' clusters inherits this (the nodes are started from this environment), and a restart test
# still restarts from the newest checkpoint (sd3ray.cluster.worker.die_like_a_lost_node waits two polls).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray Train's preemption watcher is one more actor process per fit (~3 CPU s of imports) that waits for a cloud's
# drain notices before spot nodes go; the tests' loopback clusters never send one (a lost node is killed, not
# drained). sd3ray leaves it out on the cluster it starts itself; on a joined cluster it runs, as Ray's default.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Test files run two at a time (pytest-xdist), so a fit's workers may take longer than Ray Train's 60 s to start
# while both cores import torch for the neighbouring file; a slow start is not what any test is about.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
# Tests never reach the network: a Hugging Face hub id fails at once instead of retrying for half a minute.
os.environ["HF_HUB_OFFLINE"] = "1"
# Caches (the judge's weights) stay with the tests, not in the user's home: one folder, ignored by git.
os.environ.setdefault("SD3RAY_CACHE", str(REPO_ROOT / "tests" / ".cache"))

TIERS = ("unit", "integration", "system")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """pyproject's `-n auto`: a worker per core, up to four. The tiers wait on process start-up more than they compute
    (one core is idle for much of a serial run), so two files at a time use a 2-core machine. Each worker starts its
    own integration-tier Ray head and MLflow server: the cap keeps a many-core machine from running one per core."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def _tier(item: pytest.Item) -> str | None:
    return next((part for part in Path(item.path).parts if part in TIERS), None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked with its tier, the folder it lives in, so `-m "not system"` selects by cost too.

    The costliest tier runs first: pytest-xdist hands each worker the next file in this order when it is free, so the
    system tier's long files start at once and the unit tier's many short ones fill the end, where they even out the
    workers' finishing times. Tiers stay contiguous, so a worker starts the integration tier's Ray head and MLflow
    server once, not each time it comes back to that folder."""
    for item in items:
        tier = _tier(item)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))
    run_first = {"system": 0, "integration": 1}
    items.sort(key=lambda item: run_first.get(_tier(item), 2))  # a stable sort: each tier keeps its own order


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    if not (MNIST_ROOT / "MNIST" / "raw").is_dir():
        pytest.fail(f"real MNIST not found at {MNIST_ROOT}/MNIST/raw; set SD3RAY_MNIST_ROOT")
    return MNIST_ROOT


@pytest.fixture(scope="session")
def mnist_parquet(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    """Real MNIST converted once per test session to Parquet (32×32)."""
    from sd3ray.data.mnist import prepare_mnist

    return prepare_mnist(mnist_root, tmp_path_factory.mktemp("parquet") / "mnist", image_size=32)


@pytest.fixture
def micro_config(mnist_parquet: Path, tmp_path: Path):
    """Build a tiny Config rooted in tmp_path: micro_config("train.steps=4", ...)."""
    from sd3ray.config import load_config

    def build(*overrides: str):
        return load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [
            *MICRO, f"data.parquet_dir={mnist_parquet}", f"train.output_dir={tmp_path / 'runs'}", *overrides])

    return build


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """moto's S3 server on 127.0.0.1 with one bucket; `uri(key)` names a key the way pyarrow and Ray open it."""
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    env = {**os.environ, **S3_KEYS}
    server = start_in_own_session([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                   str(port)], env, log)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(f"{endpoint}/moto-api/") == 200, server, log, "moto S3 server")
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        credentials = {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
        yield {"endpoint": endpoint, "client": client, "env": credentials,
               "uri": lambda key: f"s3://{BUCKET}/{key}?endpoint_override=127.0.0.1:{port}&scheme=http"}
    finally:
        stop_process_group(server)


@pytest.fixture(scope="session")
def mnist_splits(mnist_parquet: Path):
    """MNIST's train and test splits in memory, read once per session."""
    from sd3ray.data.format import read_split

    return read_split(mnist_parquet, "train"), read_split(mnist_parquet, "test")


@pytest.fixture(scope="session")
def judge_reference(mnist_splits):
    """The frozen MNIST judge and its reference statistics, trained once per session (then cached)."""
    from sd3ray.evaluation.judge import Reference, load_judge

    train, test = mnist_splits
    return Reference(load_judge(train), train, test)
