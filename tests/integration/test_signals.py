"""Ctrl-C and SIGTERM sent to a real jobs/train.py process, in local mode and under Ray (`ray job stop`, SIGTERM to
the driver): the run stops after the step in flight, saves, names the checkpoint to resume from and exits 130/143;
a second signal exits at once."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from sd3ray.checkpoint import latest_checkpoint, load_checkpoint, verify
from tests.support import MICRO, REPO_ROOT


def _command(parquet: Path, out: Path, name: str, steps: int, *extra: str) -> list[str]:
    sets = [*MICRO, f"data.parquet_dir={parquet}", f"train.output_dir={out}", "train.log_every=5",
            "train.ckpt_every=100000", "train.eval_every=100000", "train.lr_schedule=constant", "train.compile=none"]
    return [sys.executable, "jobs/train.py", "--local", "--no-tracking", "--name", name, "--steps", str(steps),
            *[a for s in sets for a in ("--set", s)], *extra]  # extra last: its --set wins


def _read_until(proc: subprocess.Popen, done, lines: list[str], timeout_s: float = 300) -> bool:
    """Read the process's output into `lines` until `done(line)` or the output ends (the process exits); False only
    if `timeout_s` passed first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return True
        lines.append(line)
        if done(line):
            return True
    return False


def _start_and_wait_for_training(command: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not _read_until(proc, lambda line: line.startswith("step 10/"), []):
        proc.kill()
        raise AssertionError("no training progress")
    return proc


def test_sigterm_saves_names_the_checkpoint_and_the_resumed_run_is_exact(mnist_parquet: Path,
                                                                           tmp_path: Path) -> None:
    proc = _start_and_wait_for_training(_command(mnist_parquet, tmp_path, "stopped", 100000))
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "***" not in stderr
    checkpoint = latest_checkpoint(tmp_path / "stopped" / "checkpoints")
    stopped_at = load_checkpoint(checkpoint).step
    assert f"SIGTERM: stopped at step {stopped_at} and saved {checkpoint}; continue with --resume {checkpoint}" \
        in stderr
    total = stopped_at + 7
    resumed = subprocess.run(_command(mnist_parquet, tmp_path, "stopped", total, "--resume", str(checkpoint)),
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run(_command(mnist_parquet, tmp_path, "straight", total), cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = load_checkpoint(latest_checkpoint(tmp_path / "stopped" / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "straight" / "checkpoints"))
    assert a.step == b.step == total
    for key in b.model:
        assert torch.equal(a.model[key], b.model[key]), key


def test_a_second_ctrl_c_exits_at_once_and_leaves_the_previous_checkpoint_intact(mnist_parquet: Path,
                                                                                   tmp_path: Path) -> None:
    sets = ["--set", "train.ckpt_every=5"]
    proc = _start_and_wait_for_training(_command(mnist_parquet, tmp_path, "twice", 100000, *sets))
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "SIGINT received: stopping after this step" in stderr and "Traceback" not in stderr
    checkpoint = latest_checkpoint(tmp_path / "twice" / "checkpoints")
    assert checkpoint is not None and verify(checkpoint)["step"] >= 10  # complete, checksums and all


def _ray_command(parquet: Path, out: Path, name: str, steps: int, workers: int = 1) -> list[str]:
    sets = [*MICRO, f"data.parquet_dir={parquet}", f"train.output_dir={out}", "train.log_every=5",
            "train.ckpt_every=100000", "train.eval_every=100000", "train.lr_schedule=constant", "train.compile=none"]
    return ["python", "jobs/train.py", "--cpu", "--workers", str(workers), "--no-tracking", "--name", name,
            "--steps", str(steps), "--storage-path", str(out / "storage"), *[a for s in sets for a in ("--set", s)]]


def test_ray_job_stop_then_sigterm_to_the_driver_each_stop_both_workers_after_a_checkpoint(
        ray_head, mnist_parquet: Path, tmp_path: Path) -> None:
    """`ray job stop` sends SIGTERM to the job's driver; both workers agree on the step and report its checkpoint.
    RAY_JOB_STOP_WAIT_TIME_S gives the job time to save before Ray's SIGKILL (3 s by default). The same command run
    again as a driver of its own continues from that checkpoint, and SIGTERM to that driver (its workers are the
    cluster's processes) is relayed to the workers and stops them the same way."""
    job = "sd3ray-signal-job"
    command = _ray_command(mnist_parquet, tmp_path, "stopped", 100000, workers=2)
    runtime_env = '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}'
    submit = subprocess.run(
        ["ray", "job", "submit", "--address", ray_head["dashboard"], "--submission-id", job, "--no-wait",
         "--working-dir", ".", "--runtime-env-json", runtime_env, "--", *command],
        cwd=REPO_ROOT, env=ray_head["env"], capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr[-3000:]

    from ray.job_submission import JobSubmissionClient

    def logs() -> str:  # the job API in this process: a `ray job logs` process per poll is ~3 CPU s of imports
        return JobSubmissionClient(ray_head["dashboard"]).get_job_logs(job)

    deadline = time.monotonic() + 300
    while "step 10/" not in logs():
        assert time.monotonic() < deadline, logs()[-4000:]
        time.sleep(2)
    subprocess.run(["ray", "job", "stop", "--address", ray_head["dashboard"], job], env=ray_head["env"],
                   capture_output=True, text=True, timeout=300, check=True)
    output = logs()
    checkpoint = latest_checkpoint(tmp_path / "storage" / "stopped")
    assert checkpoint is not None, output[-4000:]
    job_stopped_at = verify(checkpoint)["step"]
    assert f"sd3ray: SIGTERM: stopped at step {job_stopped_at} and its newest checkpoint is {checkpoint}" in output, \
        output[-4000:]
    assert "Traceback" not in output

    # The same command again, as a driver of this process's own: it continues from the job's checkpoint.
    proc = subprocess.Popen([sys.executable, *command[1:]], cwd=REPO_ROOT, env=ray_head["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def trained_on(line: str) -> bool:  # a worker's progress line past the step the job stopped at
        found = re.search(r"step (\d+)/", line)
        return found is not None and int(found.group(1)) > job_stopped_at

    assert _read_until(proc, trained_on, lines), "".join(lines)[-4000:]
    os.kill(proc.pid, signal.SIGTERM)
    output = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, output[-4000:]
    assert f"from step {job_stopped_at}" in output, output[-4000:]  # resumed, not started over
    assert "Traceback" not in output and "SIGTERM received at time" not in output and "***" not in output
    checkpoint = latest_checkpoint(tmp_path / "storage" / "stopped")
    stopped_at = load_checkpoint(checkpoint).step
    assert stopped_at > job_stopped_at
    assert (f"sd3ray: SIGTERM: stopped at step {stopped_at} and its newest checkpoint is {checkpoint}; run the same "
            f"command again to continue from it") in output, output[-4000:]


def _ray_session(proc: subprocess.Popen) -> list:
    """The processes a driver started (Ray's GCS, raylet and workers among them), to check they end with it."""
    import psutil

    return psutil.Process(proc.pid).children(recursive=True)


def test_a_signal_to_the_drivers_whole_process_group_stops_saves_and_the_same_command_continues(
        mnist_parquet: Path, tmp_path: Path) -> None:
    """`timeout`, Slurm, systemd and a terminal signal the driver's whole process group. On the cluster the driver
    starts itself, Ray's processes sit outside that group, so SIGTERM (then SIGINT) to the group stops the run after
    a step with a checkpoint, as a signal to the driver alone does, and nothing of the cluster outlives the driver.
    The second run is the same command again, with RAY_ADDRESS=local (Ray's way to force a fresh local cluster):
    it continues the interrupted run, and gets sd3ray's own-cluster settings (workers at nice 0)."""
    import psutil

    command = [sys.executable, *_ray_command(mnist_parquet, tmp_path, "group", 100000)[1:]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    stopped_at, outputs = 0, []
    for signum, extra_env in ((signal.SIGTERM, {}), (signal.SIGINT, {"RAY_ADDRESS": "local"})):
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env={**env, **extra_env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # a group of its own
        lines: list[str] = []

        def trained_on(line: str, after: int = stopped_at) -> bool:
            found = re.search(r"step (\d+)/", line)
            return found is not None and int(found.group(1)) >= after + 10

        assert _read_until(proc, trained_on, lines), "".join(lines)[-4000:]
        started = _ray_session(proc)
        assert any("raylet" in " ".join(p.cmdline()) for p in started), [p.cmdline()[:1] for p in started]
        os.killpg(proc.pid, signum)  # the driver's process group, as `timeout` or Ctrl-C sends it
        output = "".join(lines) + proc.communicate(timeout=120)[0]
        assert proc.returncode == 128 + signum, output[-4000:]
        checkpoint = latest_checkpoint(tmp_path / "storage" / "group")
        assert checkpoint is not None and load_checkpoint(checkpoint).step > stopped_at, output[-4000:]
        stopped_at = load_checkpoint(checkpoint).step
        name = signal.Signals(signum).name
        assert f"sd3ray: {name}: stopped at step {stopped_at} and its newest checkpoint is {checkpoint}" in output
        assert "Failed to connect to GCS" not in output and "Traceback" not in output, output[-4000:]
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [p.cmdline()[:2] for p in alive]  # the cluster ended with its driver
        outputs.append((stopped_at, output))
    (first_stop, _), (_, output) = outputs
    assert "continuing run 'group'" in output and f"from step {first_stop}" in output, output[-4000:]
    assert re.search(r"\(\d+ threads\)", output)  # "(N threads)" with nothing after it: a worker at nice 0
    assert "nice 15" not in output and "PreemptionWatcher" not in output, output[-4000:]
