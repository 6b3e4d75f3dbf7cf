"""Tests of the compiled extension ``epg._C`` (ops in ``torch.ops.epg_C``).

Skipped as a whole when the extension is not built / not importable; build it with
``pip install --no-build-isolation -e .`` or ``python setup.py build_ext --inplace``.
"""

import math

import pytest
import torch

# Plain CPython module: torch must be imported (its shared libraries loaded) first.
# Without the extension the whole module is skipped, with the import error as reason.
_C = pytest.importorskip("epg._C")

OP = torch.ops.epg_C.edm_scalings
SIGMA_DATA = 0.5
SIGMA_MIN = 0.008
# 0, the resolution-shifted sigma_min / sigma_max (0.002*4, 80*4) and sigma_data.
ANCHORS = [0.0, 0.002 * 4, 0.5, 80.0 * 4]
SIZES = [1, 7, 1031]
DTYPES = [torch.float32, torch.float64]
MODES = ["x0", "edm"]
OUTPUT_NAMES = ("c_in", "c_skip", "c_out", "t_cond")


def make_sigma(n, dtype, device="cpu", seed=0):
    """n noise levels: the anchors first, then log-uniform values in [0.002, 320]."""
    g = torch.Generator().manual_seed(seed + n)
    log_sigma = torch.empty(n, dtype=torch.float64)
    log_sigma.uniform_(math.log(0.002), math.log(320.0), generator=g)
    rand = torch.exp(log_sigma)
    sigma = torch.cat([torch.tensor(ANCHORS, dtype=torch.float64), rand])[:n]
    return sigma.to(dtype=dtype, device=device)


def reference(sigma, sigma_data, sigma_min, mode):
    """The EDM preconditioning formulas, evaluated in float64 with torch ops.

    sigma_data / sigma_min are first rounded to sigma's dtype, as the kernels do.
    """
    dt = sigma.dtype
    sd = torch.tensor(sigma_data, dtype=dt).item()
    smin = torch.tensor(sigma_min, dtype=dt).item()
    s = sigma.detach().to(device="cpu", dtype=torch.float64)
    c_in = 1.0 / torch.sqrt(s**2 + sd**2)
    t_cond = 250.0 * torch.log(s + 1e-44)
    if mode == "x0":
        c_skip = torch.zeros_like(s)
        c_out = torch.ones_like(s)
    else:
        c_skip = sd**2 / ((s - smin) ** 2 + sd**2)
        c_out = (s - smin) * sd / torch.sqrt(s**2 + sd**2)
    return c_in, c_skip, c_out, t_cond


def tolerances(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=3e-6, atol=1e-7)


def check_outputs(outs, sigma, mode):
    assert isinstance(outs, tuple) and len(outs) == 4
    ptrs = set()
    for name, out, ref in zip(OUTPUT_NAMES, outs, reference(sigma, SIGMA_DATA, SIGMA_MIN, mode)):
        assert out.shape == sigma.shape, name
        assert out.dtype == sigma.dtype, name
        assert out.device == sigma.device, name
        assert out.is_contiguous(), name
        if out.numel():
            ptrs.add(out.data_ptr())
        torch.testing.assert_close(
            out.cpu().double(),
            ref,
            **tolerances(sigma.dtype),
            msg=lambda m, name=name: f"{name}: {m}",
        )
        assert torch.isfinite(out).all(), name
    if sigma.numel():
        assert len(ptrs) == 4, "outputs must not alias each other"
        assert sigma.data_ptr() not in ptrs, "outputs must not alias the input"


# ----------------------------------------------------------------------------- module


def test_module_attributes():
    assert isinstance(_C.WITH_CUDA, int) and _C.WITH_CUDA in (0, 1)
    assert isinstance(_C.TORCH_VERSION, str)
    # The extension is only ABI compatible with the torch minor version it was built for.
    assert torch.__version__.startswith(".".join(_C.TORCH_VERSION.split(".")[:2]))


def test_schema():
    assert str(OP.default._schema) == (
        "epg_C::edm_scalings(Tensor sigma, float sigma_data, float sigma_min, str mode) -> "
        "(Tensor c_in, Tensor c_skip, Tensor c_out, Tensor t_cond)"
    )


def test_registered_kernels_match_with_cuda():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("epg_C::edm_scalings", "CPU")
    assert has("epg_C::edm_scalings", "Meta")
    assert has("epg_C::edm_scalings", "CUDA") == bool(_C.WITH_CUDA)


