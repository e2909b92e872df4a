"""The one training step: the loop and the benchmarks run the same code, and its settings are chosen as stated."""

from pathlib import Path

import pytest
import torch

from benchmarks.step_speed import StepRunner
from sd3ray.checkpoint import load_checkpoint
from sd3ray.config import load_config
from sd3ray.data.format import read_split
from sd3ray.tracking.protocol import NullTracker
from sd3ray.training.context import LocalContext
from sd3ray.training.loop import train
from sd3ray.training.machine import describe_machine
from sd3ray.training.step import StepSettings, build_train_state, resolve_step_settings, train_step

CPU = torch.device("cpu")


def test_the_benchmark_step_trains_the_loops_weights_bit_for_bit(micro_config, mnist_parquet: Path,
                                                                 tmp_path: Path) -> None:
    """`benchmarks.step_speed` times exactly what `train()` trains: after N steps on the same batches both hold
    identical weights, EMA and optimizer moments."""
    steps = 7
    cfg = micro_config(f"train.steps={steps}", "train.log_every=3", f"train.eval_every={steps}",
                       f"train.ckpt_every={steps}", "train.precision=fp32", "train.compile=none",
                       "train.grad_clip=0.05")  # a clip that bites: the clip is part of what must agree
    result = train(cfg, LocalContext(tmp_path / "run", CPU), NullTracker())
    runner = StepRunner(cfg, read_split(str(mnist_parquet), "train"), "none", "fp32", CPU)
    for _ in range(steps):
        runner()
    ours, theirs = runner.state.model.state_dict(), result.model.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    saved = load_checkpoint(Path(result.checkpoint), weights_only_ok=False)
    for key, value in runner.state.ema.model.state_dict().items():
        assert torch.equal(value, saved.ema[key]), key
    for ours_state, theirs_state in zip(runner.state.optimizer.state_dict()["state"].values(),
                                        saved.optimizer["state"].values()):
        assert torch.equal(ours_state["exp_avg"], theirs_state["exp_avg"])


def test_a_zero_grad_clip_means_no_clipping(micro_config) -> None:
    """train.grad_clip=0 disables clipping: it steps exactly as an unreachable limit does. (Passing 0 on to
    clip_grad_norm_ would zero every gradient instead.)"""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 1, 32, 32, generator=g), torch.randn(4, 1, 32, 32, generator=g)
    ids, mask = torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.bool)
    t = torch.rand(4, generator=g)
    weights = []
    for clip in ("0", "1e12", "1e-6"):
        torch.manual_seed(0)
        state = build_train_state(micro_config(f"train.grad_clip={clip}"), CPU, StepSettings(None, "none", "test"))
        for step in range(3):
            train_step(state, x0, ids, mask, t, eps, step)
        weights.append(torch.cat([p.detach().flatten() for p in state.model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])  # a limit that bites changes the step


@pytest.mark.parametrize("beta2", [0.95, 0.999])
def test_adams_second_moment_decays_at_train_adam_beta2(micro_config, beta2: float) -> None:
    """After one step AdamW holds m = (1 − β1)·g and v = (1 − β2)·g², so v = (1 − β2) / (1 − β1)² · m² for every
    weight: the configured β2, not PyTorch's default, is the one the optimizer steps with."""
    torch.manual_seed(0)
    state = build_train_state(micro_config(f"train.adam_beta2={beta2}"), CPU, StepSettings(None, "none", "test"))
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 1, 32, 32, generator=g), torch.randn(4, 1, 32, 32, generator=g)
    ids, mask = torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.bool)
    train_step(state, x0, ids, mask, torch.rand(4, generator=g), eps, 0)
    moments = list(state.optimizer.state.values())
    assert moments
    for moment in moments:
        expected = (1 - beta2) / (1 - 0.9) ** 2 * moment["exp_avg"] ** 2
        torch.testing.assert_close(moment["exp_avg_sq"], expected, rtol=1e-4, atol=1e-12)


def test_the_step_returns_the_pre_clip_norm_and_clips_to_the_limit(micro_config) -> None:
    cfg = micro_config("train.grad_clip=1e-3")
    torch.manual_seed(0)
    state = build_train_state(cfg, CPU, StepSettings(None, "none", "test"))
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 1, 32, 32, generator=g), torch.randn(4, 1, 32, 32, generator=g)
    ids, mask = torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.bool)
    # record the clipped gradients the optimizer sees
    seen: list[float] = []
    original = state.optimizer.step

    def step_and_record(*args, **kwargs):
        seen.append(float(torch.linalg.vector_norm(torch.stack(
            [p.grad.norm() for p in state.model.parameters() if p.grad is not None]))))
        return original(*args, **kwargs)

    state.optimizer.step = step_and_record
    _, grad_norm = train_step(state, x0, ids, mask, torch.rand(4, generator=g), eps, 0)
    assert float(grad_norm) > 1e-3  # the norm before clipping
    assert seen[0] == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize(("precision", "compile_mode", "dtype", "mode"), [
    ("fp32", "none", None, "none"), ("bf16", "blocks", torch.bfloat16, "blocks"),
    ("fp32", "whole", None, "whole")])
def test_explicit_settings_are_taken_as_given(precision: str, compile_mode: str, dtype, mode: str) -> None:
    cfg = load_config("configs/mnist_tiny.yaml", [f"train.precision={precision}", f"train.compile={compile_mode}"])
    settings = resolve_step_settings(cfg, CPU)
    assert (settings.dtype, settings.compile) == (dtype, mode)
    assert "set in the config" in settings.reason


def test_auto_settings_on_cpu_follow_the_cpu_and_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: bf16 only where the CPU has native bf16 matrix units and the model is wide enough to repay the
    casts; otherwise fp32. The reason names what decided it."""
    import sd3ray.training.step as train_step_module

    wide = load_config("configs/mnist.yaml")
    narrow = load_config("configs/mnist_tiny.yaml")
    monkeypatch.setattr(train_step_module, "cpu_native_bf16", lambda: [])
    assert resolve_step_settings(wide, CPU).dtype is None
    assert "no native bf16" in resolve_step_settings(wide, CPU).reason
    monkeypatch.setattr(train_step_module, "cpu_native_bf16", lambda: ["amx_bf16"])
    assert resolve_step_settings(wide, CPU).dtype == torch.bfloat16
    assert "amx_bf16" in resolve_step_settings(wide, CPU).reason
    narrow_choice = resolve_step_settings(narrow, CPU)
    assert narrow_choice.dtype is None and "model.width" in narrow_choice.reason


def test_legacy_boolean_compile_reads_as_a_mode() -> None:
    """Checkpoints written when train.compile was a boolean still load."""
    assert load_config(None, ["train.compile=true"]).train.compile == "blocks"
    assert load_config(None, ["train.compile=false"]).train.compile == "none"


def test_the_machine_line_names_the_cpu() -> None:
    line = describe_machine(CPU)
    assert line.startswith("CPU: ") and torch.backends.cpu.get_cpu_capability() in line
