"""Guidance as a property of the velocity function: classifier-free guidance, its limited interval, autoguidance."""

from dataclasses import dataclass

import pytest
import torch

from sd3ray.config import ConfigError, load_config
from sd3ray.core.sampling import euler, timestep_schedule
from sd3ray.model import Denoiser

TINY = ["model.width=32", "model.depth=2", "model.num_heads=2", "model.context_dim=32", "model.pooled_dim=32",
        "text.width=32", "text.depth=1", "text.num_heads=2"]


def _model(seed: int) -> Denoiser:
    torch.manual_seed(seed)
    model = Denoiser(load_config("configs/mnist_tiny.yaml", TINY)).eval()
    with torch.no_grad():  # adaLN-Zero starts at v = 0 for every prompt: give the branches something to differ by
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


PROMPTS = ["7", "seven", "a handwritten 3"]


@torch.no_grad()
def test_cfg_inside_the_interval_is_the_formula_and_outside_is_the_conditional_velocity() -> None:
    model = _model(0)
    z = torch.randn(3, 1, 32, 32)
    cond, uncond = model.condition(PROMPTS), model.condition([""] * 3)
    guided = model.velocity_fn(PROMPTS, 3.0, (0.2, 0.7))
    t_in, t_out = torch.full((3,), 0.5), torch.full((3,), 0.9)
    v_c, v_u = model.velocity(z, t_in, cond), model.velocity(z, t_in, uncond)
    torch.testing.assert_close(guided(z, t_in), v_u + 3.0 * (v_c - v_u), atol=1e-5, rtol=1e-5)
    assert torch.equal(guided(z, t_out), model.velocity(z, t_out, cond))  # exactly: only that branch runs
    assert not torch.allclose(guided(z, t_in), v_c)  # the guidance did something inside
    # rows at different t: each follows its own side of the interval
    mixed = torch.tensor([0.5, 0.9, 0.1])
    out = guided(z, mixed)
    v_c, v_u = model.velocity(z, mixed, cond), model.velocity(z, mixed, uncond)
    torch.testing.assert_close(out[0], (v_u + 3.0 * (v_c - v_u))[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:], v_c[1:], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_autoguidance_with_the_model_as_its_own_guide_is_the_conditional_model() -> None:
    model = _model(0)
    z, t = torch.randn(3, 1, 32, 32), torch.full((3,), 0.5)
    assert torch.equal(model.velocity_fn(PROMPTS, 2.5, guide=model)(z, t), model.velocity_fn(PROMPTS, 1.0)(z, t))


@torch.no_grad()
def test_autoguidance_extrapolates_away_from_the_guide() -> None:
    model, guide = _model(0), _model(1)
    z, t = torch.randn(3, 1, 32, 32), torch.full((3,), 0.5)
    v_c, v_g = model.velocity(z, t, model.condition(PROMPTS)), guide.velocity(z, t, guide.condition(PROMPTS))
    torch.testing.assert_close(model.velocity_fn(PROMPTS, 2.0, guide=guide)(z, t), v_g + 2.0 * (v_c - v_g))


@dataclass
class LinearField:
    """A stand-in denoiser whose velocities are known: v_cond = a·z and v_uncond = b·z."""

    a: float
    b: float

    def condition(self, prompts: list[str]) -> list[str]:
        return prompts

    def velocity(self, z: torch.Tensor, t: torch.Tensor, cond: list[str]) -> torch.Tensor:
        scale = torch.tensor([self.b if p == "" else self.a for p in cond]).view(-1, 1, 1, 1)
        return scale * z


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.25, 0.65)])  # edges off the 0.1 grid
def test_euler_through_a_guided_linear_field_matches_its_closed_form(interval: tuple[float, float]) -> None:
    """Euler on v = k(t)·z multiplies z by (1 + dt·k(t_i)) per step, with k = b + w(a − b) inside the interval
    and a outside it."""
    field, w, steps = LinearField(a=0.7, b=-0.4), 2.0, 10
    velocity = Denoiser.velocity_fn(field, ["x", "y"], w, interval)
    noise, times = torch.randn(2, 1, 4, 4), timestep_schedule(steps)
    expected = noise.clone()
    for t_cur, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        k = field.b + w * (field.a - field.b) if interval[0] <= t_cur <= interval[1] else field.a
        expected = expected * (1 + (t_next - t_cur) * k)
    torch.testing.assert_close(euler(velocity, noise, times), expected)


@pytest.mark.parametrize("interval", ["[0.5, 0.5]", "[0.8, 0.2]", "[0, 1.5]", "[0.3]"])
def test_a_bad_interval_is_one_clear_error(interval: str) -> None:
    with pytest.raises(ConfigError, match=r"sample.guidance_interval: must be \[lo, hi\]"):
        load_config("configs/mnist_tiny.yaml", [f"sample.guidance_interval={interval}"])


def test_the_sampling_jobs_shift_is_the_run_configs_and_draws_as_the_config_would() -> None:
    import argparse

    from sd3ray.cli import add_guidance_args
    from sd3ray.inference import generate, with_guidance

    parser = argparse.ArgumentParser()
    add_guidance_args(parser)
    assert parser.parse_args([]).shift is None  # the run's own sample.shift
    assert parser.parse_args(["--shift", "auto"]).shift == "auto"
    for bad in ("0", "-1", "three"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--shift", bad])
    cfg = load_config("configs/mnist_tiny.yaml", TINY)
    shifted = with_guidance(cfg, shift=parser.parse_args(["--shift", "3"]).shift)
    assert shifted.sample.shift == 3.0 and shifted.sample.guidance_interval == cfg.sample.guidance_interval
    model = _model(0)
    by_option = generate(model, PROMPTS, shifted, 0, torch.device("cpu"), steps=4)
    by_config = generate(model, PROMPTS, load_config("configs/mnist_tiny.yaml", [*TINY, "sample.shift=3"]), 0,
                         torch.device("cpu"), steps=4)
    assert torch.equal(by_option, by_config)
    assert not torch.equal(by_option, generate(model, PROMPTS, cfg, 0, torch.device("cpu"), steps=4))


@torch.no_grad()
def test_an_x0_predicting_model_gives_training_and_every_sampler_the_same_implied_velocity() -> None:
    """flow.prediction = x0: the network's output is x̂0, and the velocity used by the loss (forward) and by the
    samplers (velocity, velocity_fn) is (z_t − x̂0) / max(t, x0_t_min), the same network with the same weights."""
    torch.manual_seed(0)
    cfg = load_config("configs/mnist_tiny.yaml", [*TINY, "flow.prediction=x0", "flow.x0_t_min=0.1"])
    model = Denoiser(cfg).eval()
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    z_t, t = torch.randn(3, 1, 32, 32), torch.tensor([0.9, 0.4, 0.05])
    ids, mask = model.text_encoder.tokenize(PROMPTS)
    context, pooled = model.text_encoder(ids, mask)
    x0_hat = model.mmdit(z_t, t, context, pooled, mask)
    expected = (z_t - x0_hat) / t.clamp_min(0.1).view(-1, 1, 1, 1)
    torch.testing.assert_close(model(z_t, t, ids, mask), expected)
    torch.testing.assert_close(model.velocity_fn(PROMPTS)(z_t, t), expected)
    with pytest.raises(ConfigError, match="flow.x0_t_min"):
        load_config("configs/mnist_tiny.yaml", ["flow.x0_t_min=0"])
