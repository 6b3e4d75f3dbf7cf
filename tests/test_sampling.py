"""Samplers, guidance interval, NFE accounting and per-image randomness (epg-method.md §8)."""

import math

import pytest
import torch
from helpers import assert_close

from epg.models import Denoiser, build
from epg.objectives import ConsistencyObjective
from epg.sampling import (
    SAMPLERS,
    GuidedDenoiser,
    ancestral_step,
    class_labels,
    consistency,
    edm_sde,
    euler,
    euler_ancestral,
    euler_sde,
    heun,
    image_generators,
    image_noise,
    prior,
    sample,
    sampling_sigmas,
)

IN_INTERVAL_256 = [6.434, 4.697, 3.378, 2.391, 1.662, 1.132]  # spec §8, shifted σ at 256 px
NULL = 10


class CountingZeros:
    """Fake denoiser returning zeros; logs (batch size, σ values, labels) of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, y):
        assert sigma.shape == (x.shape[0],)
        self.calls.append((x.shape[0], sigma.tolist(), None if y is None else y.tolist()))
        return torch.zeros_like(x)


class GaussianData:
    """Exact denoiser for data ~ N(mu, s²) per pixel: E[x0 | x_σ] = (s²x + σ²mu)/(s² + σ²)."""

    def __init__(self, mu, s):
        self.mu, self.s = mu, s

    def __call__(self, x, sigma, y=None):
        var = sigma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) ** 2
        return (self.s**2 * x + var * self.mu) / (self.s**2 + var)


class LabelDependent:
    """Output depends on x, σ and y (the null class gives a different value)."""

    def __call__(self, x, sigma, y):
        shape = (-1, 1, 1, 1)
        return 0.1 * x + 0.01 * sigma.view(shape) + 0.05 * y.to(x.dtype).view(shape)


# --- grids and NFE accounting ------------------------------------------------------------------


def test_sampling_sigmas_released_and_edm_grids():
    g = sampling_sigmas(32, 256)
    assert (
        g.shape == (32,)
        and g[0].item() == pytest.approx(320.0)
        and g[-1].item() == pytest.approx(0.008)
    )
    g0 = sampling_sigmas(32, 512, trailing_zero=True)
    assert g0.shape == (33,) and g0[-1].item() == 0.0 and g0[-2].item() == pytest.approx(0.016)


def test_heun_32_with_interval_cfg_makes_62_cond_and_12_uncond_passes():
    fake = CountingZeros()
    guided = GuidedDenoiser(fake, scale=2.5, null_class=NULL, img_size=256)
    x_T = prior((2, 1, 4, 4), sampling_sigmas(32, 256))
    y = torch.tensor([3, 7])
    heun(guided, x_T, sampling_sigmas(32, 256), y)
    assert (guided.nfe_cond, guided.nfe_uncond) == (62, 12)
    assert len(fake.calls) == 62  # 12 of them are batched cond+uncond forwards
    batched = [c for c in fake.calls if c[0] == 4]
    assert len(batched) == 12 and all(c[2] == [3, 7, NULL, NULL] for c in batched)
    assert all(c[0] == 2 and c[2] == [3, 7] for c in fake.calls if c[0] != 4)
    guided_sigmas = sorted({c[1][0] for c in batched}, reverse=True)
    assert guided_sigmas == pytest.approx(IN_INTERVAL_256, abs=1e-3)
    guided.reset_counts()
    assert (guided.nfe_cond, guided.nfe_uncond) == (0, 0)
    # EDM convention (trailing 0): 2·32 − 1 conditional passes, same 12 unconditional ones.
    heun(guided, x_T, sampling_sigmas(32, 256, trailing_zero=True), y)
    assert (guided.nfe_cond, guided.nfe_uncond) == (63, 12)


# At 16 px the grid ends at σ̃_min = 0.0005: the last Heun correction is skipped only at σ = 0,
# not at any small σ.
@pytest.mark.parametrize("img_size", [256, 16])
@pytest.mark.parametrize(
    "fn, nfe",
    [(euler, 9), (euler_ancestral, 9), (euler_sde, 9), (edm_sde, 17), (heun, 18)],
)
def test_nfe_of_each_sampler(fn, nfe, img_size):
    guided = GuidedDenoiser(CountingZeros(), scale=1.0, null_class=NULL, img_size=img_size)
    fn(guided, torch.randn(2, 1, 4, 4), sampling_sigmas(10, img_size), torch.tensor([0, 1]))
    assert (guided.nfe_cond, guided.nfe_uncond) == (nfe, 0)


# --- toy Gaussian problem with the exact denoiser ------------------------------------------------


def _exact_flow(x_T, sigmas, mu, s):
    """The exact probability-flow solution for N(mu, s²) data: x − mu scales with sqrt(s² + σ²)."""
    s0, sN = sigmas[0].item(), sigmas[-1].item()
    return mu + (x_T - mu) * math.sqrt((s**2 + sN**2) / (s**2 + s0**2))


@pytest.mark.parametrize("fn, steps, tol", [(heun, 32, 0.03), (euler, 400, 0.01)])
def test_ode_samplers_reach_the_data_distribution(fn, steps, tol):
    mu, s = 0.3, 0.5
    sigmas = sampling_sigmas(steps, 256)
    x_T = prior((8, 1, 64, 64), sigmas, torch.Generator().manual_seed(1), dtype=torch.float64)
    x = fn(GaussianData(mu, s), x_T, sigmas)
    exact = _exact_flow(x_T, sigmas, mu, s)
    assert ((x - exact) / (exact - mu)).abs().max().item() < tol  # pathwise, relative
    # 32768 i.i.d. pixels: standard error of the mean ≈ 0.003, of the variance ≈ 0.8%.
    assert x.mean().item() == pytest.approx(mu, abs=0.012)
    assert x.var().item() == pytest.approx(s**2, rel=0.03 + 2 * tol)


def test_heun_is_second_order_and_euler_first_order():
    mu, s = 0.3, 0.5

    def error(fn, steps):
        sigmas = sampling_sigmas(steps, 256)
        x_T = prior((1, 1, 16, 16), sigmas, torch.Generator().manual_seed(1), dtype=torch.float64)
        return (fn(GaussianData(mu, s), x_T, sigmas) - _exact_flow(x_T, sigmas, mu, s)).abs().max()

    assert 3.5 < error(heun, 32) / error(heun, 64) < 4.5
    assert 1.8 < error(euler, 64) / error(euler, 128) < 2.2


def test_stochastic_samplers_reach_the_data_distribution():
    mu, s = -0.2, 0.4
    sigmas = sampling_sigmas(512, 64)  # first-order samplers: their bias on the std is O(1/steps)
    for fn in (euler_ancestral, euler_sde, edm_sde):
        g = torch.Generator().manual_seed(2)
        x_T = prior((4, 1, 64, 64), sigmas, g, dtype=torch.float64)
        x = fn(GaussianData(mu, s), x_T, sigmas, generator=g)
        assert x.mean().item() == pytest.approx(mu, abs=0.02), fn.__name__
        assert x.std().item() == pytest.approx(s, rel=0.03), fn.__name__


def test_one_euler_sde_step_by_hand():
    den, x = GaussianData(0.3, 0.5), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    s, s_next = 2.0, 0.5
    out = euler_sde(den, x, [s, s_next], generator=image_generators([0, 1], seed=7))
    # The step's noise is the first draw of each image's stream.
    z = image_noise([0, 1], (1, 4, 4), seed=7, dtype=torch.float64)
    d = (x - den(x, torch.full((2,), s, dtype=torch.float64))) / s
    expected = x + 2 * (s_next - s) * d + math.sqrt(2 * s * (s - s_next)) * z
    assert_close(out, expected, what="euler_sde step")


def test_one_edm_sde_step_by_hand():
    den, x = GaussianData(0.3, 0.5), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    s, s_next = 2.0, 0.5
    # N = len(sigmas) = 2: γ = 0.3/2 = 0.15, where N − 1 would give 0.3 (both below √2 − 1).
    out = edm_sde(den, x, [s, s_next], S_churn=0.3, generator=image_generators([0, 1], seed=7))
    z = image_noise([0, 1], (1, 4, 4), seed=7, dtype=torch.float64)
    s_hat = s * 1.15
    x_hat = x + math.sqrt(s_hat**2 - s**2) * 1.003 * z  # default S_noise 1.003
    # A 2-point grid is all last step: Euler from σ̂, no correction.
    d = (x_hat - den(x_hat, torch.full((2,), s_hat, dtype=torch.float64))) / s_hat
    assert_close(out, x_hat + (s_next - s_hat) * d, what="edm_sde step")


def test_one_step_consistency_with_the_exact_denoiser_gives_the_posterior_mean():
    mu, s = 0.3, 0.5
    sigmas = sampling_sigmas(32, 256)[:1]
    x_T = prior((2, 3, 8, 8), sigmas, torch.Generator().manual_seed(3), dtype=torch.float64)
    x = consistency(GaussianData(mu, s), x_T, sigmas)
    assert_close(x, torch.full_like(x, mu), atol=1e-2, rtol=0, what="one-step x0")
    # Two steps (iCT/ECT): x = D(x_T, σ_0); x ← D(x + sqrt(σ_1² − σ̃_min²)·z, σ_1).
    den = GaussianData(mu, s)
    x2 = consistency(
        den, x_T, [320.0, 1.0], sigma_min=0.008, generator=torch.Generator().manual_seed(4)
    )
    z = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    one = torch.ones(2, dtype=torch.float64)
    expected = den(den(x_T, 320 * one) + math.sqrt(1 - 0.008**2) * z, one)
    assert_close(x2, expected, what="two-step consistency")


def test_sample_consistency_grid_and_sigma_min():
    fake = CountingZeros()
    labels = torch.tensor([1, 2])
    sample(fake, labels, img_size=8, channels=1, steps=1, sampler="consistency", progress=False)
    assert [c[1] for c in fake.calls] == [[10.0, 10.0]]  # one step at σ_max·H/64
    fake.calls.clear()
    sample(fake, labels, img_size=128, channels=1, steps=2, sampler="consistency", progress=False)
    assert [c[1][0] for c in fake.calls] == pytest.approx(sampling_sigmas(3, 128)[:2].tolist())


def test_sample_consistency_renoises_down_to_the_shifted_sigma_min():
    # Re-noising to σ_mid = 0.05 adds sqrt(σ_mid² − σ̃_min²) of noise: at 256 px
    # σ̃_min = 0.008, which differs from the unshifted 0.002 by 1% in that std.
    den, labels = GaussianData(0.3, 0.5), torch.tensor([1, 2])
    kw = {
        "img_size": 256,
        "channels": 1,
        "sampler": "consistency",
        "sigmas": [320.0, 0.05],
        "clamp": False,
        "dtype": torch.float64,
        "progress": False,
    }
    out = sample(den, labels, **kw)
    shifted = sample(den, labels, sampler_kwargs={"sigma_min": 0.002 * 256 / 64}, **kw)
    unshifted = sample(den, labels, sampler_kwargs={"sigma_min": 0.002}, **kw)
    assert_close(out, shifted, atol=0, rtol=0, what="default σ̃_min vs 0.008")
    assert (out - unshifted).abs().max() > 1e-5


def test_edm_denoiser_is_c_skip_x_plus_c_out_F_away_from_sigma_min():
    # Weights of std 0.5 make |F| > 1 at some pixels, so clamping F would show.
    torch.manual_seed(0)
    net = build("epg-tiny", embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.5)
    net.eval()
    den = Denoiser(net, mode="edm")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    sigma, y = torch.tensor([0.3, 40.0]), torch.tensor([3, 7])
    x = x0 + sigma.view(2, 1, 1, 1) * eps
    # Spec §3 at 32 px: σ_d = 0.5, σ̃_min = 0.002·32/64.
    sd, smin, s = 0.5, 0.002 * 32 / 64, sigma.view(2, 1, 1, 1)
    c_in = 1 / torch.sqrt(s**2 + sd**2)
    c_skip = sd**2 / ((s - smin) ** 2 + sd**2)
    c_out = (s - smin) * sd / torch.sqrt(s**2 + sd**2)
    with torch.no_grad():
        F = net(c_in * x, 250 * torch.log(sigma), y)
        out = den(x, sigma, y)
    assert F.abs().max() > 2
    assert_close(out, c_skip * x + c_out * F, what="D = c_skip·x + c_out·F")
    # The training objective's D_θ is the same function.
    objective = ConsistencyObjective(net, None, img_size=32, num_classes=10)
    with torch.no_grad():
        trained = objective.denoise(x0, eps, sigma, y)
    assert_close(out, trained, what="Denoiser vs ConsistencyObjective")


# --- guidance -------------------------------------------------------------------------------------


def test_cfg_interval_edges_exactly():
    # (σ_low·H/64, σ_high·H/64] = (0.76, 6.44] at 256 px: open below, closed above.
    guided = GuidedDenoiser(LabelDependent(), scale=2.0, null_class=NULL, img_size=256)
    low, high = 0.19 * 256 / 64, 1.61 * 256 / 64
    sigma = torch.tensor(
        [math.nextafter(low, 0), low, math.nextafter(low, math.inf), 3.0,
         math.nextafter(high, 0), high, math.nextafter(high, math.inf)],
        dtype=torch.float64,
    )  # fmt: skip
    assert guided.in_interval(sigma).tolist() == [False, False, True, True, True, True, False]


def test_cfg_scale_1_is_the_conditional_path_exactly():
    den = LabelDependent()
    x, y = torch.randn(3, 2, 4, 4), torch.tensor([1, 4, 9])
    for sigma in (3.0, 100.0):
        guided = GuidedDenoiser(den, scale=1.0, null_class=NULL, clamp=False)
        sig = torch.full((3,), sigma)
        assert torch.equal(guided(x, sig, y), den(x, sig, y))
        assert guided.nfe_uncond == 0
    # no null class: no guidance either, even with scale > 1
    guided = GuidedDenoiser(den, scale=3.0, null_class=None, clamp=False)
    assert torch.equal(guided(x, torch.full((3,), 3.0), y), den(x, torch.full((3,), 3.0), y))


@pytest.mark.parametrize("w", [0.5, 1.5])
def test_cfg_scales_below_one_are_applied_too(w):
    den = LabelDependent()
    x, y, sig = torch.randn(3, 2, 4, 4), torch.tensor([1, 4, 9]), torch.full((3,), 3.0)
    guided = GuidedDenoiser(den, scale=w, null_class=NULL, clamp=False)
    cond, uncond = den(x, sig, y), den(x, sig, torch.full_like(y, NULL))
    assert_close(guided(x, sig, y), uncond + w * (cond - uncond), what=f"w={w}")
    assert guided.nfe_uncond == 1


def test_cfg_scale_0_is_off_and_negative_scales_are_refused():
    den = LabelDependent()
    x, y, sig = torch.randn(3, 2, 4, 4), torch.tensor([1, 4, 9]), torch.full((3,), 3.0)
    guided = GuidedDenoiser(den, scale=0.0, null_class=NULL, clamp=False)
    assert torch.equal(guided(x, sig, y), den(x, sig, y)) and guided.nfe_uncond == 0
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        GuidedDenoiser(den, scale=-1.0, null_class=NULL)


def test_edm_sde_ends_with_an_euler_step_as_released():
    seen = []

    def recording(x, sigma, y):
        seen.append(float(sigma[0]))
        return torch.zeros_like(x)

    sigmas = sampling_sigmas(4, 256)
    edm_sde(recording, torch.randn(1, 1, 2, 2), sigmas, S_churn=0.0)
    s = sigmas.tolist()
    assert seen == pytest.approx([s[0], s[1], s[1], s[2], s[2]])  # no evaluation at σ_3


def test_cfg_only_inside_the_interval_along_a_heun_trajectory():
    den, w = LabelDependent(), 2.5
    record = []

    def recording(x, sigma, y):
        out = guided(x, sigma, y)
        record.append((sigma[0].item(), x.clone(), out))
        return out

    guided = GuidedDenoiser(den, scale=w, null_class=NULL, img_size=256, clamp=False)
    y = torch.tensor([2, 5])
    x_T = prior((2, 1, 4, 4), sampling_sigmas(32, 256), torch.Generator().manual_seed(0))
    heun(recording, x_T, sampling_sigmas(32, 256), y)
    inside = set()
    for sigma, x, out in record:
        sig = torch.full((2,), sigma)
        cond = den(x, sig, y)
        if 0.76 < sigma <= 6.44:
            inside.add(round(sigma, 3))
            uncond = den(x, sig, torch.full_like(y, NULL))
            assert_close(out, uncond + w * (cond - uncond), what=f"guided at σ={sigma}")
            assert not torch.allclose(out, cond)
        else:
            assert torch.equal(out, cond), f"guidance applied outside the interval at σ={sigma}"
    assert sorted(inside, reverse=True) == pytest.approx(IN_INTERVAL_256, abs=1e-3)


def test_cfg_per_image_sigma_and_clamp():
    den, w = LabelDependent(), 2.0
    x, y = torch.randn(3, 1, 2, 2) * 20, torch.tensor([1, 2, 3])
    sigma = torch.tensor([3.0, 100.0, 1.0])  # inside, outside, inside at 256 px
    raw = GuidedDenoiser(den, scale=w, null_class=NULL, clamp=False)(x, sigma, y)
    cond, uncond = den(x, sigma, y), den(x, sigma, torch.full_like(y, NULL))
    expected = torch.where(
        torch.tensor([True, False, True]).view(-1, 1, 1, 1), uncond + w * (cond - uncond), cond
    )
    assert_close(raw, expected, what="per-image interval")
    clamped = GuidedDenoiser(den, scale=1.0, null_class=NULL)(x, sigma, y)
    assert clamped.abs().max().item() <= 1.0 and torch.equal(clamped, cond.clamp(-1, 1))


# --- per-image randomness -------------------------------------------------------------------------


def _tiny_denoiser():
    """An 8-px epg-tiny variant with random (not zero-initialised) weights: cheap but nonlinear,
    mixing pixels across the image and depending on the label. float64, because the coarse test
    grids amplify the float32 differences between GEMMs of different batch sizes (~1e-7) by up
    to σ_i/σ_{i+1} ≈ 10³ in the last Heun correction."""
    torch.manual_seed(0)
    net = build(
        "epg-tiny",
        img_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return Denoiser(net).double().eval()


@pytest.mark.parametrize(
    "sampler, steps", [("heun", 3), ("euler_ancestral", 4), ("consistency", 3)]
)
def test_same_seed_same_images_whatever_the_batch_size(sampler, steps):
    den = _tiny_denoiser()
    labels = torch.tensor([0, 3, 9, 1, 1, 7])
    # Guidance at every σ, so every forward is a batched cond+uncond pass of 2·B images.
    kw = {
        "img_size": 8,
        "channels": 3,
        "steps": steps,
        "sampler": sampler,
        "guidance": 2.0,
        "null_class": den.net.null_class,
        "guidance_interval": (0.0, math.inf),
        "seed": 123,
        "dtype": torch.float64,
        "progress": False,
    }
    ref = sample(den, labels, batch_size=6, **kw)
    assert ref.shape == (6, 3, 8, 8) and torch.isfinite(ref).all()
    if sampler == "consistency":  # returns a (clamped) denoiser output
        assert ref.abs().max() <= 1.0
    assert (ref[3] - ref[4]).abs().max() > 1e-3  # same label, different noise
    for bs in (4, 1):
        out = sample(den, labels, batch_size=bs, **kw)
        assert_close(out, ref, atol=1e-10, rtol=1e-10, what=f"batch {bs}")
    # An image's noise depends on (seed, index) only: sampling indices [4, 5] alone reproduces them.
    out = sample(den, labels[4:], indices=[4, 5], batch_size=2, **kw)
    assert_close(out, ref[4:], atol=1e-10, rtol=1e-10, what="subset")
    other = sample(den, labels, batch_size=6, **{**kw, "seed": 124})
    assert (other - ref).abs().max() > 1e-3


def test_image_noise_is_per_image_and_matches_the_generators():
    a = image_noise([0, 1, 2, 3], (2, 3, 3), seed=5)
    b = image_noise([2, 3], (2, 3, 3), seed=5)
    assert torch.equal(a[2:], b)
    assert not torch.equal(a[0], a[1]) and not torch.equal(
        a, image_noise([0, 1, 2, 3], (2, 3, 3), 6)
    )
    gens = image_generators([2, 3], seed=5)
    assert torch.equal(prior((2, 2, 3, 3), [7.0], gens), 7.0 * b)


def test_image_streams_are_not_indexed_by_seed_plus_index():
    # (seed 0, image 1) and (seed 1, image 0) are different images of different runs.
    for (s1, i1), (s2, i2) in [((0, 1), (1, 0)), ((2, 3), (3, 2))]:
        a, b = image_noise([i1], (1, 4, 4), seed=s1), image_noise([i2], (1, 4, 4), seed=s2)
        assert not torch.equal(a, b), f"image {i1} of seed {s1} = image {i2} of seed {s2}"


def test_ancestral_step_formula():
    down, up = ancestral_step(10.0, 4.0)
    assert up == pytest.approx(math.sqrt(16 * (100 - 16) / 100))
    assert down**2 + up**2 == pytest.approx(16.0)
    assert ancestral_step(10.0, 0.0) == (0.0, 0.0)


# --- labels and argument checks -------------------------------------------------------------------


def test_class_labels():
    lab = class_labels(50, 10)
    assert lab.dtype == torch.int64 and torch.bincount(lab, minlength=10).tolist() == [5] * 10
    assert lab[:12].tolist() == list(range(10)) + [0, 1]
    assert torch.bincount(class_labels(23, 10), minlength=10).tolist() == [3] * 3 + [2] * 7
    r = class_labels(2000, 4, balanced=False, seed=1, class_counts=[0, 1, 1, 2])
    counts = torch.bincount(r, minlength=4)
    assert counts[0] == 0 and counts[3].item() == pytest.approx(1000, abs=100)
    assert torch.equal(r, class_labels(2000, 4, balanced=False, seed=1, class_counts=[0, 1, 1, 2]))
    u = class_labels(1000, 7, balanced=False, seed=2)
    assert u.min() >= 0 and u.max() <= 6
    with pytest.raises(ValueError, match=r"\(4,\)"):
        class_labels(10, 4, balanced=False, class_counts=[1, 2])


def test_bad_arguments_raise_value_errors():
    den = CountingZeros()
    with pytest.raises(ValueError, match="expected one of .*heun"):
        sample(den, torch.zeros(2, dtype=torch.int64), 8, 1, sampler="ddim", progress=False)
    with pytest.raises(ValueError, match=">= 2"):
        sampling_sigmas(1, 256)
    with pytest.raises(ValueError, match=">= 2"):
        sample(den, torch.zeros(2, dtype=torch.int64), 8, 1, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"\(2,\) int64"):
        sample(den, torch.zeros(2, 1, dtype=torch.int64), 8, 1, progress=False)
    with pytest.raises(ValueError, match=r"\(3,\) int64"):
        sample(den, torch.zeros(2, dtype=torch.int64), 8, 1, indices=[0, 1, 2], progress=False)
    with pytest.raises(ValueError, match=r"\(2,\) int64"):
        heun(den, torch.zeros(2, 1, 4, 4), [3.0, 1.0], y=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 2 sigmas"):
        euler(den, torch.zeros(2, 1, 4, 4), [3.0])
    with pytest.raises(ValueError, match="decreasing"):
        euler(den, torch.zeros(2, 1, 4, 4), [1.0, 3.0])
    with pytest.raises(ValueError, match="one generator per image: 2"):
        euler_ancestral(
            den, torch.zeros(2, 1, 4, 4), [3.0, 1.0], generator=image_generators([0], 0)
        )
    assert set(SAMPLERS) == {
        "heun",
        "euler",
        "euler_ancestral",
        "euler_sde",
        "edm_sde",
        "consistency",
    }


def test_guidance_takes_the_networks_null_class_and_refuses_a_network_in_train_mode():
    # Guidance 3 without null_class used to sample unguided without a word; a network in train
    # mode drew new dropout masks for every sample, so a seed repeated nothing.
    net = build("epg-tiny", in_channels=1, img_size=16, patch_size=4, num_classes=NULL, drop=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    y = torch.arange(4)
    with pytest.raises(ValueError, match="in train mode.*call .eval"):
        sample(Denoiser(net), y, 16, 1, steps=4, progress=False)
    denoiser = Denoiser(net.eval())
    guided = sample(denoiser, y, 16, 1, steps=4, guidance=3.0, progress=False)
    explicit = sample(denoiser, y, 16, 1, steps=4, guidance=3.0, null_class=NULL, progress=False)
    plain = sample(denoiser, y, 16, 1, steps=4, guidance=1.0, progress=False)
    assert torch.equal(guided, explicit) and not torch.equal(guided, plain)

    def bare(x, sigma, y):  # a denoiser function that names no network
        return denoiser(x, sigma, y)

    with pytest.raises(ValueError, match="guidance 3.0 needs null_class"):
        sample(bare, y, 16, 1, steps=4, guidance=3.0, progress=False)
    assert torch.equal(sample(bare, y, 16, 1, steps=4, guidance=3.0, null_class=NULL, progress=False), guided)
