"""Shared fixtures. Real MNIST lives in ../shared/data (torchvision layout); tests never touch the network."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.support import (
    BUCKET,
    MICRO,
    MNIST_ROOT,
    REPO_ROOT,
    free_port,
    http_status,
    ray_temp_dir,
    start_in_own_session,
    start_mlflow_server,
    stop_process_group,
    stop_ray_nodes,
    wait_until,
)

# Ray rewrites a loopback --node-ip-address to the machine's address and then listens on every interface, unless
# its single-machine mode is on: then every Ray server of the tests listens on 127.0.0.1 only. Ray reads this once,
# at import, so it is set before any test module imports ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# A local `ray.init()` turns on token auth and leaves ~/.ray/auth_token, which every later cluster then requires.
# The tests' cluster is reachable from this machine only; pin the mode so runs do not depend on leftovers.
os.environ["RAY_AUTH_MODE"] = "disabled"
# Tests never reach the network: a Hugging Face hub id fails at once instead of retrying for half a minute.
os.environ["HF_HUB_OFFLINE"] = "1"
# Caches (the judge's weights) stay with the tests, not in the user's home: one folder, ignored by git.
os.environ.setdefault("SD3RAY_CACHE", str(REPO_ROOT / "tests" / ".cache"))

TIERS = ("unit", "integration", "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked with its tier, the folder it lives in, so `-m "not system"` selects by cost too."""
    for item in items:
        tier = next((part for part in Path(item.path).parts if part in TIERS), None)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))


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
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, served artifacts), stopped after the session."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory):
    """A real Ray head on 127.0.0.1 with the job API, as README starts it, in a process group of its own that is
    stopped by PID afterwards."""
    import sys

    gcs_port, dashboard_port = free_port(), free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           # every process of this cluster (Ray's own helpers too) joins this cluster and no other on the machine
           "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}
    temp_dir = ray_temp_dir()
    log_path = tmp_path_factory.mktemp("ray-head") / "head.log"
    # --block keeps `ray start` in the foreground as the leader of the new session, so the whole node (GCS,
    # raylet, dashboard, workers) shares its process group
    head = start_in_own_session(
        ["ray", "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--port",
         str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--dashboard-agent-listen-port", str(free_port()), "--include-dashboard", "true", "--temp-dir", temp_dir,
         "--disable-usage-stats"], env, log_path)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:  # the job API answers a little after the node is up
        wait_until(lambda: http_status(f"{dashboard}/api/version") != 0, head, log_path, "the Ray head's job API")
        import ray

        ray.init(address=f"127.0.0.1:{gcs_port}")  # this process drives TorchTrainer and Tuner fits directly
        yield {"address": f"127.0.0.1:{gcs_port}", "dashboard": dashboard, "env": env}
    finally:
        import ray

        ray.shutdown()
        stop_ray_nodes([head])
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """moto's S3 server on 127.0.0.1 with one bucket; `uri(key)` names a key the way pyarrow and Ray open it."""
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
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
