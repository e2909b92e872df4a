"""The cluster path, live: a Ray head (127.0.0.2) and a worker node (127.0.0.3), each with one CPU so that two
workers span both; an S3-compatible server (moto) holding the data and the checkpoints; the team MLflow server
(infra/mlflow/serve.sh: PostgreSQL backend store, artifacts proxied to S3, basic auth); and a node that dies under
a sweep whose trials and checkpoints live in the bucket.

Every server listens on loopback, is started here in its own process group, and is stopped by that group alone.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.support import (
    BUCKET,
    MICRO,
    REPO_ROOT,
    free_port,
    http_status,
    ray_temp_dir,
    start_in_own_session,
    stop_process_group,
    stop_ray_nodes,
    wait_until,
)

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
ADMIN = ("admin", "multinode-Passw0rd")


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} not found: apt-get install -y postgresql (.ci/run does)")
    return str(found)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL on 127.0.0.1 (initdb in a temp folder; as the `postgres` user when run as root,
    which PostgreSQL refuses to run as)."""
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="sd3ray-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    data, port, log = root / "data", free_port(), root / "postgres.log"
    subprocess.run([*as_user, _postgres_bin("initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust"],
                   check=True, capture_output=True, timeout=300)
    server = start_in_own_session([*as_user, _postgres_bin("postgres"), "-D", str(data), "-p", str(port), "-k",
                                   str(root), "-c", "listen_addresses=127.0.0.1"], dict(os.environ), log)
    try:
        def accepting() -> bool:
            ready = [_postgres_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port)]
            return subprocess.run(ready, capture_output=True).returncode == 0

        wait_until(accepting, server, log, "PostgreSQL")
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "-d", "postgres", "-c",
                        "CREATE DATABASE mlflow"], check=True, capture_output=True, timeout=60)
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        stop_process_group(server)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def team_mlflow(s3, postgres, tmp_path_factory: pytest.TempPathFactory):
    """infra/mlflow/serve.sh: PostgreSQL backend store, artifacts proxied to the S3 server, basic auth."""
    port = free_port()
    log = tmp_path_factory.mktemp("team-mlflow") / "server.log"
    env = {**os.environ, **s3["env"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_S3_ENDPOINT_URL": s3["endpoint"], "MLFLOW_BACKEND_STORE_URI": postgres,
           "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow", "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "multinode-test", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1"}
    server = start_in_own_session(["bash", str(REPO_ROOT / "infra/mlflow/serve.sh")], env, log)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_status(f"{uri}/health") == 200, server, log, "the team MLflow server")
        yield uri
    finally:
        stop_process_group(server)


