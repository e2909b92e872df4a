"""The benchmark runs and measures what it claims (a quick CPU smoke test; speed targets live in the job)."""


from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.report import benchmark_metrics, markdown_report
from benchmarks.speed import build_diffusers_model, interleaved_seconds, kernel_seconds, model_step_rows, speed_ceiling
from sd3ray.config import load_config
from sd3ray.model import MMDiT, count_parameters
from tests.support import REPO_ROOT

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
    pytest.importorskip("diffusers")
    cfg = load_config("configs/mnist_tiny.yaml", TINY)
    rows = model_step_rows(cfg, batch=4, context_len=5, device=torch.device("cpu"), bf16=False, compile=False,
                           warmup=0, iters=1, with_diffusers=True)
    assert [r["model"] for r in rows] == ["sd3ray", "diffusers"]
    for r in rows:
        assert r["images_per_s"] == pytest.approx(4 / r["seconds_per_step"])
        # a transformer step spends time in both, and the two are part of what the profiler saw
        assert r["gemm_s"] > 0 and r["attention_s"] > 0
        assert r["gemm_s"] + r["attention_s"] < r["profiled_s"]
    assert speed_ceiling(rows) == pytest.approx(
        rows[1]["seconds_per_step"] / (rows[0]["gemm_s"] + rows[0]["attention_s"]))


def test_interleaved_timing_alternates_the_candidates() -> None:
    calls: list[str] = []
    seconds = interleaved_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                  torch.device("cpu"), warmup=1, iters=3)
    assert calls == ["a", "b"] * 4
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())


def test_kernel_seconds_splits_gemm_from_attention() -> None:
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    q = torch.randn(2, 2, 64, 32)
    only_gemm = kernel_seconds(lambda: (a @ b).relu(), torch.device("cpu"))
    assert only_gemm["gemm_s"] > 0 and only_gemm["attention_s"] == 0
    only_attention = kernel_seconds(lambda: F.scaled_dot_product_attention(q, q, q), torch.device("cpu"))
    assert only_attention["attention_s"] > 0 and only_attention["gemm_s"] == 0


def test_report_and_metrics_carry_the_ratios() -> None:
    rows = [{"model": "sd3ray", "compiled": False, "params_m": 1.0, "seconds_per_step": 0.5, "images_per_s": 8.0,
             "gemm_s": 0.3, "attention_s": 0.1, "mfu": None},
            {"model": "diffusers", "compiled": False, "params_m": 1.0, "seconds_per_step": 0.8, "images_per_s": 5.0,
             "gemm_s": 0.3, "attention_s": 0.1, "mfu": None}]
    extras = [{"what": "sampling", "key": "sampling", "images_per_s": 2.0}]
    ray_rows = [{"setup": "local", "ray": False, "workers": 1, "cpus_per_worker": 2, "images_per_s": 100.0,
                 "fixed_s": 1.0, "vs_local": 1.0},
                {"setup": "ray", "ray": True, "workers": 1, "cpus_per_worker": 2, "images_per_s": 95.0,
                 "fixed_s": 9.0, "vs_local": 0.95}]
    report = markdown_report("header", rows, extras, ray_rows)
    assert "| sd3ray | False | 1.0 | 8 | 1.60× | 80% | - |" in report
    assert "run 2.00× eager diffusers" in report  # 0.8 s / (0.3 + 0.1) s
    assert "| ray | 95 | 0.95× | 9.0 |" in report
    metrics = benchmark_metrics(rows, extras, ray_rows)
    assert metrics["bench/sd3ray/vs_diffusers_eager"] == pytest.approx(1.6)
    assert metrics["bench/speed_ceiling_vs_diffusers"] == pytest.approx(2.0)
    assert metrics["bench/ray_1x2cpu/vs_local"] == pytest.approx(0.95)
    assert metrics["bench/sampling/images_per_s"] == 2.0
    ray_only = markdown_report("header", [], [], ray_rows)  # --skip-models: the Ray table alone
    assert "| model |" not in ray_only and "| ray | 95 | 0.95× | 9.0 |" in ray_only


def test_seed_summary_gives_each_setups_mean_and_sample_spread() -> None:
    from benchmarks.time_to_quality import seed_summary, summary_table

    def row(label: str, seed: int, accuracy: float, cfid: float) -> dict:
        return {"label": label, "seed": seed, "budget_steps": 2000, "budget_minutes": 0.0, "step": 2000,
                "samples/accuracy": accuracy, "val/cfid": cfid, "samples/cfid_ratio": cfid / 4}

    rows = [row("base", 0, 0.97, 20.0), row("base", 1, 0.99, 24.0), row("base", 2, 0.98, 22.0),
            row("ema", 0, 0.99, 18.0)]
    base, ema = seed_summary(rows)
    assert (base["label"], base["seeds"], ema["seeds"]) == ("base", 3, 1)
    assert base["val/cfid"] == pytest.approx(22.0) and base["val/cfid_std"] == pytest.approx(2.0)  # n − 1
    assert base["samples/accuracy_std"] == pytest.approx(0.01) and ema["val/cfid_std"] == 0.0
    assert "| base | 2000 steps | 3 | 0.980 ± 0.010 | 22.00 ± 2.00 | 5.50 ± 0.50 |" in summary_table([base])


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "benchmarks").glob("levers_*.yaml")), ids=lambda p: p.name)
def test_every_shipped_lever_builds_a_valid_config(path: Path) -> None:
    """A lever whose key is misspelt or whose values the config refuses would fail only on a GPU, minutes into a
    report: each one of every shipped lever file must load here."""
    from benchmarks.gpu_report import lever_config, read_lever_plan

    plan = read_lever_plan(path)
    assert plan.levers
    same: dict[str, list[str]] = {}
    for label in plan.levers:  # a lever the recipe already ships (or another lever) measures nothing
        same.setdefault(repr(lever_config(plan, label, [])), []).append(label)
    assert [group for group in same.values() if len(group) > 1] == []
