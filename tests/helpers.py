"""Shared test helpers: tolerance rule and a verbose comparison."""

import torch

# atol / rtol floors by dtype (style.md B4).
FLOORS = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (1e-1, 1.6e-2),
}


def assert_close(actual, expected, atol=None, rtol=None, what=""):
    """assert_close that names the worst element and both values on failure."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if atol is None:
        atol, rtol = FLOORS[expected.dtype if expected.is_floating_point() else torch.float64]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.to(actual.device).double()
    err = (a - e).abs() - rtol * e.abs()
    if err.numel() and err.max() > atol:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{what}: worst at {idx}: got {a[idx].item():.10g}, expected {e[idx].item():.10g} "
            f"(atol {atol}, rtol {rtol})"
        )