class Cluster:
    """A Ray head and worker nodes on loopback addresses, each `ray start --block` in its own process group."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.port, self.dashboard_port = free_port(), free_port()
        # every process of this cluster (Ray's own helpers too) joins it and no other Ray on the machine
        self.env = {**env, "RAY_ADDRESS": f"{HEAD_IP}:{self.port}"}
        self.temp_dirs: list[str] = []
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: dict[str, subprocess.Popen] = {}

    def start_node(self, ip: str) -> None:
        head = not self.nodes
        log = self.root / f"node-{ip}.log"
        # each node gets its own temp dir: nodes on one machine would otherwise share (and clean up) each
        # other's runtime environments, which a real cluster's separate disks never do
        self.temp_dirs.append(ray_temp_dir())
        common = ["--block", "--num-cpus", "1", "--node-ip-address", ip, "--disable-usage-stats",
                  "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", self.temp_dirs[-1]]
        if head:
            command = ["ray", "start", "--head", *common, "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                       "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true"]
        else:
            command = ["ray", "start", *common, "--address", f"{HEAD_IP}:{self.port}"]
        self.nodes[ip] = start_in_own_session(command, self.env, log)
        wait_until(lambda: self.alive_nodes().count(ip) == 1, self.nodes[ip], log, f"Ray node {ip}")
        if head:
            wait_until(lambda: http_status(f"{self.dashboard}/api/version") == 200, self.nodes[ip], log,
                       "the Ray job API")

    def alive_nodes(self) -> list[str]:
        import json
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.dashboard}/nodes?view=summary", timeout=5) as reply:
                summary = json.load(reply)["data"]["summary"]
        except (OSError, KeyError, ValueError):
            return []
        return [n["raylet"]["nodeManagerAddress"] for n in summary if n["raylet"]["state"] == "ALIVE"]

    def kill_node(self, ip: str) -> None:
        """A lost node: its raylet and every worker on it die at once, without cleanup."""
        import signal

        os.killpg(self.nodes[ip].pid, signal.SIGKILL)
        self.nodes.pop(ip).wait(timeout=30)

    def submit(self, *args: str, submission_id: str | None = None, job: str = "jobs/train.py"
               ) -> subprocess.CompletedProcess:
        """`ray job submit -- python JOB ARGS`; with a submission id it returns once the job is queued."""
        queued = ["--no-wait", "--submission-id", submission_id] if submission_id else []
        command = ["ray", "job", "submit", "--address", self.dashboard, "--working-dir", ".", *queued, "--",
                   "python", job, *args]
        return subprocess.run(command, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=900)

    def wait_for(self, job_id: str, timeout_s: float) -> tuple[str, str]:
        """A queued job's final status (lower case) and its logs, polled through the job API in this process: a
        `ray job status` process per poll costs ~3 CPU s of Ray's imports on a machine the cluster needs."""
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(self.dashboard)
        deadline = time.time() + timeout_s
        while not (status := jobs.get_job_status(job_id)).is_terminal():
            assert time.time() < deadline, f"job {job_id} did not finish in {timeout_s:g} s"
            time.sleep(1)
        return status.value.lower(), jobs.get_job_logs(job_id)

    def stop(self) -> None:
        stop_ray_nodes(list(self.nodes.values()))  # every node at once: their shutdowns overlap
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(s3, team_mlflow, tmp_path_factory: pytest.TempPathFactory):
    """The nodes carry what a real cluster's nodes would: S3 credentials and the MLflow user's credentials."""
    env = {**os.environ, **s3["env"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1],
           # the GCS declares a silent node dead after 3 missed 1 s health checks (Ray's default: 5 of 3 s), so a
           # lost node is noticed in seconds; what the run does about it is unchanged
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # set for the one-node tests; it forbids a second node
    nodes = Cluster(tmp_path_factory.mktemp("cluster"), env)
    try:
        nodes.start_node(HEAD_IP)
        nodes.start_node(WORKER_IP)
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def s3_data(s3, mnist_root: Path) -> str:
    """MNIST prepared once into the bucket: no node has a local copy."""
    uri = s3["uri"]("data/mnist_parquet")
    subprocess.run([sys.executable, "jobs/prepare_data.py", "--data-root", str(mnist_root), "--out", uri,
                    "--no-download"], cwd=REPO_ROOT, env={**os.environ, **s3["env"]}, check=True, timeout=300)
    return uri


def _micro_args(*extra: str) -> list[str]:
    return [a for s in [*MICRO, *extra] for a in ("--set", s)]


def _logs(submission: subprocess.CompletedProcess) -> str:
    return submission.stdout + submission.stderr


def _keys(s3, prefix: str) -> list[str]:
    listed = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _weights(s3, key: str) -> dict[str, torch.Tensor]:
    body = s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)["model"]