# ----------------------------------------------------------------------------- CPU values


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_cpu_matches_formula(n, dtype, mode):
    sigma = make_sigma(n, dtype)
    check_outputs(OP(sigma, SIGMA_DATA, SIGMA_MIN, mode), sigma, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_cpu_non_contiguous(n, dtype, mode):
    base = make_sigma(2 * n + 3, dtype, seed=1)
    strided = base[3::2]  # stride 2 with a storage offset
    assert strided.shape == (n,) and strided.stride() == (2,) and strided.storage_offset() == 3
    assert n == 1 or not strided.is_contiguous()  # a 1-element view always counts as contiguous
    check_outputs(OP(strided, SIGMA_DATA, SIGMA_MIN, mode), strided, mode)
    expected = OP(strided.contiguous(), SIGMA_DATA, SIGMA_MIN, mode)
    for out, exp in zip(OP(strided, SIGMA_DATA, SIGMA_MIN, mode), expected):
        torch.testing.assert_close(out, exp, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_expanded_input(dtype):
    sigma = torch.tensor(0.5, dtype=dtype).expand(5)  # stride 0
    check_outputs(OP(sigma, SIGMA_DATA, SIGMA_MIN, "edm"), sigma, "edm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_t_cond_at_sigma_zero_is_finite(dtype):
    # 1e-44 is denormal in float32; t_cond is evaluated in double, so sigma = 0 gives
    # 250*log(1e-44) in both dtypes instead of -inf.
    sigma = torch.zeros(3, dtype=dtype)
    _, _, _, t_cond = OP(sigma, SIGMA_DATA, SIGMA_MIN, "edm")
    expected = torch.full((3,), 250.0 * math.log(1e-44), dtype=torch.float64).to(dtype)
    torch.testing.assert_close(t_cond, expected, rtol=0, atol=0)


def test_float32_t_cond_is_rounded_float64():
    sigma = make_sigma(1031, torch.float32, seed=2)
    t32 = OP(sigma, SIGMA_DATA, SIGMA_MIN, "x0")[3]
    t64 = OP(sigma.double(), SIGMA_DATA, SIGMA_MIN, "x0")[3]
    torch.testing.assert_close(t32, t64.float(), rtol=0, atol=0)


def test_empty_batch():
    sigma = torch.empty(0, dtype=torch.float32)
    outs = OP(sigma, SIGMA_DATA, SIGMA_MIN, "edm")
    assert all(o.shape == (0,) and o.dtype == torch.float32 for o in outs)


def test_edm_mode_at_sigma_min():
    # sigma == sigma_min: pure skip connection (c_skip = 1, c_out = 0).
    sigma = torch.full((4,), SIGMA_MIN, dtype=torch.float64)
    _, c_skip, c_out, _ = OP(sigma, SIGMA_DATA, SIGMA_MIN, "edm")
    assert torch.equal(c_skip, torch.ones_like(sigma))
    assert torch.equal(c_out, torch.zeros_like(sigma))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.bfloat16, torch.int32])
def test_bad_dtype(dtype):
    sigma = torch.ones(4, dtype=dtype)
    with pytest.raises(RuntimeError, match=r"torch\.float32 or torch\.float64, but got torch\."):
        OP(sigma, SIGMA_DATA, SIGMA_MIN, "edm")


@pytest.mark.parametrize("shape", [(2, 3), (4, 1), ()])
def test_bad_dim(shape):
    sigma = torch.ones(shape)
    with pytest.raises(RuntimeError, match=r"1-D tensor of shape \(B,\)"):
        OP(sigma, SIGMA_DATA, SIGMA_MIN, "edm")


@pytest.mark.parametrize("mode", ["", "EDM", "x_0", "v", "edm "])
def test_bad_mode(mode):
    with pytest.raises(RuntimeError, match=r'expected `mode` to be "x0" or "edm"'):
        OP(torch.ones(4), SIGMA_DATA, SIGMA_MIN, mode)


def test_errors_on_meta_too():
    with pytest.raises(RuntimeError, match=r"\(B,\)"):
        OP(torch.empty(2, 2, device="meta"), SIGMA_DATA, SIGMA_MIN, "edm")
    with pytest.raises(RuntimeError, match=r'"x0" or "edm"'):
        OP(torch.empty(2, device="meta"), SIGMA_DATA, SIGMA_MIN, "nope")
    with pytest.raises(RuntimeError, match=r"torch\.float32 or torch\.float64"):
        OP(torch.empty(2, device="meta", dtype=torch.float16), SIGMA_DATA, SIGMA_MIN, "edm")


# ----------------------------------------------------------------------------- meta / opcheck


@pytest.mark.parametrize("dtype", DTYPES)
def test_meta_kernel_only_allocates(dtype):
    sigma = torch.empty(9, dtype=dtype, device="meta")[::3]
    outs = OP(sigma, SIGMA_DATA, SIGMA_MIN, "edm")
    for out in outs:
        assert out.device.type == "meta"
        assert out.shape == (3,) and out.dtype == dtype and out.is_contiguous()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_cpu(dtype, mode):
    sigma = make_sigma(7, dtype)
    torch.library.opcheck(OP.default, (sigma, SIGMA_DATA, SIGMA_MIN, mode))


def test_opcheck_cpu_edm_default_args():
    torch.library.opcheck(OP.default, (make_sigma(1031, torch.float32), 0.5, 0.008, "edm"))


def test_opcheck_cpu_non_contiguous():
    sigma = make_sigma(15, torch.float64)[1::2]
    torch.library.opcheck(OP.default, (sigma, SIGMA_DATA, SIGMA_MIN, "edm"))


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_formula_and_cpu():
    if not _C.WITH_CUDA:
        pytest.skip("epg._C was built without its CUDA kernels (WITH_CUDA=0)")
    dev = torch.device("cuda", torch.cuda.current_device())
    for dtype in DTYPES:
        for n in SIZES:
            for mode in MODES:
                sigma = make_sigma(n, dtype, device=dev)
                outs = OP(sigma, SIGMA_DATA, SIGMA_MIN, mode)
                check_outputs(outs, sigma, mode)
                # Same shared math as the CPU kernel, products and sums rounded on their own
                # (no FMA contraction): c_in, c_skip, c_out bit for bit. t_cond goes through
                # the device's log(), which may differ from the host libm in the last bit.
                cpu_outs = OP(sigma.cpu(), SIGMA_DATA, SIGMA_MIN, mode)
                for name, out, cpu in zip(OUTPUT_NAMES, outs, cpu_outs):
                    if name == "t_cond":
                        torch.testing.assert_close(out.cpu(), cpu, **tolerances(dtype))
                    else:
                        assert torch.equal(out.cpu(), cpu), (name, dtype, n, mode)
                strided = make_sigma(2 * n + 3, dtype, device=dev, seed=1)[3::2]
                check_outputs(OP(strided, SIGMA_DATA, SIGMA_MIN, mode), strided, mode)
    t_cond = OP(torch.zeros(3, device=dev), SIGMA_DATA, SIGMA_MIN, "edm")[3]
    assert torch.isfinite(t_cond).all()
    assert OP(torch.empty(0, device=dev), SIGMA_DATA, SIGMA_MIN, "edm")[0].shape == (0,)
    with pytest.raises(RuntimeError, match=r"torch\.float32 or torch\.float64"):
        OP(torch.ones(4, device=dev, dtype=torch.float16), SIGMA_DATA, SIGMA_MIN, "edm")
    with pytest.raises(RuntimeError, match=r"\(B,\)"):
        OP(torch.ones(2, 2, device=dev), SIGMA_DATA, SIGMA_MIN, "edm")
    with pytest.raises(RuntimeError, match=r'"x0" or "edm"'):
        OP(torch.ones(2, device=dev), SIGMA_DATA, SIGMA_MIN, "v")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_uses_current_stream_and_last_device():
    if not _C.WITH_CUDA:
        pytest.skip("epg._C was built without its CUDA kernels (WITH_CUDA=0)")
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    sigma = make_sigma(1031, torch.float32, device=dev)
    stream = torch.cuda.Stream(device=dev)
    stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream):
        outs = OP(sigma, SIGMA_DATA, SIGMA_MIN, "edm")
    stream.synchronize()
    check_outputs(outs, sigma, "edm")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_cuda(dtype, mode):
    if not _C.WITH_CUDA:
        pytest.skip("epg._C was built without its CUDA kernels (WITH_CUDA=0)")
    sigma = make_sigma(7, dtype, device="cuda")
    torch.library.opcheck(OP.default, (sigma, SIGMA_DATA, SIGMA_MIN, mode))
