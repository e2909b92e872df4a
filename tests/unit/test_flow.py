import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.optimize import brentq

from sd3ray.config import FlowConfig
from sd3ray.core.flow import (
    fixed_t_validation_loss,
    flow_loss,
    interpolate,
    sample_timesteps,
    shift_timesteps,
    validation_levels,
    velocity_target,
)


def _mode_cdf(t: float, s: float) -> float:
    # t = f_mode(u) decreases from 1 to 0, so P(T <= t) = 1 − f⁻¹(t)
    f = lambda u: 1 - u - s * (math.cos(math.pi / 2 * u) ** 2 - 1 + u) - t  # noqa: E731
    return 1 - brentq(f, 0.0, 1.0)


CDFS = {
    "uniform": (FlowConfig(scheme="uniform"), lambda t: t),
    "logit_normal(0,1)": (FlowConfig(scheme="logit_normal"), lambda t: stats.norm.cdf(math.log(t / (1 - t)))),
    "logit_normal(0.5,0.6)": (FlowConfig(scheme="logit_normal", logit_mean=0.5, logit_std=0.6),
                              lambda t: stats.norm.cdf((math.log(t / (1 - t)) - 0.5) / 0.6)),
    "mode(1.29)": (FlowConfig(scheme="mode", mode_scale=1.29), lambda t: _mode_cdf(t, 1.29)),
    "mode(-0.5)": (FlowConfig(scheme="mode", mode_scale=-0.5), lambda t: _mode_cdf(t, -0.5)),
    "cosmap": (FlowConfig(scheme="cosmap"), lambda t: 2 / math.pi * math.atan(t / (1 - t))),
    # a mixture adds coverage without moving the rest: 80% logit-normal(0, 1), 20% uniform
    "logit_normal + 20% uniform": (FlowConfig(scheme="logit_normal", uniform_fraction=0.2),
                                   lambda t: 0.8 * stats.norm.cdf(math.log(t / (1 - t))) + 0.2 * t),
}


@pytest.mark.parametrize("name", CDFS)
def test_timestep_scheme_matches_its_density(name: str) -> None:
    cfg, cdf = CDFS[name]
    t = sample_timesteps(cfg, 20000, torch.Generator().manual_seed(1)).double().numpy()
    assert t.min() >= 0 and t.max() <= 1
    result = stats.kstest(t, lambda xs: np.array([cdf(min(max(x, 1e-12), 1 - 1e-12)) for x in xs]))
    assert result.pvalue > 0.01, result


def test_schemes_differ_from_each_other() -> None:
    # guards the KS test: the logit-normal sample must be rejected as uniform
    t = sample_timesteps(FlowConfig(scheme="logit_normal"), 20000, torch.Generator().manual_seed(1)).numpy()
    assert stats.kstest(t, "uniform").pvalue < 1e-6


def test_mode_with_zero_scale_is_uniform() -> None:
    a = sample_timesteps(FlowConfig(scheme="mode", mode_scale=0.0), 1000, torch.Generator().manual_seed(3))
    b = sample_timesteps(FlowConfig(scheme="uniform"), 1000, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, 1 - b)  # f_mode(u; 0) = 1 − u: the same density, mirrored draw


def test_shift_formula() -> None:
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_timesteps(t, 3.0), 3 * t / (1 + 2 * t))
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)
    assert shift_timesteps(torch.tensor([0.5]), 3.0) > 0.5  # shift > 1 moves towards noise


def test_interpolation_endpoints_and_target() -> None:
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(interpolate(x0, eps, torch.zeros(3)), x0)
    torch.testing.assert_close(interpolate(x0, eps, torch.ones(3)), eps)
    # dz/dt equals the velocity target
    t, h = torch.full((3,), 0.3), 1e-3
    dz = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(dz, velocity_target(x0, eps), atol=1e-3, rtol=1e-3)


def test_oracle_velocity_gives_zero_loss() -> None:
    x0, eps, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.rand(4)
    assert flow_loss(lambda z, tt: eps - x0, x0, eps, t).item() == 0.0
    assert flow_loss(lambda z, tt: torch.zeros_like(z), x0, eps, t).item() == pytest.approx(
        (eps - x0).pow(2).mean().item(), rel=1e-6)


def test_fixed_t_validation_loss() -> None:
    levels = validation_levels(8)
    torch.testing.assert_close(levels, (torch.arange(8) + 0.5) / 8)
    x0, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    assert fixed_t_validation_loss(lambda z, t: eps - x0, x0, eps, levels).abs().max() == 0
    # predicting x0-direction only: the loss at level t is ‖eps − x0 − v̂‖², checked per level against the formula
    losses = fixed_t_validation_loss(lambda z, t: z, x0, eps, levels)
    for level, loss in zip(levels, losses):
        z = (1 - level) * x0 + level * eps
        assert loss.item() == pytest.approx((z - (eps - x0)).pow(2).mean().item(), rel=1e-5)


def test_an_exact_clean_image_estimate_gives_the_exact_velocity_above_t_min() -> None:
    from sd3ray.core.flow import velocity_from_x0

    x0, eps = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t = torch.tensor([0.9, 0.5, 0.1, 0.02])
    v = velocity_from_x0(interpolate(x0, eps, t), x0, t, t_min=0.05)
    torch.testing.assert_close(v[:3], (eps - x0)[:3])
    # below t_min the division is capped: v = (z_t − x0) / t_min = t·(eps − x0) / t_min
    torch.testing.assert_close(v[3], 0.02 * (eps - x0)[3] / 0.05)
