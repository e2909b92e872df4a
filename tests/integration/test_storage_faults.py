"""Storage faults, made for real: a disk that fills up mid-run (a size-limited tmpfs this test mounts) and an
object store that fails for a while (moto's S3 server behind a proxy that answers 503 to every write for a time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sd3ray.checkpoint import list_checkpoints, verify
from tests.support import MICRO, REPO_ROOT


def _train(output_dir: Path, mnist_parquet: Path, steps: int) -> subprocess.CompletedProcess:
    sets = [*MICRO, f"data.parquet_dir={mnist_parquet}", f"train.output_dir={output_dir}", "train.ckpt_every=2",
            "train.eval_every=2", "train.log_every=1"]
    return subprocess.run([sys.executable, "jobs/train.py", "--local", "--device", "cpu", "--no-tracking",
                           "--config", "configs/mnist_tiny.yaml", "--name", "run", "--steps", str(steps),
                           *[a for s in sets for a in ("--set", s)]],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture
def small_disk(tmp_path: Path):
    """mount(size) -> a tmpfs of that many bytes, unmounted afterwards; skipped where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
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
