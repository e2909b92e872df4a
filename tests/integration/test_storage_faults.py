"""Storage faults, made for real: a disk that fills up mid-run (a size-limited tmpfs this test mounts) and an
object store that fails for a while (moto's S3 server behind a proxy that answers 503 to every write for a time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sd3ray.checkpoint import list_checkpoints, verify
from tests.support import MICRO, REPO_ROOT


def _train(output_dir: Path, mnist_parquet: Path, steps: int, name: str = "run") -> subprocess.CompletedProcess:
    sets = [*MICRO, f"data.parquet_dir={mnist_parquet}", f"train.output_dir={output_dir}", "train.ckpt_every=2",
            "train.eval_every=2", "train.log_every=1"]
    return subprocess.run([sys.executable, "jobs/train.py", "--local", "--device", "cpu", "--no-tracking",
                           "--config", "configs/mnist_tiny.yaml", "--name", name, "--steps", str(steps),
                           *[a for s in sets for a in ("--set", s)]],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture
def small_disk(tmp_path: Path):
    """mount(size) -> a tmpfs of that many bytes, unmounted afterwards; skipped where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(size: int, read_only: bool = False) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a size-limited tmpfs here ({proc.stderr.strip()}); needs root")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_a_full_disk_stops_the_run_cleanly_and_keeps_the_previous_checkpoint(
        small_disk, mnist_parquet: Path, tmp_path: Path) -> None:
    sized = _train(tmp_path / "sizing", mnist_parquet, steps=2)
    assert sized.returncode == 0, sized.stderr[-3000:]
    (one,) = list_checkpoints(tmp_path / "sizing/run/checkpoints")
    size = sum(f.stat().st_size for f in one.iterdir())
    disk = small_disk(int(size * 1.6) // 4096 * 4096)  # room for one checkpoint, not for two

    proc = _train(disk, mnist_parquet, steps=6)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    root = disk / "run/checkpoints"
    assert error.startswith(f"sd3ray: error: no space left in {root} while writing the step-4 checkpoint"), error
    assert f"the previous checkpoint {root / 'step_00000002'} is intact" in error
    assert [p.name for p in root.iterdir()] == ["step_00000002"]  # no half-written sibling left behind
    assert verify(root / "step_00000002")["step"] == 2


def _job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def test_read_only_folders_and_odd_names_each_get_one_line(small_disk, mnist_parquet: Path, tmp_path: Path) -> None:
    """A read-only output folder (training) and --output (sampling) are named before any work; a --name in another
    script trains, a --name that is a path is refused; a prompt past text.max_length is cut with one line."""
    read_only = small_disk(1 << 20, read_only=True)
    refused = _train(read_only / "runs", mnist_parquet, steps=2)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"sd3ray: error: run folder {read_only / 'runs/run'} is not a writable folder (Read-only file system); "
        f"point train.output_dir at a writable folder (--set train.output_dir=DIR)")

    tracked = _job("jobs/train.py", "--local", "--steps", "1", "--parquet-dir", str(mnist_parquet),
                   "--tracking-uri", f"sqlite:///{read_only / 'mlflow.db'}")
    assert tracked.returncode == 1 and "Traceback" not in tracked.stderr, tracked.stderr[-3000:]
    assert f"{read_only} is not a folder sd3ray can write (read-only or another user's)" in tracked.stderr

    named = _train(tmp_path / "runs", mnist_parquet, steps=2, name="数字-run")
    assert named.returncode == 0, named.stderr[-3000:]
    (checkpoint,) = list_checkpoints(tmp_path / "runs/数字-run/checkpoints")
    for path_like in ("../escape", "a/b"):
        escaped = _train(tmp_path / "runs", mnist_parquet, steps=2, name=path_like)
        assert escaped.returncode == 2 and "is not a run name: use one folder name" in escaped.stderr
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs/a").exists()

    sample = ["jobs/sample.py", "--checkpoint", str(checkpoint), "--num-samples", "1", "--steps", "2"]
    unwritable = _job(*sample, "--prompt", "7", "--output", str(read_only / "samples"))
    assert unwritable.returncode == 1 and "Traceback" not in unwritable.stderr, unwritable.stderr[-3000:]
    assert f"sd3ray: error: --output {read_only / 'samples'} is not a writable folder (Read-only file system)" \
        in unwritable.stderr
    long_prompt = _job(*sample, "--prompt", "seven " * 300, "--output", str(tmp_path / "samples"))
    assert long_prompt.returncode == 0, long_prompt.stderr[-3000:]
    assert long_prompt.stderr.strip().splitlines() == [
        "sd3ray: warning: prompt of 1800 bytes truncated to 23 (text.max_length=24): 'seven seven seven seven seven "
        "seven seve'..."], long_prompt.stderr[-3000:]
