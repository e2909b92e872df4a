"""Shared fixtures. Real MNIST lives in ../shared/data (torchvision layout); tests never touch the network."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

# Ray rewrites a loopback --node-ip-address to the machine's address and then listens on every interface, unless
# its single-machine mode is on: then every Ray server of the tests listens on 127.0.0.1 only. Ray reads this once,
# at import, so it is set before any test module imports ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# A local `ray.init()` turns on token auth and leaves ~/.ray/auth_token, which every later cluster then requires.
# The tests' cluster is reachable from this machine only; pin the mode so runs do not depend on leftovers.
os.environ["RAY_AUTH_MODE"] = "disabled"

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_ROOT = Path(os.environ.get("SD3RAY_MNIST_ROOT", REPO_ROOT.parent / "shared" / "data"))


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
    from sd3ray.data import prepare_mnist

    return prepare_mnist(mnist_root, tmp_path_factory.mktemp("parquet") / "mnist", image_size=32)


MICRO = [  # a ~60k-parameter model: every loop test runs in seconds on CPU
    "model.width=32", "model.depth=2", "model.num_heads=2", "model.context_dim=32", "model.pooled_dim=32",
    "text.width=32", "text.depth=1", "text.num_heads=2", "train.batch_size=16", "train.warmup_steps=2",
    "sample.steps=2", "data.num_val_images=32", "eval.num_samples=0", "data.download=false",
]


@pytest.fixture
def micro_config(mnist_parquet: Path, tmp_path: Path):
    """Build a tiny Config rooted in tmp_path: micro_config("train.steps=4", ...)."""
    from sd3ray.config import load_config

    def build(*overrides: str):
        return load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [
            *MICRO, f"data.parquet_dir={mnist_parquet}", f"train.output_dir={tmp_path / 'runs'}", *overrides])

    return build


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int):
    """A real `mlflow server` on 127.0.0.1:port keeping its runs in root/mlflow.db and root/artifacts; returns the
    process (its session leader) once /health answers. Starting it again on the same root brings the same store
    back, as a restarted team server would."""
    import sys

    uri = f"http://127.0.0.1:{port}"
    log_path = root / f"server-{time.time_ns()}.log"
    proc = start_in_own_session(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        dict(os.environ), log_path)
    try:
        wait_until(lambda: http_status(f"{uri}/health") == 200, proc, log_path, "mlflow server")
    except BaseException:
        stop_process_group(proc)
        raise
    return proc


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, served artifacts), stopped after the session."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)


def start_in_own_session(command: list[str], env: dict[str, str], log_path: Path):
    """Start a server as the leader of a new session, so that it and everything it starts stop together."""
    import subprocess

    log = open(log_path, "w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()  # the child holds its own descriptor
    return proc


def wait_until(ready, proc, log_path: Path, what: str, timeout_s: float = 300.0) -> None:
    """Poll `ready()` until it is true; fail with the server's log if it dies or the time runs out (a loaded
    2-core machine can take minutes to start a server)."""
    deadline = time.time() + timeout_s
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            tail = log_path.read_text()[-3000:] if log_path.is_file() else ""
            raise RuntimeError(f"{what} did not start:\n{tail}")
        time.sleep(1)


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of a GET, or 0 when nothing answers."""
    import urllib.error
    import urllib.request

    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10).status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def ray_temp_dir() -> str:
    """A Ray node's own temp dir: it keeps the node's address file, sessions and runtime environments apart from
    every other Ray on the machine. Short, because Ray's Unix socket paths under it must stay under 108 bytes."""
    import tempfile

    return tempfile.mkdtemp(prefix="sd3ray-ray-")


def stop_process_group(proc, grace_s: float = 20.0) -> None:
    """Stop a server the tests started in its own session, and everything it started, by its process group only:
    never `ray stop` or a kill by name, which would end every Ray process on the machine."""
    import signal
    import subprocess

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # the group may outlive its leader for a moment: give the rest the same signal's chance, then check
            time.sleep(1)
            os.killpg(proc.pid, 0)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue


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
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


BUCKET = "sd3ray"


@pytest.fixture(scope="module")
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
