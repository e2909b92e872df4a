"""The integration tier's shared servers: one Ray head and one MLflow server for every test of this folder that a
pytest-xdist worker runs (one pair per worker), started on first use and stopped when the worker leaves the folder,
so that they do not idle beside the system tier's own cluster or the unit tier."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support import (
    S3_KEYS,
    free_port,
    http_status,
    ray_temp_dir,
    start_in_own_session,
    start_mlflow_server,
    stop_process_group,
    stop_ray_nodes,
    wait_until,
)


@pytest.fixture(scope="package")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, served artifacts), stopped after this tier."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="package")
def ray_head(tmp_path_factory: pytest.TempPathFactory):
    """A real Ray head on 127.0.0.1 with the job API, as README starts it, in a process group of its own that is
    stopped by PID when this tier ends (the system tier starts its own nodes; an idle head would only take CPU)."""
    import sys

    gcs_port, dashboard_port = free_port(), free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           # every process of this cluster (Ray's own helpers too) joins this cluster and no other on the machine
           "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
           # the keys of the tier's S3 server (tests.conftest.s3), so that a fit may keep its checkpoints there
           **S3_KEYS}
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
