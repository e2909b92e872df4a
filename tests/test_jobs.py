"""The jobs as a user runs them: real processes, real files."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MICRO, REPO_ROOT


def _run(*args: str, cwd: Path = REPO_ROOT, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mnist_parquet: Path) -> Path:
    """A micro run trained by `jobs/train.py --local`, then continued with `--resume latest`."""
    out = tmp_path_factory.mktemp("cli")
    sets = [a for s in [*MICRO, f"data.parquet_dir={mnist_parquet}", f"train.output_dir={out / 'runs'}",
                        "train.log_every=2", "train.ckpt_every=2", "train.eval_every=2"] for a in ("--set", s)]
    base = [str(REPO_ROOT / "jobs/train.py"), "--local", "--config", str(REPO_ROOT / "configs/mnist_tiny.yaml"),
            "--no-tracking", "--name", "cli", *sets]
    first = _run(*base, "--steps", "2", cwd=out)
    assert "step 2/2" in first.stdout and "done at step 2" in first.stdout
    second = _run(*base, "--steps", "4", "--resume", "latest", cwd=out)
    assert "resumed from" in second.stdout and "step 4/4" in second.stdout and "step 2/4" not in second.stdout
    return out / "runs/cli/checkpoints/step_00000004"


def test_sample_job_writes_files_and_is_deterministic(trained: Path, tmp_path: Path) -> None:
    args = [str(REPO_ROOT / "jobs/sample.py"), "--checkpoint", str(trained), "--prompt", "7", "--prompt", "three",
            "--num-samples", "3", "--steps", "3", "--guidance", "2", "--sampler", "heun"]
    _run(*args, "--seed", "1", "--output", str(tmp_path / "a"))
    _run(*args, "--seed", "1", "--output", str(tmp_path / "b"))
    _run(*args, "--seed", "2", "--output", str(tmp_path / "c"))
    a, b, c = (np.load(tmp_path / d / "samples.npz") for d in "abc")
    assert a["images"].shape == (6, 1, 32, 32) and a["images"].dtype == np.uint8
    assert list(a["prompts"]) == ["7"] * 3 + ["three"] * 3
    assert np.array_equal(a["images"], b["images"]) and not np.array_equal(a["images"], c["images"])
    assert (tmp_path / "a/grid.png").stat().st_size > 0
    assert (tmp_path / "a/prompts.txt").read_text().splitlines() == ["7"] * 3 + ["three"] * 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jobs/train.py", "--local", "--steps", "-3"], "--steps: must be a positive integer"),
        (["jobs/train.py", "--local", "--set", "model.width=100"], "model.width: 100 is not divisible"),
        (["jobs/sample.py", "--checkpoint", "x", "--prompt", "1", "--sampler", "ddim"],
         "invalid choice: 'ddim'"),
        (["jobs/sample.py", "--checkpoint", "x", "--prompt", "1", "--guidance", "-2"], "--guidance: must be >= 0"),
        (["jobs/sample.py", "--checkpoint", "nowhere", "--prompt", "1"], "neither an existing directory"),
    ],
)
def test_nonsense_cli_values_are_rejected(args: list[str], message: str) -> None:
    proc = _run(*args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_math_and_loop_import_neither_ray_nor_mlflow() -> None:
    code = ("import sys, sd3ray.config, sd3ray.text, sd3ray.model, sd3ray.flow, sd3ray.sampling, sd3ray.data, "
            "sd3ray.checkpoint, sd3ray.train_loop, sd3ray.local, sd3ray.validation, sd3ray.inference, "
            "sd3ray.judge, sd3ray.tracking; "
            "bad = [m for m in ('ray', 'mlflow') if m in sys.modules]; assert not bad, bad")
    _run("-c", code)
