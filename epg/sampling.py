"""Samplers for EPG diffusion and consistency models (epg-method.md §8; conventions of §3).

A *denoiser* is any callable ``denoiser(x, sigma, y) -> x0_hat`` with ``x`` (B, C, H, W),
``sigma`` (B,) the *shifted* noise level actually in ``x`` (x = x0 + σ·ε, §3) and ``y`` (B,) int64
class labels or None, e.g. :class:`epg.models.Denoiser`. Every sampler here works in the
variance-exploding parameterisation with the ODE direction ``d = (x − D(x, σ)) / σ`` and returns
the final state.

The released sampler (§8): ``steps`` shifted Karras points from σ_max·H/64 down to σ_min·H/64
with **no trailing zero**, prior ``x_T = ε·σ_0``, every evaluation guided (classifier-free guidance
inside the interval σ_low·H/64 < σ ≤ σ_high·H/64) and then clamped to [−1, 1]
(:class:`GuidedDenoiser`), then Heun: 32 steps make 62 conditional + 12 unconditional passes at
256 px.

Randomness is per image: image ``i`` of a run with seed ``s`` draws its prior noise and then all of
its per-step noise from one generator seeded by (s, i) (:func:`image_generators`), so its pixels do
not depend on the batch size, on which other images share its batch, or on the number of processes.
(They do depend on the device type: CPU and CUDA generators give different streams.)
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .schedules import RHO, SIGMA_MAX, SIGMA_MIN, resolution_shift, shifted_karras_sigmas
from .seeding import torch_seed

__all__ = [
    "GUIDANCE_SIGMA_HIGH",
    "GUIDANCE_SIGMA_LOW",
    "SAMPLERS",
    "CUDAGraphDenoiser",
    "DenoiserFn",
    "Generators",
    "GuidedDenoiser",
    "ancestral_step",
    "class_labels",
    "consistency",
    "edm_sde",
    "euler",
    "euler_ancestral",
    "euler_sde",
    "heun",
    "image_generators",
    "image_noise",
    "prior",
    "sample",
    "sampling_sigmas",
]

DenoiserFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
# Where a sampler's noise comes from: one generator per image (batch-size independent samples, see
# image_generators), a single generator (one draw for the whole batch) or None (torch's global one).
Generators = torch.Generator | Sequence[torch.Generator] | None

# Guidance interval in unshifted σ (Kynkäänniemi et al. 2024; §8): (0.76, 6.44] at 256 px.
GUIDANCE_SIGMA_LOW = 0.19
GUIDANCE_SIGMA_HIGH = 1.61


# --------------------------------------------------------------------------------------------------
# Noise-level grids
# --------------------------------------------------------------------------------------------------


def sampling_sigmas(
    steps: int,
    img_size: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    trailing_zero: bool = False,
) -> Tensor:
    """The shifted Karras sampling grid (§8): ``steps`` points from σ_max·H/64 to σ_min·H/64.

    Args:
        steps: number of Karras points (≥ 2).
        img_size: image side H; the grid is multiplied by the resolution shift H/64 (§3).
        trailing_zero: False (default) gives the released grid, whose last point is σ̃_min
            (0.008 at 256 px); True appends σ = 0 (EDM convention), giving ``steps + 1`` points.

    Returns:
        (steps,) or (steps + 1,) float64 tensor, strictly decreasing.
    """
    if not _is_int(steps) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2 (Karras points), got {steps!r}")
    sigmas = shifted_karras_sigmas(
        steps, img_size, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho
    )
    if trailing_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _sigma_list(sigmas: Tensor | Sequence[float], min_len: int) -> list[float]:
    """Check a decreasing grid (positive, except an optional final 0); return Python floats."""
    if isinstance(sigmas, Tensor):
        if sigmas.dim() != 1:
            raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
        values = [float(s) for s in sigmas.tolist()]
    else:
        values = [float(s) for s in sigmas]
    if len(values) < min_len:
        raise ValueError(f"this sampler needs at least {min_len} sigmas, got {len(values)}")
    if any(not math.isfinite(s) for s in values) or any(s <= 0 for s in values[:-1]):
        raise ValueError(
            f"sigmas must be finite and positive (only the last may be 0), got {values}"
        )
    if values[-1] < 0 or any(b >= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"sigmas must be strictly decreasing and >= 0, got {values}")
    return values


# --------------------------------------------------------------------------------------------------
# Guidance and clamping
# --------------------------------------------------------------------------------------------------


def guidance_applies(scale: float) -> bool:
    """Whether a guidance scale needs the unconditional pass: w = 1 is the conditional output and
    w = 0 means off (as the released sample.py, which guides only when cfg_scale > 0)."""
    return scale not in (0.0, 1.0)


class GuidedDenoiser:
    """Classifier-free guidance inside a σ interval, then clamping (§8, CFG with interval guidance).

    ``out = out_u + w·(out_c − out_u)`` on the denoiser output (x0-guidance for the diffusion
    model), applied only to the images whose *shifted* σ satisfies
    ``σ_low·H/64 < σ ≤ σ_high·H/64`` (0.76 < σ ≤ 6.44 at 256 px). For those, the conditional and
    unconditional passes run as one batched forward (inputs ``[x, x]``, ``[σ, σ]``,
    ``[y, null_class]``); outside the interval only the conditional pass runs. Any ``w > 0`` is
    applied (``0 < w < 1`` moves towards the unconditional output); ``w = 1`` is the conditional
    output, and ``w = 0`` switches guidance off as in the released ``sample.py`` (which guides
    only when ``cfg_scale > 0``), so neither makes an unconditional pass; nor do
    ``null_class=None`` or ``y=None``. Finally the output is clamped to [−1, 1] when ``clamp``
    is set (default, as released, also without guidance).

    Counters: ``nfe_cond`` / ``nfe_uncond`` count network passes over the batch; a batched
    cond+uncond forward counts one of each (also when only part of the batch is inside the
    interval). ``reset_counts()`` zeroes them.

    Args:
        denoiser: ``denoiser(x, sigma, y) -> x0_hat`` (see the module docstring).
        scale: guidance weight w ≥ 0 (2.5 for EPG-XL/16 at 256 px, 3.2 for EPG-L/32 at 512 px).
        null_class: label of the unconditional ("null") class, e.g. ``net.null_class`` (1000 for
            ImageNet); None disables guidance.
        sigma_low, sigma_high: the interval in *unshifted* σ; pass 0 and ``math.inf`` to guide
            at every σ.
        img_size: image side H, for the shift H/64 of the interval.
        clamp: clamp the (guided) output to [−1, 1].
    """

    def __init__(
        self,
        denoiser: DenoiserFn,
        scale: float,
        null_class: int | None,
        sigma_low: float = GUIDANCE_SIGMA_LOW,
        sigma_high: float = GUIDANCE_SIGMA_HIGH,
        img_size: int = 256,
        clamp: bool = True,
    ):
        if not sigma_low < sigma_high:
            raise ValueError(f"need sigma_low < sigma_high, got {sigma_low}, {sigma_high}")
        if not float(scale) >= 0:
            raise ValueError(f"guidance scale must be >= 0 (0: off), got {scale}")
        if null_class is not None and not _is_int(null_class):
            raise ValueError(f"null_class must be an int or None, got {null_class!r}")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.null_class = None if null_class is None else int(null_class)
        shift = resolution_shift(img_size)
        self.sigma_low = sigma_low * shift  # shifted bounds
        self.sigma_high = sigma_high * shift
        self.clamp = clamp
        self.reset_counts()

    @property
    def guided(self) -> bool:
        return guidance_applies(self.scale) and self.null_class is not None

    def reset_counts(self) -> None:
        self.nfe_cond = 0
        self.nfe_uncond = 0

    def in_interval(self, sigma: Tensor) -> Tensor:
        """Boolean mask: σ_low·H/64 < σ ≤ σ_high·H/64 (σ shifted)."""
        return (sigma > self.sigma_low) & (sigma <= self.sigma_high)

    def __call__(self, x: Tensor, sigma: Tensor | float, y: Tensor | None = None) -> Tensor:
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(B)
        mask = self.in_interval(sigma) if self.guided and y is not None else None
        self.nfe_cond += 1
        if mask is None or not bool(mask.any()):
            out = self.denoiser(x, sigma, y)
        else:
            self.nfe_uncond += 1
            every = bool(mask.all())
            xu, su = (x, sigma) if every else (x[mask], sigma[mask])
            null = torch.full_like(y if every else y[mask], self.null_class)
            both = self.denoiser(torch.cat([x, xu]), torch.cat([sigma, su]), torch.cat([y, null]))
            out_c, out_u = both[:B], both[B:]
            if every:
                out = out_u + self.scale * (out_c - out_u)
            else:
                out = out_c.clone()
                out[mask] = out_u + self.scale * (out_c[mask] - out_u)
        return out.clamp(-1.0, 1.0) if self.clamp else out


class CUDAGraphDenoiser:
    """A denoiser replayed from CUDA graphs, one captured per input shape (CUDA only).

    The first call with a given (x shape, dtype, label shape) warms the denoiser up on a side
    stream, then captures one call into a CUDA graph with static input buffers; later calls copy
    their inputs into those buffers and replay the graph, which removes the per-kernel launch cost
    that dominates small sampling batches. A guided Heun run sees two shapes (B and 2B). The
    denoiser must be free of host synchronisation (the network skips its label-range check while
    capturing) and of data-dependent control flow. Speed-up and bitwise agreement with the eager
    denoiser are checked only on a GPU (``tests/test_generate.py``, marked ``cuda``).
    """

    def __init__(self, denoiser: DenoiserFn, warmup: int = 2):
        self.denoiser = denoiser
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        if x.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need CUDA tensors, got x on {x.device}; sample without "
                               "the CUDA-graph option on this device")
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        key = (tuple(x.shape), x.dtype, None if y is None else (tuple(y.shape), y.dtype))
        entry = self.graphs.get(key)
        if entry is None:
            static = (x.clone(), sigma.clone(), None if y is None else y.clone())
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.denoiser(*static)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.denoiser(*static)
            entry = self.graphs[key] = (graph, static, out)
        graph, (sx, ss, sy), out = entry
        sx.copy_(x)
        ss.copy_(sigma)
        if sy is not None:
            sy.copy_(y)
        graph.replay()
        return out.clone()


# --------------------------------------------------------------------------------------------------
# Per-image randomness
# --------------------------------------------------------------------------------------------------


def _image_seed(seed: int, index: int) -> int:
    # SeedSequence mixes (seed, index) into well-separated 64-bit states, so neighbouring images
    # (and neighbouring seeds) get unrelated streams, unlike seed·N + index.
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def image_generators(
    indices: Sequence[int] | Tensor, seed: int, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One fresh generator per image, seeded by (seed, index); on ``device``'s type.

    A sampler given this list draws the prior noise of image i first, then its per-step noise,
    all from generator i: the image is the same whatever batch or process it is sampled in.
    """
    if isinstance(indices, Tensor):
        indices = indices.tolist()
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if any(not _is_int(i) or i < 0 for i in indices):
        raise ValueError("image indices must be non-negative ints")
    gens = []
    for i in indices:
        g = torch.Generator(device=device)
        g.manual_seed(_image_seed(seed, int(i)))
        gens.append(g)
    return gens


