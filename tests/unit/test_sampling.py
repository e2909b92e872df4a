import pytest
import torch

from sd3ray.core.sampling import euler, heun, sample, timestep_schedule


def _straight_path_field(x0: torch.Tensor):
    """The exact velocity of the straight path that ends at x0: z_t = (1−t)x0 + t·eps ⇒ v = (z_t − x0)/t."""
    return lambda z, t: (z - x0) / t.view(-1, 1, 1, 1).clamp_min(1e-12)


def test_schedule_spacing_is_one_over_n() -> None:
    times = timestep_schedule(50)
    assert times[0] == 1 and times[-1] == 0 and len(times) == 51
    torch.testing.assert_close(times[:-1] - times[1:], torch.full((50,), 1 / 50))
    shifted = timestep_schedule(10, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and shifted[5] > 0.5


def test_one_euler_step_on_an_exact_straight_path_lands_on_x0() -> None:
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(euler(_straight_path_field(x0), eps, timestep_schedule(1)), x0)


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_euler_at_any_step_count_follows_the_straight_path(steps: int) -> None:
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(sample(_straight_path_field(x0), eps, steps), x0, atol=1e-5, rtol=1e-5)


def test_heun_is_exact_on_linear_paths_down_to_its_last_step_which_is_an_euler_step() -> None:
    # dz/dt = a + b·t integrates exactly to z(s) = z(1) − a(1 − s) − b(1 − s²)/2; Heun's trapezoid rule is exact for
    # it, and its last step, which ends at t = 0, is an Euler step from s = 1/3.
    a, b, z1 = torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3)
    field = lambda z, t: a + b * t.view(-1, 1, 1, 1)  # noqa: E731
    s = 1 / 3
    z_s = z1 - a * (1 - s) - b * (1 - s * s) / 2
    torch.testing.assert_close(heun(field, z1, timestep_schedule(3)), z_s - s * (a + b * s))
    torch.testing.assert_close(heun(field, z1, timestep_schedule(2, shift=3.0)[:2]), z1 - a * 0.25 - b * 0.4375 / 2)
    assert not torch.allclose(euler(field, z1, timestep_schedule(3)), z_s - s * (a + b * s), atol=1e-3)


def test_heun_never_asks_for_the_velocity_at_t_zero() -> None:
    x0, eps, asked = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), []
    exact = _straight_path_field(x0)

    def recording(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        asked.append(float(t[0]))
        return exact(z, t)

    torch.testing.assert_close(heun(recording, eps, timestep_schedule(4)), x0, atol=1e-5, rtol=1e-5)
    assert min(asked) > 0 and len(asked) == 2 * 4 - 1  # two evaluations a step, one on the last
