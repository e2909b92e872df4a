"""The benchmark runs and measures what it claims (a quick CPU smoke test; speed targets live in the job)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd3ray.benchmark import build_diffusers_model, model_step_rows
from sd3ray.config import load_config
from sd3ray.model import MMDiT, count_parameters
from tests.conftest import REPO_ROOT

TINY = ["model.width=64", "model.depth=2", "model.num_heads=2", "model.patch_size=4"]


def test_diffusers_model_has_the_same_shape_of_work() -> None:
    pytest.importorskip("diffusers")
    cfg = load_config("configs/mnist_tiny.yaml", TINY)
    theirs, ours = build_diffusers_model(cfg), MMDiT(cfg.model)
    x, context, pooled, t = torch.randn(2, 1, 32, 32), torch.randn(2, 5, 128), torch.randn(2, 128), torch.rand(2)
    assert theirs(x, context, pooled, t * 1000, return_dict=False)[0].shape == ours(x, t, context, pooled).shape
    # same blocks, same widths: parameter counts agree to within the embedders' differences
    assert abs(count_parameters(theirs) - count_parameters(ours)) / count_parameters(ours) < 0.05


def test_model_step_rows_time_both_implementations() -> None:
    cfg = load_config("configs/mnist_tiny.yaml", TINY)
    rows = model_step_rows(cfg, batch=4, context_len=5, device=torch.device("cpu"), bf16=False, compile=False,
                           warmup=0, iters=1, with_diffusers=True)
    assert [r["model"] for r in rows] == ["sd3ray", "diffusers"]
    assert all(r["images_per_s"] > 0 and r["seconds_per_step"] > 0 for r in rows)


def test_benchmark_job_writes_its_table_and_json(mnist_parquet: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "jobs/benchmark.py", "--config", "configs/mnist_tiny.yaml", "--batch", "4", "--iters", "1",
         "--warmup", "0", "--sampling-images", "4", "--output", str(tmp_path / "b.json"),
         *[a for s in [*TINY, f"data.parquet_dir={mnist_parquet}", "sample.steps=2"] for a in ("--set", s)]],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| sd3ray | False |" in proc.stdout and "| diffusers | False |" in proc.stdout
    assert "sampling (2 Euler steps, CFG 2)" in proc.stdout and "data path" in proc.stdout
    assert (tmp_path / "b.json").is_file()
