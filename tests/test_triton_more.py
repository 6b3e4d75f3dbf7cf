"""More checks of the Triton kernels' Python layer and of the attention providers: layouts, sizes
and choices the other test modules leave out (a mutation round found each gap).

Run on a CUDA GPU, or on the CPU under the Triton interpreter:
    TRITON_INTERPRET=1 python -m pytest tests/test_triton_more.py
The provider tests at the end need neither (they run SDPA on the CPU and stub flash-attn).
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
from helpers import assert_close
from test_attention_providers import _FlashStub

from epg import _attention_providers as providers
from epg import reference as R

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _kernels():
    """epg_kernels, or a skip where Triton cannot run (the same rule as the other Triton tests)."""
    from triton_support import import_epg_kernels, require_triton

    require_triton()
    return import_epg_kernels()


# --- attention -----------------------------------------------------------------------------------


@pytest.mark.triton
def test_attention_reads_qkv_and_writes_grad_with_their_own_column_strides():
    """qkv with column stride 2 (every other column of a wider buffer): Q, K and V are read through
    qkv's strides, while dK and dV are written through grad_qkv's (contiguous) strides; mixing the
    two would scatter the key/value gradients."""
    K = _kernels().IMPLEMENTATIONS
    B, T, H, Dh = 1, 9, 2, 16
    g = torch.Generator().manual_seed(11)
    wide = torch.randn(B, T, 2 * 3 * H * Dh, generator=g, dtype=torch.float64)
    qkv64 = wide[..., ::2]
    grad64 = torch.randn(B, T, H * Dh, generator=g, dtype=torch.float64)
    qkv = wide.float().to(DEVICE)[..., ::2]
    assert qkv.stride(-1) == 2
    out = K["attention"](qkv, H)
    grad_qkv = K["attention_backward"](grad64.float().to(DEVICE), qkv, H)
    assert grad_qkv.is_contiguous()
    assert_close(out.double().cpu(), R.attention(qkv64, H), atol=1e-5, rtol=1e-5, what="out")
    assert_close(grad_qkv.double().cpu(), R.attention_backward(grad64, qkv64, H),
                 atol=1e-5, rtol=1e-5, what="grad_qkv")


@pytest.mark.triton
def test_attention_inner_tile_follows_the_padded_row_width():
    """The documented blocking: 64-token inner tiles while a padded head row is at most 256 bytes
    (float32 head dim 64 is exactly 256), else 32; 64-token query blocks up to 768-byte rows."""
    attention = importlib.import_module(_kernels().__name__ + ".attention")
    cfg = attention._launch_config
    assert cfg(64, torch.float32)["BLOCK_N"] == 64, "float32 Dh 64: 256-byte rows keep 64"
    assert cfg(72, torch.float32)["BLOCK_N"] == 32, "float32 Dh 72: 320-byte rows take 32"
    assert cfg(128, torch.float16)["BLOCK_N"] == 64, "float16 Dh 128: 256-byte rows keep 64"
    assert cfg(192, torch.float32)["BLOCK_M"] == 64, "float32 Dh 192: 768-byte rows keep 64"
    assert cfg(200, torch.float32)["BLOCK_M"] == 32, "float32 Dh 200: 1 KiB rows halve it"
    # The float32 forward: 32-row blocks over 8 warps, 64-key tiles up to 512-byte rows (the
    # 64-row blocks spilled registers when compiled); the 16-bit forward keeps the backward's.
    assert [cfg(dh, torch.float32, True)["BLOCK_N"] for dh in (64, 120, 128, 136)] == [64] * 3 + [32]
    assert {cfg(dh, torch.float32, True)["BLOCK_M"] for dh in range(8, 257, 8)} == {32}
    assert cfg(64, torch.float32, True)["num_warps"] == 8
    assert cfg(72, torch.bfloat16, True) == cfg(72, torch.bfloat16)
    # The 16-bit backward halves its blocks at padded widths 192 and 256 (head dims 168-256).
    assert [cfg(dh, torch.float16)["BLOCK_M"] for dh in (160, 168, 192, 200, 256)] == [64] + [32] * 4
    assert cfg(192, torch.bfloat16, True)["BLOCK_M"] == 64
    # float32 is multiplied in IEEE float32 (TF32 would cost ~5e-4 relative error); the 16-bit
    # dtypes take tl.dot's default. (The interpreter ignores this flag: only a GPU would show it.)
    assert cfg(64, torch.float32)["IEEE"] is True
    assert cfg(64, torch.float16)["IEEE"] is False and cfg(64, torch.bfloat16)["IEEE"] is False


@pytest.mark.triton
def test_automatic_choice_takes_triton_at_the_largest_head_dim():
    """Head dim 256 is the kernel's MAX_HEAD_DIM: SUPPORTS must accept it (a decliner at the
    boundary would send the largest supported heads to the slow reference)."""
    kernels = _kernels()
    supports = kernels.SUPPORTS
    assert supports["attention"](torch.zeros(1, 2, 3 * 256), 1) is None
    assert supports["attention_backward"](torch.zeros(1, 2, 256), torch.zeros(1, 2, 3 * 256), 1) is None
    assert supports["attention"](torch.zeros(1, 2, 3 * 257), 1) is not None


@pytest.mark.triton
@pytest.mark.parametrize("num_heads", [2.0, 2.5])
def test_attention_takes_an_integer_head_count_only(num_heads):
    """num_heads goes through operator.index: a float (even 2.0) is a caller's bug, not something
    to truncate silently (2.5 heads would run as 2)."""
    K = _kernels().IMPLEMENTATIONS
    qkv = torch.randn(1, 3, 3 * 2 * 16, device=DEVICE)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        K["attention"](qkv, num_heads)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        K["attention_backward"](torch.randn(1, 3, 32, device=DEVICE), qkv, num_heads)

# --- providers: SDPA -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["MATH", " Math "])
def test_sdpa_kernel_name_ignores_case_and_spaces(monkeypatch, name):
    """EPG_SDPA_KERNEL is matched like the backend variables: case and surrounding spaces do not
    matter, so ``MATH`` neither counts as an environment problem nor raises at the first call."""
    from epg import _backend, ops

    monkeypatch.setenv(providers.SDPA_KERNEL_ENV, name)
    assert providers.sdpa_kernel_problem() is None
    assert not any(providers.SDPA_KERNEL_ENV in p for p in _backend.environment_problems())
    qkv = torch.randn(1, 5, 3 * 2 * 8, dtype=torch.float64)
    with ops.use_backend("sdpa", "attention"):
        out = ops.attention(qkv, 2)
    assert_close(out, R.attention(qkv, 2), what="out")


def test_sdpa_backward_takes_a_gradient_of_another_dtype():
    """The op layer may hand the backward a gradient in another float dtype than qkv (the
    reference's contract casts it): the result is qkv's dtype and equals the cast gradient's."""
    qkv = torch.randn(2, 6, 3 * 2 * 8, dtype=torch.float64)
    grad = torch.randn(2, 6, 2 * 8, dtype=torch.float32)
    got = providers.sdpa_attention_backward(grad, qkv, 2)
    assert got.dtype == torch.float64 and got.is_contiguous()
    assert_close(got, R.attention_backward(grad.double(), qkv, 2), what="grad_qkv")


# --- providers: flash-attn (stubbed: the real package needs a GPU) --------------------------------


def _stub(monkeypatch, name, func=None, version="0"):
    module = types.ModuleType(name)
    if func is not None:
        module.flash_attn_qkvpacked_func = func
    module.__version__ = version
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_flash_module_prefers_fa3_and_skips_a_module_without_the_packed_function(monkeypatch):
    """FA3's interface is taken when importable (the faster kernels on Hopper); a module that
    imports but lacks flash_attn_qkvpacked_func does not count as flash-attn."""
    fa3 = _stub(monkeypatch, "flash_attn_interface", _FlashStub.apply, "3.0")
    fa2 = _stub(monkeypatch, "flash_attn", _FlashStub.apply, "2.7")
    module, what = providers._flash_module()
    assert module is fa3 and what.startswith("FA3"), what
    _stub(monkeypatch, "flash_attn_interface")  # no packed function
    module, what = providers._flash_module()
    assert module is fa2 and what.startswith("FA2"), what


def test_flash_attention_takes_fa3s_output_tuple(monkeypatch):
    """FA3's packed function returns (out, softmax_lse): the backend must use only out."""
    _stub(monkeypatch, "flash_attn_interface", lambda packed: (_FlashStub.apply(packed), None), "3.0")
    qkv = torch.randn(2, 5, 3 * 2 * 8, dtype=torch.float64)
    out = providers.flash_attention(qkv, 2)
    assert out.shape == (2, 5, 16)
    assert_close(out, R.attention(qkv, 2), what="out")


def test_flash_attention_backward_casts_the_gradient_to_qkvs_dtype(monkeypatch):
    """The backward contract passes grad in any float dtype; flash-attn's function must get it in
    qkv's dtype (its backward kernel takes one dtype)."""
    seen = []

    class Checked(_FlashStub):
        @staticmethod
        def backward(ctx, grad):
            seen.append(grad.dtype)
            return _FlashStub.backward(ctx, grad)

    _stub(monkeypatch, "flash_attn_interface", Checked.apply, "3.0")
    qkv = torch.randn(1, 4, 3 * 2 * 8, dtype=torch.float64)
    grad = torch.randn(1, 4, 16, dtype=torch.float32)
    got = providers.flash_attention_backward(grad, qkv, 2)
    assert seen == [torch.float64], seen
    assert got.dtype == torch.float64 and got.is_contiguous()
    assert_close(got, R.attention_backward(grad.double(), qkv, 2), what="grad_qkv")


def _fake_cuda(shape, dtype):
    """What flash_declines reads of a tensor (is_cuda, dtype, shape), for a CUDA tensor on a
    machine without one."""
    return types.SimpleNamespace(is_cuda=True, dtype=dtype, shape=torch.Size(shape))


def test_flash_declines_the_documented_inputs_only():
    """flash-attn takes CUDA float16/bfloat16 with head dims up to 256 in multiples of 8."""
    decl = providers.flash_declines
    assert decl(_fake_cuda((1, 4, 3 * 2 * 256), torch.bfloat16), 2) is None, "head dim 256"
    assert decl(_fake_cuda((1, 4, 3 * 64), torch.float16), 1) is None
    assert "264" in decl(_fake_cuda((1, 4, 3 * 264), torch.float16), 1)
    assert "12" in decl(_fake_cuda((1, 4, 3 * 12), torch.float16), 1)
    assert "float32" in decl(_fake_cuda((1, 4, 3 * 64), torch.float32), 1)
    assert "CUDA" in decl(torch.zeros(1, 4, 3 * 64, dtype=torch.float16), 1)


# --- layer norm ----------------------------------------------------------------------------------


def _ln_inputs(B, T, D, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    x = spread * torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w, b = torch.randn(2, D, generator=g, dtype=torch.float64)
    shift, scale = torch.randn(2, B, D, generator=g, dtype=torch.float64)
    grad = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    return x, w, b, shift, scale, grad


@pytest.mark.triton
def test_layer_norm_uses_the_callers_eps_where_it_matters():
    """Rows of small variance (std 0.02) with a large eps (0.01): y and every gradient depend on
    eps inside the square root, sqrt(var + eps), in the forward and in the backward, which
    recomputes the statistics itself."""
    K = _kernels().IMPLEMENTATIONS
    eps = 1e-2
    # Inputs exactly representable in float32: the kernel's float32 math is the only error.
    x, w, b, shift, scale, grad = (t.float().double() for t in _ln_inputs(2, 5, 24, seed=21, spread=0.02))
    f = [t.float().to(DEVICE) for t in (x, w, b, shift, scale, grad)]
    tol = dict(atol=1e-5, rtol=1e-5)
    assert_close(K["layer_norm"](f[0], f[1], f[2], eps).cpu(), R.layer_norm(x, w, b, eps),
                 what="layer_norm", **tol)
    for got, want, name in zip(K["layer_norm_backward"](f[5], f[0], f[1], eps),
                               R.layer_norm_backward(grad, x, w, eps), ("x", "weight", "bias")):
        assert_close(got.cpu(), want, what=f"layer_norm grad_{name}", **tol)
    assert_close(K["ln_modulate"](*f[:5], eps).cpu(), R.ln_modulate(x, w, b, shift, scale, eps),
                 what="ln_modulate", **tol)
    names = ("x", "weight", "bias", "shift", "scale")
    for got, want, name in zip(K["ln_modulate_backward"](f[5], *f[:5], eps),
                               R.ln_modulate_backward(grad, x, w, b, shift, scale, eps), names):
        assert_close(got.cpu(), want, what=f"ln_modulate grad_{name}", **tol)


@pytest.mark.triton
def test_layer_norm_takes_rows_up_to_max_width():
    """MAX_WIDTH is the widest row the kernels take: automatic choice must not decline it."""
    kernels = _kernels()
    layer_norm = importlib.import_module(kernels.__name__ + ".layer_norm")
    width = layer_norm.MAX_WIDTH
    assert kernels.SUPPORTS["layer_norm"](torch.zeros(2, width)) is None
    assert kernels.SUPPORTS["ln_modulate_backward"](torch.zeros(1, 2, width), torch.zeros(1, 2, width)) is None
    assert kernels.SUPPORTS["layer_norm"](torch.zeros(2, width + 1)) is not None


@pytest.mark.triton
def test_layer_norm_backward_returns_parameter_grads_in_the_parameters_dtype():
    """Mixed precision on plain LayerNorm: float16 x and grad with float32 weight give grad_x in
    float16 and grad_weight, grad_bias in float32 (the dtype of the parameters they update)."""
    K = _kernels().IMPLEMENTATIONS
    x, w, _, _, _, grad = _ln_inputs(2, 9, 24, seed=22)
    x16, g16 = x.half(), grad.half()
    got = K["layer_norm_backward"](g16.to(DEVICE), x16.to(DEVICE), w.float().to(DEVICE), 1e-6)
    want = R.layer_norm_backward(g16.double(), x16.double(), w.float().double(), 1e-6)
    assert [t.dtype for t in got] == [torch.float16, torch.float32, torch.float32], [t.dtype for t in got]
    for a, b, name in zip(got[1:], want[1:], ("weight", "bias")):
        assert_close(a.double().cpu(), b, atol=1e-4, rtol=1e-4, what=f"grad_{name}")


@pytest.mark.triton
def test_ln_modulate_backward_gives_each_gradient_its_inputs_dtype():
    """grad_shift takes shift's dtype and grad_scale scale's, even where the two differ."""
    K = _kernels().IMPLEMENTATIONS
    x, w, b, shift, scale, grad = (t.float().to(DEVICE) for t in _ln_inputs(2, 3, 16, seed=23))
    got = K["ln_modulate_backward"](grad, x, w, b.double(), shift.half(), scale, 1e-6)
    dtypes = [t.dtype for t in got]
    assert dtypes == [torch.float32, torch.float32, torch.float64, torch.float16, torch.float32], dtypes

# --- gated residual ------------------------------------------------------------------------------


@pytest.mark.triton
def test_gated_residual_backward_computes_in_float64_for_a_float64_gradient():
    """The backward's compute dtype follows grad (as the reference's): a float64 gradient with a
    float32 y gives grad_gate = Σ_t grad·y summed in float64 (here into a float64 gate)."""
    K = _kernels().IMPLEMENTATIONS
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(2, 300, 40, generator=g, dtype=torch.float64)
    y = torch.randn(2, 300, 40, generator=g, dtype=torch.float64).float()
    gate = torch.randn(2, 40, generator=g, dtype=torch.float64)
    got_gate, got_y = K["gated_residual_backward"](grad.to(DEVICE), gate.to(DEVICE), y.to(DEVICE))
    want_gate, want_y = R.gated_residual_backward(grad, gate, y)
    assert got_gate.dtype == torch.float64 and got_y.dtype == torch.float32
    assert_close(got_gate.cpu(), want_gate, what="grad_gate")  # float64 floors
    assert_close(got_y.cpu(), want_y, what="grad_y")


# --- noise preconditioning -----------------------------------------------------------------------


@pytest.mark.triton
def test_noise_precondition_reads_a_strided_sigma():
    """sigma may be a strided view (a column of a per-sample table): the kernels index it as
    contiguous, so the launchers must hand them a contiguous copy, forward and backward."""
    K = _kernels().IMPLEMENTATIONS
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 3, 3, 4, 4, generator=g)
    table = torch.tensor([[0.5, 7.0], [2.0, 9.0], [40.0, 11.0]])
    sigma = table[:, 0]  # stride 2
    assert not sigma.is_contiguous()
    args = (x0.to(DEVICE), eps.to(DEVICE), sigma.to(DEVICE), 0.5, 0.002, "edm")
    got = K["noise_precondition"](*args)
    want = R.noise_precondition(x0, eps, sigma.contiguous(), 0.5, 0.002, "edm")
    for a, b, name in zip(got, want, ("x_in", "c_in", "c_skip", "c_out", "t_cond")):
        assert_close(a.cpu(), b, what=name)
    grads = [torch.randn(x0.shape, generator=g)] + [torch.randn(3, generator=g) for _ in range(4)]
    got = K["noise_precondition_backward"](*(t.to(DEVICE) for t in grads), *args)
    want = R.noise_precondition_backward(*grads, x0, eps, sigma.contiguous(), 0.5, 0.002, "edm")
    for a, b, name in zip(got, want, ("grad_x0", "grad_eps", "grad_sigma")):
        assert_close(a.cpu(), b, atol=1e-5, rtol=1e-4, what=name)


@pytest.mark.triton
def test_noise_precondition_t_cond_is_finite_at_sigma_zero():
    """t_cond = 250·ln(σ + 1e-44) keeps σ = 0 (x0 mode's clean end) finite, as the reference."""
    K = _kernels().IMPLEMENTATIONS
    x0 = torch.ones(2, 5)
    sigma = torch.tensor([0.0, 1.0])
    t_cond = K["noise_precondition"](x0.to(DEVICE), x0.to(DEVICE), sigma.to(DEVICE), 0.5, 0.0, "x0")[4]
    want = R.noise_precondition(x0, x0, sigma, 0.5, 0.0, "x0")[4]
    assert torch.isfinite(t_cond).all(), t_cond
    assert_close(t_cond.cpu(), want, what="t_cond")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_automatic_choice_declines_every_sigma_but_float32(dtype):
    """The launchers take float32 σ only (they raise otherwise): SUPPORTS must decline any other
    σ dtype, not just float64, so the automatic choice never picks a kernel that would raise."""
    supports = _kernels().SUPPORTS
    x = torch.zeros(2, 3)
    sigma = torch.ones(2, dtype=dtype)
    assert supports["noise_precondition"](x, x, sigma, 0.5, 0.0, "x0") is not None
    zeros = torch.zeros(2)
    assert supports["noise_precondition_backward"](x, zeros, zeros, zeros, zeros, x, x, sigma,
                                                   0.5, 0.0, "x0") is not None
    assert supports["noise_precondition"](x, x, sigma.float(), 0.5, 0.0, "x0") is None


# --- patch embedding -----------------------------------------------------------------------------


@pytest.mark.triton
def test_patch_embed_multiplies_a_float16_image_by_float32_weights_in_float32():
    """Only an image and weight of one 16-bit dtype are multiplied in that dtype; a float16 image
    with float32 weights must not round the weights to float16 (IEEE float32 products)."""
    K = _kernels().IMPLEMENTATIONS
    g = torch.Generator().manual_seed(4)
    img = torch.randn(2, 3, 8, 8, generator=g).half()
    weight = torch.randn(20, 3, 4, 4, generator=g)
    bias, pos = torch.randn(20, generator=g), torch.randn(4, 20, generator=g)
    out = K["patch_embed"](*(t.to(DEVICE) for t in (img, weight, bias, pos)))
    want = R.patch_embed(img.double(), weight.double(), bias.double(), pos.double())
    assert out.dtype == torch.float32
    assert_close(out.double().cpu(), want, atol=1e-5, rtol=1e-5, what="tokens")


# --- InfoNCE -------------------------------------------------------------------------------------


@pytest.mark.triton
def test_info_nce_backward_with_more_columns_than_one_gradient_program_holds():
    """D = 300 > BLOCK_D = 256: the gradient programs split the output columns into two chunks
    (each recomputing the logits), on top of key splits and several row blocks; each (split,
    chunk, row block) program must land on its own part of the buffers."""
    K = _kernels().IMPLEMENTATIONS
    g = torch.Generator().manual_seed(8)
    q = torch.nn.functional.normalize(torch.randn(70, 300, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(140, 300, generator=g, dtype=torch.float64), dim=1)
    k[:70] = torch.nn.functional.normalize(k[:70] + 2 * q, dim=1)  # positives stand out
    grad = torch.randn(70, generator=g, dtype=torch.float64)
    q, k = q.float().double(), k.float().double()  # exactly representable in float32
    got = K["info_nce_backward"](grad.float().to(DEVICE), q.float().to(DEVICE), k.float().to(DEVICE), 0.2)
    assert_close(got.double().cpu(), R.info_nce_backward(grad.float().double(), q, k, 0.2),
                 atol=1e-5, rtol=1e-4, what="grad_q")
    loss = K["info_nce"](q.float().to(DEVICE), k.float().to(DEVICE), 0.2)
    assert_close(loss.double().cpu(), R.info_nce(q, k, 0.2), atol=1e-5, rtol=1e-5, what="loss")


# --- launch heuristics (kernels/_common.py) ------------------------------------------------------


@pytest.mark.triton
def test_launch_heuristics():
    """The documented heuristics every launcher builds on: powers of two, ~16 elements per thread
    clamped to [1, 16] warps, whole-row tiles of about 4096 elements and at most 64 rows, and
    more than one program per reduction under the interpreter (so the cross-program sums are
    exercised there)."""
    common = importlib.import_module(_kernels().__name__ + "._common")
    assert [common.next_power_of_2(n) for n in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 4, 64, 128]
    assert [common.cdiv(a, 4) for a in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert [common.num_warps_for(n) for n in (1, 512, 1024, 8192, 16384, 1 << 20)] == [1, 1, 2, 16, 16, 16]
    assert common.row_block(37, 7) == (8, 64, 1), "rows never exceed the (padded) row count"
    assert common.row_block(16, 1000)[:2] == (64, 16), "at most 64 rows"
    assert common.row_block(1584, 258)[:2] == (2, 2048)
    assert common.row_block(64, 1000, tile_scale=0.5)[:2] == (32, 64)
    if common.is_interpreter():
        assert common.target_programs(torch.device("cpu")) > 1


@pytest.mark.triton
def test_gated_residual_rounds_float16_once():
    """float16 inputs are computed in float32 and rounded once, like the reference: the product
    gate·y = 1 + 2⁻¹¹ − 2⁻²¹ rounded to float16 first would be 1.0, and 2048 + 1.0 then ties
    down to 2048 instead of rounding up to 2050."""
    K = _kernels().IMPLEMENTATIONS
    x = torch.full((1, 2, 16), 2048.0, dtype=torch.float16)
    gate = torch.full((1, 16), 1 + 2**-10, dtype=torch.float16)
    y = torch.full((1, 2, 16), 1 - 2**-11, dtype=torch.float16)
    want = R.gated_residual(x, gate, y)
    assert (want == 2050).all(), want
    got = K["gated_residual"](x.to(DEVICE), gate.to(DEVICE), y.to(DEVICE))
    assert torch.equal(got.cpu(), want), got


@pytest.mark.triton
def test_reducing_kernels_run_the_gpus_configuration_under_the_interpreter(monkeypatch):
    """The interpreter must test the one block size a GPU runs the reducing kernels with (their
    block sets a sum's order), not the interpreter's block for the elementwise kernels."""
    kernels = _kernels()
    pre = importlib.import_module(kernels.__name__ + ".precondition")
    seen = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["BLOCK"])
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(pre, "_squared_sum_kernel", Recorder(pre._squared_sum_kernel))
    x = torch.randn(2, 3000, device=DEVICE)
    loss, mse = pre.weighted_mse_loss(x, torch.zeros_like(x), torch.ones(2, device=DEVICE))
    assert seen == [pre._REDUCTION_CONFIG["BLOCK"]], seen
    assert_close(mse.cpu(), (x.cpu() ** 2).mean(1), what="mse")


@pytest.mark.triton
def test_patch_embed_refuses_a_width_not_divisible_by_the_patch():
    """W must be a multiple of p like H (the reference's conv would drop the remainder columns,
    and the kernel's patch grid would misplace every row after the first)."""
    K = _kernels().IMPLEMENTATIONS
    img = torch.randn(1, 1, 8, 10, device=DEVICE)
    weight, bias = torch.randn(16, 1, 4, 4, device=DEVICE), torch.randn(16, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit"):
        K["patch_embed"](img, weight, bias, torch.randn(4, 16, device=DEVICE))
    with pytest.raises(ValueError, match="does not fit"):
        K["patch_embed_backward"](torch.randn(1, 4, 16, device=DEVICE), img, weight,
                                  torch.randn(4, 16, device=DEVICE), True)


@pytest.mark.triton
def test_patch_embed_supports_declines_an_image_without_channels():
    """The launchers refuse C = 0, so SUPPORTS must say why (automatic choice then runs the
    reference), forward and backward."""
    supports = _kernels().SUPPORTS
    img, weight = torch.zeros(1, 0, 8, 8), torch.zeros(16, 0, 4, 4)
    bias, pos = torch.zeros(16), torch.zeros(4, 16)
    assert supports["patch_embed"](img, weight, bias, pos) == "no channels"
    assert supports["patch_embed_backward"](torch.zeros(1, 4, 16), img, weight, pos, True) == "no channels"
    assert supports["patch_embed"](torch.zeros(1, 1, 8, 8), torch.zeros(16, 1, 4, 4), bias, pos) is None


@pytest.mark.triton
def test_patch_embed_backward_rounds_the_gradient_for_16_bit_products():
    """With a float16 image and weight (autocast) and a float32 gradient, the products take the
    gradient rounded to float16, as autocast's conv2d backward does, while grad_bias sums the
    unrounded gradient. g = 1 + 2⁻¹¹ − 2⁻²⁰ rounds to 1.0: over three tokens of a ones image,
    grad_weight = 3·1.0 = 3, grad_bias = 3·g = 3.00146 -> float16 3.00195."""
    K = _kernels().IMPLEMENTATIONS
    img = torch.ones(1, 1, 4, 12, dtype=torch.float16)  # p = 4: three tokens
    weight = torch.ones(16, 1, 4, 4, dtype=torch.float16)
    pos = torch.zeros(3, 16)
    grad = torch.full((1, 3, 16), 1 + 2**-11 - 2**-20)
    _, grad_w, grad_bias, grad_pos = K["patch_embed_backward"](
        *(t.to(DEVICE) for t in (grad, img, weight, pos)), False)
    assert grad_w.dtype == torch.float16 and (grad_w == 3.0).all(), grad_w.flatten()[:4]
    assert (grad_bias == torch.tensor(3 * (1 + 2**-11 - 2**-20)).half()).all(), grad_bias[:4]
    assert (grad_bias != 3.0).all()
    assert_close(grad_pos.cpu(), grad[0], what="grad_pos")


@pytest.mark.triton
def test_precondition_names_a_batch_mismatch_as_a_value_error():
    """Every image argument must have x0's batch size; one that does not is a ValueError naming
    it (not a reshape failure from deeper down)."""
    K = _kernels().IMPLEMENTATIONS
    x0, sigma = torch.zeros(2, 3, device=DEVICE), torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="eps must be"):
        K["noise_precondition"](x0, torch.zeros(3, 2, device=DEVICE), sigma, 0.5, 0.0, "x0")
    with pytest.raises(ValueError, match="target must be"):
        K["weighted_mse_loss"](x0, torch.zeros(3, 2, device=DEVICE), sigma)
