import pytest
import torch

from epg.schedules import WeightedGrid, karras_sigmas, resolution_shift, shifted_karras_sigmas


def test_karras_grid_endpoints_and_formula():
    s = karras_sigmas(32)
    assert s[0].item() == pytest.approx(80.0, rel=1e-12)
    assert s[-1].item() == pytest.approx(0.002, rel=1e-12)
    assert torch.all(s[1:] < s[:-1])
    i, n = 10, 32
    expected = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(expected, rel=1e-12)


def test_resolution_shift_and_the_released_sampler_grid():
    assert resolution_shift(256) == 4.0 and resolution_shift(512) == 8.0
    grid = shifted_karras_sigmas(32, 256)
    assert grid[0].item() == pytest.approx(320.0) and grid[-1].item() == pytest.approx(0.008)
    # The six grid points inside the guidance interval (0.76, 6.44] at 256 px (spec §8).
    inside = grid[(grid > 0.19 * 4) & (grid <= 1.61 * 4)]
    assert inside.tolist() == pytest.approx([6.434, 4.697, 3.378, 2.391, 1.662, 1.132], abs=1e-3)


def test_bad_grid_arguments():
    with pytest.raises(ValueError, match="at least 2"):
        karras_sigmas(1)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        karras_sigmas(5, sigma_min=1.0, sigma_max=0.5)


def test_nearest_grid_point_is_nearest_in_sigma_not_in_log_sigma():
    # The released find_nearest compares |σ − σ_i| (spec §6.2): 0.3 snaps to 0.002 (0.298 away),
    # where a log-distance would pick 1.0.
    grid = WeightedGrid(torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert grid.nearest(torch.tensor([0.3, 0.6, 50.0])).tolist() == [2, 1, 0]
