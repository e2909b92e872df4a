"""README's commands in the order a new user types them on one machine: the first training run (embedded Ray),
then the distributed section (`ray start --head`, `ray job submit`, `ray job list`), then a sweep on that cluster.
The submitted job is checked end to end: two DDP workers, its checkpoints, and its finished MLflow run with a grid.

The first run's embedded Ray writes ~/.ray/auth_token, after which a head started by `ray start` requires the
token; README's distributed section therefore starts with `export RAY_AUTH_MODE=token`, so the head and every
client use that token. The test runs in a home folder of its own, with test-sized settings, and stops the head it
started by its process group, never by `ray stop`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.support import (
    MICRO,
    REPO_ROOT,
    free_port,
    http_status,
    ray_temp_dir,
    start_in_own_session,
    stop_ray_nodes,
    wait_until,
)


def _run(command: list[str], env: dict[str, str], timeout_s: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_readme_commands_work_in_the_order_a_new_user_types_them(mnist_parquet: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # a new user's shell: none of the tests' own Ray settings, nor their cap on threads per process (tests/conftest.py)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "OMP_NUM_THREADS"}
    env = {**base, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{base['PATH']}",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="sd3ray-tmp-"), "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_TRACKING_URI": uri}
    sets = [a for s in [*MICRO, f"train.output_dir={tmp_path / 'runs'}", "train.eval_every=4", "train.ckpt_every=2"]
            for a in ("--set", s)]

    # 1. The first command: jobs/train.py on the local Ray cluster it starts itself. With no GPU and no --config it
    # trains the CPU config, on one worker that has every CPU of the machine's local cluster.
    first = _run([sys.executable, "jobs/train.py", "--steps", "4", "--parquet-dir", str(mnist_parquet), *sets], env)
    assert "done at step 4" in first.stdout, first.stdout[-2000:]
    assert "no GPU in the Ray cluster: training configs/mnist_tiny.yaml, the CPU config" in first.stdout
    cpus = os.cpu_count()
    # "(N threads)" with nothing after it: the worker runs at normal priority (a niced one says "nice 15")
    assert f"1 CPU worker(s) × {cpus} CPU on 1 node(s)" in first.stdout and f"({cpus} threads)" in first.stdout
    # the cluster sd3ray started runs no placement-group cleaner, whose failed State API polls filled the console
    assert "PlacementGroupCleaner" not in first.stdout + first.stderr
    assert (home / ".ray/auth_token").is_file()  # what makes the next section need RAY_AUTH_MODE=token
    # a quiet console: every line is sd3ray's (a worker's behind Ray's "(RayTrainWorker pid=N)" prefix) or Ray's one
    # start-up line, and none repeats
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in (first.stdout + first.stderr).splitlines() if line.strip()]
    bare = [re.sub(r"^\(\w+ pid=\d+(, ip=[\d.]+)?\) ", "", line) for line in lines]
    foreign = [line for line in bare if not line.startswith(("sd3ray: ", "step "))]
    assert len(foreign) == 1 and foreign[0].endswith("Started a local Ray instance."), "\n".join(foreign)
    assert len(set(bare)) == len(bare), "a console line repeats:\n" + "\n".join(bare)
    params = next(line for line in first.stdout.splitlines() if "MM-DiT" in line)
    worker_line = params[params.index("sd3ray: "):]
    assert (first.stdout + first.stderr).count(worker_line) == 1, "a worker's console line was printed twice"

    # 2. The distributed section, as README has it (ports and temp dir are the test's own).
    cluster = {**env, "RAY_AUTH_MODE": "token"}
    token = (home / ".ray/auth_token").read_text()
    _run(["ray", "get-auth-token", "--generate"], cluster)
    assert (home / ".ray/auth_token").read_text() == token  # kept, not replaced
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir, log = ray_temp_dir(), tmp_path / "head.log"
    head = start_in_own_session(
        ["ray", "start", "--head", "--block", "--num-cpus", "2", "--dashboard-host", "127.0.0.1",
         "--port", str(gcs_port), "--dashboard-port", str(dashboard_port),
         "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", temp_dir, "--disable-usage-stats"],
        cluster, log)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_until(lambda: http_status(f"{dashboard}/api/version") != 0, head, log, "the Ray head's job API")
        submit = _run(["ray", "job", "submit", "--address", dashboard, "--submission-id", "sd3ray-first-job",
                       "--working-dir", ".", "--", "python", "jobs/train.py", "--config", "configs/mnist_tiny.yaml",
                       "--workers", "2", "--cpu", "--name", "ddp", "--steps", "4", "--storage-path",
                       str(tmp_path / "ray"), "--parquet-dir", str(mnist_parquet), *sets,
                       "--set", f"tracking.uri={uri}", "--set", "tracking.experiment=job-submit"], cluster)
        assert "2 CPU worker(s) × 1 CPU on 1 node(s) (pack), global batch 32" in submit.stdout, submit.stdout[-3000:]
        assert "SUCCEEDED" in _run(["ray", "job", "list", "--address", dashboard], cluster).stdout
        status = _run(["ray", "job", "status", "--address", dashboard, "sd3ray-first-job"], cluster)
        assert "succeeded" in status.stdout.lower(), status.stdout
        checkpoints = sorted(p.name for p in (tmp_path / "ray/ddp").glob("step_*"))
        assert checkpoints == ["step_00000002", "step_00000004"]
        assert (tmp_path / "ray/ddp/step_00000004/MANIFEST.json").is_file()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("job-submit").experiment_id],
                                    "attributes.run_name = 'ddp'")
        assert run.data.tags["mlflow.source.name"] == "jobs/train.py" and run.data.tags["mlflow.source.type"] == "JOB"
        assert run.info.status == "FINISHED" and run.data.tags["sd3ray.world_size"] == "2"
        assert run.data.params["global_batch"] == "32" and "loss/val" in run.data.metrics
        assert [a.path for a in client.list_artifacts(run.info.run_id, "images")], "no sample grid logged"

        # 3. A sweep on the same cluster (README: `python jobs/tune.py` joins the cluster `ray start` left; this
        # head's address file is in its own temp dir, so the test names the cluster in RAY_ADDRESS).
        sweep = tmp_path / "sweep.yaml"
        sweep.write_text(yaml.safe_dump({
            "base_config": "configs/mnist_tiny.yaml", "name": "first-sweep", "storage_path": str(tmp_path / "tune"),
            "overrides": [*MICRO, f"train.output_dir={tmp_path / 'runs'}", "train.steps=4", "train.eval_every=2",
                          "train.ckpt_every=2", "train.log_every=2"],
            "metric": "loss/val", "mode": "min", "widths": [32], "head_dim": 16, "schemes": [{"scheme": "uniform"}],
            "asha": {"enabled": False}}))
        tune = _run([sys.executable, "jobs/tune.py", "--config", str(sweep), "--parquet-dir", str(mnist_parquet)],
                    {**cluster, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"})
        assert "sweep 'first-sweep' done: 1 trials" in tune.stdout, tune.stdout[-3000:]
    finally:
        stop_ray_nodes([head])
