"""One writer per run folder, held by a real second process."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sd3ray.training.run_lock import LOCK_FILE, RunInUse, run_lock

HOLD = """
import sys, time
from pathlib import Path
from sd3ray.training.run_lock import run_lock
with run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "x"
    holder = _holder(run_dir)
    try:
        with pytest.raises(RunInUse, match=rf"run folder {run_dir} is being written by PID {holder.pid} on "):
            with run_lock(run_dir):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies without cleanup, as a crashed run does
        holder.wait()
    assert (run_dir / LOCK_FILE).read_text().startswith(f"{holder.pid} ")  # its record is still there
    with run_lock(run_dir):  # the kernel released the lock with the process
        assert (run_dir / LOCK_FILE).read_text().startswith(f"{os.getpid()} ")


def test_local_training_holds_the_lock(micro_config, tmp_path: Path) -> None:
    """jobs/train.py --local takes the run folder's lock: with it held, a run of that name stops before training."""
    from sd3ray.training.local import run_local

    cfg = micro_config("train.steps=2")
    holder = _holder(Path(cfg.train.output_dir) / "same")
    try:
        with pytest.raises(RunInUse, match=f"PID {holder.pid}"):
            run_local(cfg, "same", "same", device="cpu", tracking=False)
        assert not (Path(cfg.train.output_dir) / "same" / "checkpoints").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