def _randn(shape: Sequence[int], like: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise of ``shape`` (B, ...); row b from ``generator[b]`` given a list."""
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
    if len(generator) != shape[0]:
        raise ValueError(f"need one generator per image: {shape[0]}, got {len(generator)}")
    return torch.stack(
        [
            torch.randn(shape[1:], generator=g, dtype=like.dtype, device=like.device)
            for g in generator
        ]
    )


def image_noise(
    indices: Sequence[int] | Tensor,
    shape: Sequence[int],
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Unit prior noise ε of the images ``indices``: (len(indices), *shape), row i from (seed, i).

    ``shape`` is the shape of one image, (C, H, W). This is the first draw of each
    :func:`image_generators` stream, i.e. exactly the ε behind ``x_T = ε·σ_0`` in :func:`sample`.
    """
    gens = image_generators(indices, seed, device)
    like = torch.empty(0, dtype=dtype, device=device)
    return _randn((len(gens), *shape), like, gens)


def prior(
    shape: Sequence[int],
    sigmas: Tensor | Sequence[float],
    generator: Generators = None,
    noise: Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The prior sample ``x_T = ε·σ_0`` (§8), (B, C, H, W) with ``shape = (B, C, H, W)``.

    ε is ``noise`` when given, else drawn from ``generator`` (one generator, a list of B
    per-image generators, or None for the global generator).
    """
    sigma_0 = _sigma_list(sigmas, 1)[0]
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")
        return noise * sigma_0
    if device is None:  # the generators' device
        if isinstance(generator, torch.Generator):
            device = generator.device
        else:
            device = generator[0].device if generator else "cpu"
    like = torch.empty(0, dtype=dtype, device=device)
    return _randn(shape, like, generator) * sigma_0


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------


def _check_inputs(x: Tensor, y: Tensor | None) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(
            f"x_T must be a floating-point (B, C, H, W) tensor, got {getattr(x, 'shape', x)}"
        )
    if y is not None and (not isinstance(y, Tensor) or tuple(y.shape) != (x.shape[0],)):
        raise ValueError(
            f"y must be None or ({x.shape[0]},) int64 class labels, got {getattr(y, 'shape', y)}"
        )


def _evaluate(denoiser: DenoiserFn, x: Tensor, sigma: float, y: Tensor | None) -> Tensor:
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device), y)


def _steps(n: int, progress: bool, name: str):
    return tqdm(range(n), desc=name, disable=not progress, leave=False)


@torch.no_grad()
def heun(
    denoiser: DenoiserFn,
    x_T: Tensor,
    sigmas: Tensor | Sequence[float],
    y: Tensor | None = None,
    *,
    generator: Generators = None,
    progress: bool = False,
) -> Tensor:
    """Deterministic Heun sampler (EDM Algorithm 2 with S_churn = 0; the released DM sampler, §8).

    For i = 0..N−2: ``d = (x − D(x, σ_i))/σ_i``, Euler ``x' = x + (σ_{i+1} − σ_i)·d``; if
    σ_{i+1} > 0, correct with ``d' = (x' − D(x', σ_{i+1}))/σ_{i+1}`` and
    ``x ← x + (σ_{i+1} − σ_i)·(d + d')/2``, else ``x ← x'``.

    NFE: 2·(N−1) for N sigmas without a trailing zero (62 for the released 32-point grid), 2·(N−1)−1
    with one (the final step to 0 is Euler). ``generator`` is unused (deterministic).

    Returns x at σ_{N−1} (σ̃_min on the released grid, not a further denoised image).
    """
    del generator
    sig = _sigma_list(sigmas, 2)
    _check_inputs(x_T, y)
    x = x_T
    for i in _steps(len(sig) - 1, progress, "heun"):
        x = _heun_step(denoiser, x, sig[i], sig[i + 1], y)
    return x


def _heun_step(
    denoiser: DenoiserFn, x: Tensor, s: float, s_next: float, y: Tensor | None, correct: bool = True
) -> Tensor:
    """One EDM Alg. 2 step from σ = s to s_next: Euler, then the trapezoidal correction unless
    s_next is 0 (where the slope is undefined and the step stays first order) or ``correct`` is
    off."""
    d = (x - _evaluate(denoiser, x, s, y)) / s
    x_next = x + (s_next - s) * d
    if correct and s_next > 0:
        d_next = (x_next - _evaluate(denoiser, x_next, s_next, y)) / s_next
        x_next = x + (s_next - s) * 0.5 * (d + d_next)
    return x_next


@torch.no_grad()
def euler(
    denoiser: DenoiserFn,
    x_T: Tensor,
    sigmas: Tensor | Sequence[float],
    y: Tensor | None = None,
    *,
    generator: Generators = None,
    progress: bool = False,
) -> Tensor:
    """Probability-flow ODE, Euler steps (§8): ``x ← x + (σ_{i+1} − σ_i)·(x − D(x, σ_i))/σ_i``.

    NFE: N−1 for N sigmas. Deterministic (``generator`` unused).
    """
    del generator
    sig = _sigma_list(sigmas, 2)
    _check_inputs(x_T, y)
    x = x_T
    for i in _steps(len(sig) - 1, progress, "euler"):
        s, s_next = sig[i], sig[i + 1]
        x = x + (s_next - s) * (x - _evaluate(denoiser, x, s, y)) / s
    return x


def ancestral_step(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(σ_down, σ_up) of an ancestral step σ → σ_next (η = 1, §8):
    ``σ_up = min(σ_next, sqrt(σ_next²(σ² − σ_next²)/σ²))``, ``σ_down = sqrt(σ_next² − σ_up²)``."""
    sigma_up = min(sigma_next, math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0)), sigma_up


@torch.no_grad()
def euler_ancestral(
    denoiser: DenoiserFn,
    x_T: Tensor,
    sigmas: Tensor | Sequence[float],
    y: Tensor | None = None,
    *,
    generator: Generators = None,
    progress: bool = False,
) -> Tensor:
    """Euler ancestral sampler (§8): Euler to σ_down, then add fresh noise of std σ_up.

    ``x ← x + (σ_down − σ_i)·d + σ_up·z`` with ``(σ_down, σ_up) = ancestral_step(σ_i, σ_{i+1})``;
    no noise on a step to σ = 0. NFE: N−1. ``z`` comes from ``generator`` (per-image list for
    batch-size independent samples).
    """
    sig = _sigma_list(sigmas, 2)
    _check_inputs(x_T, y)
    x = x_T
    for i in _steps(len(sig) - 1, progress, "euler_ancestral"):
        s, s_next = sig[i], sig[i + 1]
        d = (x - _evaluate(denoiser, x, s, y)) / s
        sigma_down, sigma_up = ancestral_step(s, s_next)
        x = x + (sigma_down - s) * d
        if s_next > 0:
            x = x + sigma_up * _randn(x.shape, x, generator)
    return x


@torch.no_grad()
def euler_sde(
    denoiser: DenoiserFn,
    x_T: Tensor,
    sigmas: Tensor | Sequence[float],
    y: Tensor | None = None,
    *,
    generator: Generators = None,
    progress: bool = False,
) -> Tensor:
    """Euler–Maruyama on the reverse VE SDE (§8): ``x ← x + 2d·dt + sqrt(2σ(σ − σ_next))·z``,
    ``dt = σ_next − σ``, ``d = (x − D(x, σ))/σ``.

    A step to σ_next = 0 (trailing-zero grid only) is the plain Euler step ``x ← D(x, σ)``: the
    SDE step is ill-posed there. NFE: N−1.
    """
    sig = _sigma_list(sigmas, 2)
    _check_inputs(x_T, y)
    x = x_T
    for i in _steps(len(sig) - 1, progress, "euler_sde"):
        s, s_next = sig[i], sig[i + 1]
        denoised = _evaluate(denoiser, x, s, y)
        if s_next == 0:
            x = denoised
            continue
        d = (x - denoised) / s
        x = (
            x
            + 2 * (s_next - s) * d
            + math.sqrt(2 * s * (s - s_next)) * _randn(x.shape, x, generator)
        )
    return x


@torch.no_grad()
def edm_sde(
    denoiser: DenoiserFn,
    x_T: Tensor,
    sigmas: Tensor | Sequence[float],
    y: Tensor | None = None,
    *,
    S_churn: float = 40.0,
    S_min: float = 0.05,
    S_max: float = 50.0,
    S_noise: float = 1.003,
    generator: Generators = None,
    progress: bool = False,
) -> Tensor:
    """EDM stochastic sampler (EDM Algorithm 2 with churn; §8).

    For each step: ``γ = min(S_churn/N, √2 − 1)`` if ``S_min ≤ σ_i ≤ S_max`` else 0, with
    **N = len(sigmas)** (as released, so the trailing-zero grid counts its 0); ``σ̂ = σ_i(1 + γ)``,
    ``x̂ = x + sqrt(σ̂² − σ_i²)·S_noise·z``; then a Heun step from σ̂ to σ_{i+1}, except on the
    last step, which is an Euler step whatever σ_{N−1} is (as released: the correction is
    skipped on the last interval, also on the grid without a trailing zero). S_min/S_max are
    compared with the grid's σ as given (shifted). NFE: 2N − 3 (61 for 32 points).
    """
    sig = _sigma_list(sigmas, 2)
    _check_inputs(x_T, y)
    num_steps = len(sig)
    x = x_T
    for i in _steps(len(sig) - 1, progress, "edm_sde"):
        s, s_next = sig[i], sig[i + 1]
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= s <= S_max else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s**2) * S_noise * _randn(x.shape, x, generator)
        x = _heun_step(denoiser, x, s_hat, s_next, y, correct=i < len(sig) - 2)
    return x


@torch.no_grad()
def consistency(
    denoiser: DenoiserFn,
    x_T: Tensor,
    sigmas: Tensor | Sequence[float],
    y: Tensor | None = None,
    *,
    sigma_min: float = 0.0,
    generator: Generators = None,
    progress: bool = False,
) -> Tensor:
    """Consistency-model sampling (§8): one step ``D(x_T, σ_0)``, or multi-step iCT/ECT style.

    With K sigmas σ_0 > … > σ_{K−1} > 0: ``x = D(x_T, σ_0)``; for i = 1..K−1,
    ``x ← D(x + sqrt(σ_i² − σ̃_min²)·z, σ_i)``. ``sigma_min`` is σ̃_min, the (shifted) level at
    which the consistency function is the identity: pass 0.002·H/64 (:func:`sample` does). The
    intermediate σ of the released 2-step result are unknown (§8, §13 q.7). NFE: K.
    """
    sig = _sigma_list(sigmas, 1)
    if sig[-1] == 0:
        raise ValueError("consistency sigmas must all be positive (no trailing zero)")
    if not 0 <= sigma_min < sig[-1]:
        raise ValueError(
            f"sigma_min must be in [0, {sig[-1]}) (below every sigma), got {sigma_min}"
        )
    _check_inputs(x_T, y)
    x = _evaluate(denoiser, x_T, sig[0], y)
    for s in tqdm(sig[1:], desc="consistency", disable=not progress, leave=False):
        x = x + math.sqrt(s**2 - sigma_min**2) * _randn(x.shape, x, generator)
        x = _evaluate(denoiser, x, s, y)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "heun": heun,
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "euler_sde": euler_sde,
    "edm_sde": edm_sde,
    "consistency": consistency,
}


# --------------------------------------------------------------------------------------------------
# Labels and the batched driver
# --------------------------------------------------------------------------------------------------


def class_labels(
    n: int,
    num_classes: int,
    balanced: bool = True,
    seed: int = 0,
    class_counts: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Evaluation class labels (§8 "Class labels at evaluation"), (n,) int64.

    balanced: label of image i is ``i mod num_classes`` (classes 0..K−1 repeated; 50 per class for
        50k ImageNet images). When K does not divide n, classes 0..(n mod K)−1 get one image more.
    not balanced: i.i.d. draws from a generator seeded by ``seed``: multinomial on
        ``class_counts`` (the training class frequencies) when given, else uniform.
    """
    if not _is_int(n) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if balanced:
        if class_counts is not None:
            raise ValueError("class_counts is only used with balanced=False")
        return torch.arange(n, dtype=torch.int64) % num_classes
    g = torch.Generator().manual_seed(torch_seed(seed))
    if class_counts is None:
        return torch.randint(num_classes, (n,), generator=g, dtype=torch.int64)
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.shape != (num_classes,) or bool((counts < 0).any()) or not counts.sum() > 0:
        raise ValueError(
            f"class_counts must be ({num_classes},) non-negative with a positive sum, "
            f"got shape {tuple(counts.shape)}"
        )
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.multinomial(counts / counts.sum(), n, replacement=True, generator=g)


def sample(
    denoiser: DenoiserFn,
    labels: Tensor | None,
    img_size: int,
    channels: int = 3,
    steps: int = 32,
    sampler: str = "heun",
    guidance: float = 1.0,
    *,
    null_class: int | None = None,
    guidance_interval: tuple[float, float] = (GUIDANCE_SIGMA_LOW, GUIDANCE_SIGMA_HIGH),
    clamp: bool = True,
    sigmas: Tensor | Sequence[float] | None = None,
    trailing_zero: bool = False,
    seed: int = 0,
    indices: Sequence[int] | Tensor | None = None,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    sampler_kwargs: dict | None = None,
    progress: bool = True,
) -> Tensor:
    """Sample the images ``indices`` in batches; returns (N, C, H, W) on CPU, in ``indices`` order.

    Image i gets label ``labels[k]`` (k its position in ``indices``), prior noise and per-step
    noise from :func:`image_generators` (seed, i), so results do not depend on ``batch_size`` or on
    how indices are split over processes. Every evaluation goes through :class:`GuidedDenoiser`
    (guidance ``guidance`` with ``null_class``, the interval ``guidance_interval`` in unshifted σ,
    clamp to [−1, 1]). The network must be in eval mode (a network in train mode is refused).

    Args:
        denoiser: ``denoiser(x, sigma, y) -> x0_hat``.
        labels: (N,) int64 class labels, or None for unconditional sampling (then ``indices``
            gives N).
        img_size, channels: image shape; img_size also sets the shift H/64.
        steps: Karras points for the ODE/SDE samplers (≥ 2; 32 as released). For "consistency",
            the number of network evaluations (≥ 1): the first ``steps`` points of the
            ``steps + 1``-point grid (so 1 → the one-step sampler at σ_max·H/64).
        sampler: a key of :data:`SAMPLERS`.
        null_class: the unconditional label for guidance; default ``denoiser.net.null_class``
            when guidance is on (neither 0 nor 1) and the denoiser is an epg :class:`Denoiser`.
        sigmas: explicit grid (shifted σ), overriding ``steps``/``trailing_zero``.
        indices: global image indices (default ``range(N)``).
        sampler_kwargs: extra keyword arguments of the sampler (e.g. edm_sde's S_churn).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    if indices is None:
        if labels is None:
            raise ValueError("unconditional sampling (labels=None) needs indices")
        indices = range(len(labels))
    indices = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
    n = len(indices)
    if labels is not None:
        if (
            not isinstance(labels, Tensor)
            or labels.shape != (n,)
            or labels.dtype not in (torch.int64, torch.int32)
        ):
            raise ValueError(
                f"labels must be a ({n},) int64 tensor (one per index), got "
                f"{tuple(getattr(labels, 'shape', ()))} {getattr(labels, 'dtype', type(labels))}"
            )
        labels = labels.to(torch.int64)
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    net = getattr(denoiser, "net", None)  # an epg Denoiser's network
    if isinstance(net, nn.Module) and net.training:
        raise ValueError("the network is in train mode, where its dropout changes every sample and "
                         "the seed repeats nothing: call .eval() on it first")  # fmt: skip
    if labels is not None and null_class is None and float(guidance) not in (0.0, 1.0):
        null_class = getattr(net, "null_class", None)
        if null_class is None:  # guidance would be off without a word
            raise ValueError(f"guidance {guidance} needs null_class, the unconditional label (an epg "
                             "network's net.null_class); guidance=1 samples without guidance")  # fmt: skip

    kwargs = dict(sampler_kwargs or {})
    if sigmas is None:
        if sampler == "consistency":
            if not _is_int(steps) or steps < 1:
                raise ValueError(f"steps must be an integer >= 1 for consistency, got {steps!r}")
            sigmas = sampling_sigmas(steps + 1, img_size)[:steps]
        else:
            sigmas = sampling_sigmas(steps, img_size, trailing_zero=trailing_zero)
    if sampler == "consistency":
        kwargs.setdefault("sigma_min", SIGMA_MIN * resolution_shift(img_size))
    sigma_list = _sigma_list(sigmas, 1 if sampler == "consistency" else 2)

    guided = GuidedDenoiser(
        denoiser, guidance, null_class, *guidance_interval, img_size=img_size, clamp=clamp
    )
    run = SAMPLERS[sampler]
    out = torch.empty((n, channels, img_size, img_size), dtype=dtype)
    with tqdm(total=n, desc=f"sampling ({sampler})", unit="img", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            batch = indices[start : start + batch_size]
            gens = image_generators(batch, seed, device)
            shape = (len(batch), channels, img_size, img_size)
            x_T = prior(shape, sigma_list, gens, dtype=dtype, device=device)
            y = None if labels is None else labels[start : start + batch_size].to(device)
            x = run(guided, x_T, sigma_list, y, generator=gens, **kwargs)
            out[start : start + len(batch)] = x.to("cpu", dtype)
            bar.update(len(batch))
    return out
