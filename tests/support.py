"""What the tests share besides fixtures: the repository's paths, the micro model, and the helpers that start and
stop real servers (always by their own process group, never by name)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import yaml

from sd3ray.data.format import write_split
from sd3ray.tracking.mlflow_tracker import WITHOUT_JOB_RUNNERS

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_ROOT = Path(os.environ.get("SD3RAY_MNIST_ROOT", REPO_ROOT.parent / "shared" / "data"))


MICRO = [  # a ~60k-parameter model: every loop test runs in seconds on CPU
    "model.width=32", "model.depth=2", "model.num_heads=2", "model.context_dim=32", "model.pooled_dim=32",
    "text.width=32", "text.depth=1", "text.num_heads=2", "train.batch_size=16", "train.warmup_steps=2",
    "sample.steps=2", "data.num_val_images=32", "eval.num_samples=0", "data.download=false",
]


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
        {**os.environ, **WITHOUT_JOB_RUNNERS}, log_path)  # as sd3ray and infra/mlflow/serve.sh run it
    try:
        wait_until(lambda: http_status(f"{uri}/health") == 200, proc, log_path, "mlflow server")
    except BaseException:
        stop_process_group(proc)
        raise
    return proc


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
    stop_process_groups([proc], grace_s)


# `ray start --block` takes over 30 s to leave after SIGTERM (measured; its node's processes longer still), and a
# test node keeps nothing worth a graceful shutdown: its temp dir is removed after it, so it gets SIGKILL soon.
RAY_NODE_GRACE_S = 2.0


def stop_ray_nodes(procs: list) -> None:
    """Stop Ray nodes the tests started with `ray start --block`, each in a session of its own."""
    stop_process_groups(procs, RAY_NODE_GRACE_S)


def stop_process_groups(procs: list, grace_s: float = 20.0) -> None:
    """Stop several such servers at once: each gets SIGTERM together, so their shutdowns overlap, then SIGKILL
    whatever is left of a group after `grace_s`."""
    import signal
    import subprocess

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        pending = []
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
                pending.append(proc)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + wait
        for proc in pending:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        time.sleep(1)  # a group may outlive its leader for a moment
        procs = [proc for proc in pending if _group_alive(proc.pid)]
        if not procs:
            return


def group_processes(pgid: int) -> dict[Path, list[str]]:
    """The live processes in process group `pgid`: each one's /proc folder and its command line."""
    processes = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == pgid:
                processes[entry] = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue  # it ended while being read
    return processes


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


BUCKET = "sd3ray"
# the keys moto's S3 server takes (tests.conftest.s3): fixed, so that a Ray head started before the server has them
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def numbered_set(path: Path, n: int, shard_size: int) -> Path:
    """n captioned 3×8×8 images whose label is their row number, so a test can tell which rows it was given."""
    images = np.random.default_rng(0).integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
    write_split(path, "train", images, np.arange(n), [f"image {i}" for i in range(n)], shard_size=shard_size)
    write_split(path, "test", images[:16], np.arange(16), [f"image {i}" for i in range(16)])
    return path


def sweep_file(tmp_path: Path, mnist_parquet: Path, name: str, widths: list[int], **extra) -> Path:
    spec = {
        "base_config": str(REPO_ROOT / "configs/mnist_tiny.yaml"),
        "overrides": [*MICRO, f"data.parquet_dir={mnist_parquet}", "train.steps=6", "train.eval_every=2",
                      "train.ckpt_every=2", "train.log_every=2", f"train.output_dir={tmp_path / 'runs'}",
                      f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.experiment={name}"],
        "name": name, "storage_path": str(tmp_path / "tune"), "metric": "loss/val", "mode": "min",
        "widths": widths, "head_dim": 16,
        "schemes": [{"scheme": "uniform"}, {"scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}],
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