def _mlflow(team_mlflow: str, monkeypatch: pytest.MonkeyPatch):
    """A client of the team server as its admin; the credentials leave the environment with the test."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    return MlflowClient(team_mlflow)


def test_two_nodes_train_from_s3_data_into_s3_checkpoints_and_the_team_mlflow_server(
        cluster: Cluster, s3, s3_data: str, team_mlflow: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = s3["uri"]("runs")
    run = cluster.submit("--config", "configs/mnist_tiny.yaml", "--workers", "2", "--cpu", "--placement", "spread",
                         "--steps", "4", "--name", "spread", "--storage-path", storage, "--parquet-dir", s3_data,
                         *_micro_args("train.log_every=1", "train.ckpt_every=2", "train.eval_every=2",
                                      f"tracking.uri={team_mlflow}", "tracking.experiment=multinode"))
    assert run.returncode == 0, _logs(run)[-5000:]
    assert "2 CPU worker(s) × 1 CPU on 2 node(s) (spread)" in run.stdout
    keys = _keys(s3, "runs/spread/")
    for step in ("step_00000002", "step_00000004"):
        assert f"runs/spread/{step}/MANIFEST.json" in keys and f"runs/spread/{step}/model.pt" in keys

    client = _mlflow(team_mlflow, monkeypatch)
    (found,) = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    assert found.info.status == "FINISHED"
    assert sorted(found.data.tags["sd3ray.worker_nodes"].split(",")) == [HEAD_IP, WORKER_IP]  # one worker per node
    assert [m.step for m in client.get_metric_history(found.info.run_id, "loss/train")] == [1, 2, 3, 4]
    grids = [a.path for a in client.list_artifacts(found.info.run_id, "images")]
    assert grids and "checkpoint/model.pt" in [a.path for a in client.list_artifacts(found.info.run_id, "checkpoint")]
    # artifacts went through the server into the bucket; the nodes hold no S3 credentials for MLflow
    assert any(k.startswith("mlflow/") and k.endswith("model.pt") for k in _keys(s3, "mlflow/"))
    assert http_status(f"{team_mlflow}/api/2.0/mlflow/experiments/search?max_results=1") == 401

    # the checkpoint reads back from S3 for sampling ...
    checkpoint = s3["uri"]("runs/spread/step_00000004")
    samples = subprocess.run([sys.executable, "jobs/sample.py", "--checkpoint", checkpoint, "--prompt", "7",
                              "--num-samples", "2", "--output", str(tmp_path / "samples"), "--device", "cpu"],
                             cwd=REPO_ROOT, env={**os.environ, **s3["env"]}, capture_output=True, text=True,
                             timeout=300)
    assert samples.returncode == 0, samples.stderr[-3000:]
    assert (tmp_path / "samples/samples.npz").is_file()

    # ... the finished run's --name again is refused (the bucket's run record says it finished) ...
    extend = ["--config", "configs/mnist_tiny.yaml", "--workers", "2", "--cpu", "--placement", "spread", "--steps",
              "6", "--name", "spread", "--storage-path", storage, "--parquet-dir", s3_data,
              *_micro_args("train.log_every=1", "train.ckpt_every=2", "train.eval_every=2",
                           f"tracking.uri={team_mlflow}", "tracking.experiment=multinode")]
    again = cluster.submit(*extend)
    assert again.returncode != 0 and "run 'spread' in s3://" in _logs(again), _logs(again)[-5000:]
    assert "finished at step 4: run it with --resume latest" in _logs(again) and "Traceback" not in _logs(again)
    # ... and --resume latest extends it from the newest checkpoint in the bucket
    more = cluster.submit(*extend, "--resume", "latest")
    assert more.returncode == 0, _logs(more)[-5000:]
    assert "at step 4" in more.stdout and "runs/spread/step_00000006/MANIFEST.json" in _keys(s3, "runs/spread/")
    (same,) = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    assert same.info.run_id == found.info.run_id
    assert [m.step for m in client.get_metric_history(same.info.run_id, "loss/train")] == [1, 2, 3, 4, 5, 6]


def test_a_sweep_on_s3_loses_a_node_and_its_interrupted_trial_ends_as_its_twin_that_was_not(
        cluster: Cluster, s3, s3_data: str, team_mlflow: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two identical trials (one grid point, num_samples 2, the same seed), one worker each, one per node, Tune's
    state and checkpoints in the bucket. The worker node dies after the trials' first checkpoint and a replacement
    joins: the trial on it restarts from its checkpoint in S3, and ends bit-identical to its twin, whose run never
    stopped, with one MLflow child run whose steps are logged once each."""
    steps, every = 30, 10
    sweep = tmp_path / "lost-node-sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base_config": "configs/mnist_tiny.yaml",
        "overrides": [*MICRO, f"data.parquet_dir={s3_data}", f"train.steps={steps}", "train.log_every=1",
                      f"train.ckpt_every={every}", f"train.eval_every={every}", f"tracking.uri={team_mlflow}",
                      "tracking.experiment=lost-node-sweep", "tracking.log_model=false"],
        "name": "lost-node-sweep", "storage_path": s3["uri"]("sweeps"), "metric": "loss/val", "mode": "min",
        "widths": [32], "head_dim": 16, "schemes": [{"scheme": "uniform"}], "num_samples": 2,
        "workers_per_trial": 1, "max_failures": 1, "asha": {"enabled": False}}))
    job_id = f"sd3ray-lost-node-sweep-{os.getpid()}"
    submitted = cluster.submit("--config", str(sweep), submission_id=job_id, job="jobs/tune.py")
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    first = f"/step_{every:08d}/MANIFEST.json"
    deadline = time.time() + 600
    while sum(k.endswith(first) for k in _keys(s3, "sweeps/lost-node-sweep/trials/")) < 2:
        assert time.time() < deadline, "the trials never wrote their first checkpoints"
        time.sleep(0.2)
    cluster.kill_node(WORKER_IP)  # mid-sweep: the trial worker on it dies with the node
    cluster.start_node("127.0.0.4")  # a replacement, as an autoscaler would bring
    status, logs = cluster.wait_for(job_id, timeout_s=900)
    assert "succeeded" in status, logs[-5000:]
    assert "sweep 'lost-node-sweep' done: 2 trials" in logs, logs[-5000:]

    final = f"step_{steps:08d}/model.pt"
    finals = [k for k in _keys(s3, "sweeps/lost-node-sweep/trials/") if k.endswith(final)]
    assert len(finals) == 2, finals  # every trial finished, its checkpoints in the bucket
    twin, interrupted = (_weights(s3, key) for key in finals)
    for key, value in twin.items():
        assert torch.equal(value, interrupted[key]), key
    assert "sweeps/lost-node-sweep.sd3ray.json" in _keys(s3, "sweeps/")  # the parent run, for --resume

    client = _mlflow(team_mlflow, monkeypatch)
    experiment = client.get_experiment_by_name("lost-node-sweep").experiment_id
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'sweep-lost-node-sweep'")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    # the trials started one per node (the tag names where a run started; a restart continues the same run)
    assert sorted(c.data.tags["sd3ray.worker_nodes"] for c in children) == [HEAD_IP, WORKER_IP]
    for child in children:
        history = [m.step for m in client.get_metric_history(child.info.run_id, "loss/train")]
        assert history == list(range(1, steps + 1)), (child.info.run_name, history)
    # the interrupted trial restarted from its checkpoint in S3, not from scratch; its twin never restarted
    # (the run's tag, not the restarted worker's console: Ray forwards a worker's lines to the job's log best-effort)
    resumed = sorted(c.data.tags.get("sd3ray.resumed_at_step", "") for c in children)
    assert resumed[0] == "" and int(resumed[1]) >= every, resumed


def test_a_local_storage_path_on_a_multi_node_cluster_is_refused_before_training(
        cluster: Cluster, s3_data: str, tmp_path: Path) -> None:
    local = tmp_path / "checkpoints"
    run = cluster.submit("--config", "configs/mnist_tiny.yaml", "--workers", "2", "--cpu", "--steps", "2",
                         "--name", "local", "--storage-path", str(local), "--parquet-dir", s3_data,
                         *_micro_args(f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"))
    logs = _logs(run)
    assert run.returncode != 0
    assert "every node must see" in logs and f"--storage-path {local} is on this machine's own disk" in logs
    assert "is a SQLite file on this machine" in logs
    assert not local.exists()  # refused before anything was written

    sweep = tmp_path / "local-sweep.yaml"  # a sweep is checked as training is
    sweep.write_text(yaml.safe_dump({"base_config": "configs/mnist_tiny.yaml", "name": "local-sweep",
                                     "storage_path": str(local), "overrides": [*MICRO, f"data.parquet_dir={s3_data}",
                                     f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]}))
    tune = cluster.submit("--config", str(sweep), job="jobs/tune.py")
    assert tune.returncode != 0 and f"storage_path {local} is on this machine's own disk" in _logs(tune)
    assert not local.exists()
