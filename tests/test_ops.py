"""The op layer: references against independent math, gradients, registration, backend choice."""

import contextlib
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import epg.ops as ops
from epg import _backend, reference
from helpers import assert_close
from triton_support import interpreter_problem

f64 = dict(dtype=torch.float64)


def _ln_f64(x, w, b, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _make_inputs(requires_grad=True):
    """Small float64 inputs for every op, with awkward sizes (prime token count, odd widths)."""
    def r(*shape):
        return torch.randn(*shape, **f64).requires_grad_(requires_grad)

    B, T, D, H, Dh, C, p = 2, 7, 12, 3, 4, 3, 4
    return {
        "layer_norm": (r(B, T, D), r(D), r(D), 1e-5),
        "ln_modulate": (r(B, T, D), r(D), r(D), r(B, D), r(B, D), 1e-5),
        "gated_residual": (r(B, T, D), r(B, D), r(B, T, D)),
        "attention": (r(B, T, 3 * H * Dh), H),
        "patch_embed": (r(B, C, 2 * p, 3 * p), r(D, C, p, p), r(D), r(6, D)),
        "output_head": (r(B, 9, D), r(D), r(D), r(p * p * C, D), r(p * p * C), p, 1e-5),
        "timestep_embedding": (r(B) * 50, 10),
        "edm_scalings": (torch.rand(5, **f64).mul(3).add(0.01).requires_grad_(requires_grad), 0.5, 0.008, "edm"),
        "noise_precondition": (r(B, C, 5, 3), r(B, C, 5, 3), _sigma(B, requires_grad), 0.5, 0.008, "edm"),
        "weighted_mse_loss": (r(3, C, 5), r(3, C, 5), torch.rand(3, **f64).requires_grad_(requires_grad)),
        "pseudo_huber_loss": (r(3, C, 5), r(3, C, 5), torch.rand(3, **f64).requires_grad_(requires_grad), 0.06),
        "patchify_hwc": (r(B, C, 2 * p, 3 * p), p),
        "unpatchify_hwc": (r(B, 6, p * p * C), p, 3 * p),
        # Not differentiable; the arguments of the custom ops (the public ones take a convention).
        "normalize_images": (
            torch.randint(0, 256, (B, 5, 7, C), dtype=torch.uint8), torch.tensor([True, False]),
            list(reference.IMAGENET_MEAN), [2 * s for s in reference.IMAGENET_STD], torch.float32,
        ),
        "to_uint8": (torch.randn(B, C, 5, 7, **f64), [0.5] * C, [0.5] * C),
        # Keys are a stop-gradient target: no gradient is asked of them.
        "info_nce": (F.normalize(r(3, D), dim=1).detach().requires_grad_(requires_grad),
                     F.normalize(torch.randn(6, D, **f64), dim=1), 0.2),  # fmt: skip
    }


def _sigma(n, requires_grad):
    return torch.rand(n, **f64).mul(3).add(0.01).requires_grad_(requires_grad)


#: Ops whose public function takes other arguments than the custom op (a convention name).
CONVENTION_OPS = ("normalize_images", "to_uint8")
#: The stop-gradient inside the consistency loss makes its gradient differ from the numerical
#: derivative of its value by design (tested on its own below).
STOP_GRADIENT_OPS = ("pseudo_huber_loss",)
GRADCHECK_OPS = tuple(n for n in ops.OPS if n not in CONVENTION_OPS + STOP_GRADIENT_OPS)


# --- layer 1: the references against independent formulations -----------------------------------


def test_layer_norm_reference_matches_torch():
    x, w, b = torch.randn(3, 5, 33, **f64), torch.randn(33, **f64), torch.randn(33, **f64)
    assert_close(reference.layer_norm(x, w, b, 1e-5), _ln_f64(x, w, b))


def test_layer_norm_reference_computes_in_float32_for_half_inputs():
    x = (torch.randn(4, 64) * 30 + 100).half()
    w, b = torch.ones(64), torch.zeros(64)
    out = reference.layer_norm(x, w, b, 1e-5)
    assert out.dtype == torch.float16
    assert_close(out.float(), _ln_f64(x.double(), w.double(), b.double()).float(), atol=2e-3, rtol=2e-3)


def test_ln_modulate_reference_matches_formula():
    x, w, b = torch.randn(2, 5, 16, **f64), torch.randn(16, **f64), torch.randn(16, **f64)
    shift, scale = torch.randn(2, 16, **f64), torch.randn(2, 16, **f64)
    expected = _ln_f64(x, w, b) * (1 + scale[:, None]) + shift[:, None]
    assert_close(reference.ln_modulate(x, w, b, shift, scale, 1e-5), expected)


def test_gated_residual_reference_matches_formula():
    x, y, gate = torch.randn(2, 5, 8, **f64), torch.randn(2, 5, 8, **f64), torch.randn(2, 8, **f64)
    expected = torch.stack([x[i] + gate[i] * y[i] for i in range(2)])
    assert_close(reference.gated_residual(x, gate, y), expected)


@pytest.mark.parametrize("T,H,Dh", [(7, 2, 8), (258, 2, 72), (1, 1, 16)])
def test_attention_reference_matches_explicit_softmax(T, H, Dh):
    B = 2
    qkv = torch.randn(B, T, 3 * H * Dh, **f64)
    out = reference.attention(qkv, H)
    for b in range(B):
        for h in range(H):
            q = qkv[b, :, h * Dh:(h + 1) * Dh]
            k = qkv[b, :, H * Dh + h * Dh:H * Dh + (h + 1) * Dh]
            v = qkv[b, :, 2 * H * Dh + h * Dh:2 * H * Dh + (h + 1) * Dh]
            p = torch.softmax(q @ k.T / math.sqrt(Dh), dim=-1)
            assert_close(out[b, :, h * Dh:(h + 1) * Dh], p @ v, what=f"batch {b} head {h}")


def test_patch_embed_reference_matches_unfold_matmul():
    B, C, p, D = 2, 3, 4, 10
    img = torch.randn(B, C, 3 * p, 2 * p, **f64)
    w, b, pos = torch.randn(D, C, p, p, **f64), torch.randn(D, **f64), torch.randn(6, D, **f64)
    patches = F.unfold(img, p, stride=p).transpose(1, 2)  # (B, N, C·p·p), row-major tokens
    expected = patches @ w.reshape(D, -1).T + b + pos
    assert_close(reference.patch_embed(img, w, b, pos), expected)


def test_output_head_reference_matches_per_pixel_layout():
    B, p, C, D, side = 2, 2, 3, 8, 3
    x = torch.randn(B, side * side, D, **f64)
    nw, nb = torch.randn(D, **f64), torch.randn(D, **f64)
    w, b = torch.randn(p * p * C, D, **f64), torch.randn(p * p * C, **f64)
    tokens = _ln_f64(x, nw, nb) @ w.T + b
    expected = torch.empty(B, C, side * p, side * p, **f64)
    for i in range(side):
        for j in range(side):
            for a in range(p):
                for c2 in range(p):
                    for c in range(C):  # feature layout (p1, p2, c)
                        expected[:, c, i * p + a, j * p + c2] = tokens[:, i * side + j, (a * p + c2) * C + c]
    assert_close(reference.output_head(x, nw, nb, w, b, p, 1e-5), expected)


def test_timestep_embedding_reference_matches_formula():
    t, dim = torch.tensor([-1200.0, 0.0, 3.5, 900.0], **f64), 12
    out = reference.timestep_embedding(t, dim)
    for i, ti in enumerate(t.tolist()):
        for k in range(dim // 2):
            f = math.exp(-math.log(10000.0) * k / (dim // 2))
            assert out[i, k].item() == pytest.approx(math.cos(ti * f), abs=1e-12)
            assert out[i, dim // 2 + k].item() == pytest.approx(math.sin(ti * f), abs=1e-12)


@pytest.mark.parametrize("mode", ["x0", "edm"])
def test_edm_scalings_reference_matches_formula(mode):
    sd, smin = 0.5, 0.008
    sigma = torch.tensor([0.008, 0.05, 0.5, 4.0, 320.0], **f64)
    c_in, c_skip, c_out, t_cond = reference.edm_scalings(sigma, sd, smin, mode)
    for i, s in enumerate(sigma.tolist()):
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s * s + sd * sd), rel=1e-12)
        assert t_cond[i].item() == pytest.approx(250 * math.log(s), rel=1e-12)
        if mode == "x0":
            assert (c_skip[i].item(), c_out[i].item()) == (0.0, 1.0)
        else:
            assert c_skip[i].item() == pytest.approx(sd**2 / ((s - smin) ** 2 + sd**2), rel=1e-12)
            assert c_out[i].item() == pytest.approx((s - smin) * sd / math.sqrt(s * s + sd * sd), abs=1e-15)
    if mode == "edm":  # the consistency boundary condition D(x, σ̃_min) = x, exactly
        assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)


def test_edm_scalings_t_cond_finite_at_zero_sigma_in_float32():
    _, _, _, t_cond = reference.edm_scalings(torch.zeros(2), 0.5, 0.008, "x0")
    assert torch.isfinite(t_cond).all()


# --- through epg.ops: gradients, registration, fakes ----------------------------------------------


@pytest.mark.parametrize("name", GRADCHECK_OPS)
def test_gradcheck(name):
    args = _make_inputs()[name]
    public = getattr(ops, name)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    rest = args[len(tensors):]
    with ops.use_backend("reference"):  # the custom op and its registered gradient, every op
        assert torch.autograd.gradcheck(lambda *t: public(*t, *rest), tuple(tensors), fast_mode=True)


@pytest.mark.parametrize("name", ops.NETWORK_OPS)
def test_network_ops_on_cpu_call_the_reference_directly_with_the_same_gradients(name):
    """Unforced, a network op is the reference forward under autograd; forced it is the custom
    op; both give the reference backward's gradients."""
    args = _make_inputs()[name]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    rest = args[len(tensors):]
    public = getattr(ops, name)

    def run():
        out = public(*tensors, *rest)
        grad_out = torch.linspace(-1, 1, out.numel(), **f64).view(out.shape)
        return out, torch.autograd.grad(out, tensors, grad_out), grad_out

    out_direct, grads_direct, grad_out = run()
    assert not out_direct.grad_fn.name().startswith("GeneratedBackwardFor_epg")
    with ops.use_backend("reference"):
        out_op, grads_op, _ = run()
    assert out_op.grad_fn.name().startswith(f"GeneratedBackwardFor_epg_{name}")
    assert_close(out_direct, out_op, atol=0, rtol=0)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    if name == "patch_embed":
        expected = reference.patch_embed_backward(grad_out, detached[0], detached[1], detached[3], True)
    elif name == "output_head":
        expected = reference.output_head_backward(grad_out, *detached[:4], *detached[5:])
    elif name == "gated_residual":
        expected = (grad_out, *reference.gated_residual_backward(grad_out, detached[1], detached[2]))
    elif name == "layer_norm":
        expected = reference.layer_norm_backward(grad_out, *detached[:2], detached[3])
    else:
        expected = getattr(reference, f"{name}_backward")(grad_out, *detached)
        expected = expected if isinstance(expected, tuple) else (expected,)
    for direct, via_op, e in zip(grads_direct, grads_op, expected, strict=True):
        assert_close(direct, e, atol=1e-12, rtol=1e-10, what=f"{name} direct")
        assert_close(via_op, e, atol=1e-12, rtol=1e-10, what=f"{name} custom op")


@pytest.mark.parametrize("name", ops.OPS)
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.epg, name).default, _make_inputs()[name])


@pytest.mark.parametrize("name", ops.OPS)
def test_fake_metadata_matches_real(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _make_inputs(requires_grad=False)[name]
    real = getattr(torch.ops.epg, name)(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = getattr(torch.ops.epg, name)(*fake_args)
    real, fake = (real if isinstance(real, tuple) else (real,)), (fake if isinstance(fake, tuple) else (fake,))
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


def test_patch_embed_skips_image_gradient_when_not_needed():
    img, w, b, pos = _make_inputs()["patch_embed"]
    img = img.detach()
    ops.patch_embed(img, w, b, pos).sum().backward()
    assert img.grad is None and w.grad is not None and pos.grad is not None


@pytest.mark.parametrize("forced", [False, True], ids=["unforced", "forced_reference"])
def test_ops_under_torch_compile_fullgraph_equal_eager(forced, monkeypatch):
    """Compiled on a CPU with no backend forced, the network ops are their reference math
    (inductor can fuse it); forced, they stay custom ops. Both equal eager, and dynamo has
    nothing to warn about (it warned of the backend probes' functools cache)."""
    x = torch.randn(2, 9, 12, requires_grad=True)
    w, b = torch.randn(12, requires_grad=True), torch.randn(12, requires_grad=True)
    shift, scale, gate = (torch.randn(2, 12, requires_grad=True) for _ in range(3))
    qkv_w = torch.randn(36, 12, requires_grad=True)

    def block(x):
        h = ops.ln_modulate(x, w, b, shift, scale)
        h = ops.attention(h @ qkv_w.T, 3)
        return ops.gated_residual(ops.layer_norm(x, w, b), gate, h).square().sum()

    graph_ops = set()

    def recording_backend(gm, example_inputs):
        graph_ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    eager = block(x)  # on a CPU: the references called directly
    grads_eager = torch.autograd.grad(eager, [x, w, shift, qkv_w])
    force = ops.use_backend("reference") if forced else contextlib.nullcontext()
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())  # its warnings fire anew
    with force, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(block, fullgraph=True, backend=recording_backend)(x)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
        grads_compiled = torch.autograd.grad(compiled, [x, w, shift, qkv_w])
    assert not [warning.message for warning in caught if "Dynamo" in str(warning.message)]
    custom = {f"epg.{op}.default" for op in ("ln_modulate", "attention", "gated_residual", "layer_norm")}
    if forced or not _backend.choice_traceable():  # torch 2.11: compiled code keeps the custom ops
        assert custom <= graph_ops
    else:
        assert not any(str(op).startswith("epg.") for op in graph_ops), graph_ops
    assert_close(compiled.detach(), eager.detach(), atol=1e-5, rtol=1e-5)
    for gc, ge in zip(grads_compiled, grads_eager):
        # Forced, the compiled backward is the registered backwards, eager is autograd of the
        # reference forwards: float32 roundings differ, by ~2e-6 of the largest gradient each.
        assert_close(gc, ge, atol=1e-5 * ge.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("forced", [False, True], ids=["unforced", "forced_reference"])
def test_patch_embed_under_autocast_compiles_fullgraph(forced):
    """The op layer's autocast cast of patch_embed's operands traces without a graph break
    (torch 2.11's dynamo could not trace torch.amp.is_autocast_available) and equals eager."""
    img = torch.randn(2, 3, 8, 8)
    w, b, pos = (torch.randn(*s, requires_grad=True) for s in ((16, 3, 4, 4), (16,), (4, 16)))

    def embed(img):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.patch_embed(img, w, b, pos)

    force = ops.use_backend("reference") if forced else contextlib.nullcontext()
    with force:
        eager = embed(img)
        compiled = torch.compile(embed, fullgraph=True, backend="aot_eager")(img)
    assert eager.dtype == compiled.dtype == torch.float32  # bf16 conv + the float32 table
    assert torch.equal(compiled, eager)
    assert [g.dtype for g in torch.autograd.grad(compiled.sum(), [w, b, pos])] == [torch.float32] * 3


def test_compiled_network_op_follows_a_backend_forced_after_compiling(monkeypatch):
    """A function compiled with no backend forced is recompiled, not reused, once EPG_BACKEND or
    use_backend forces one: the choice made at tracing time is guarded."""
    if not _backend.choice_traceable():
        pytest.skip(f"torch {torch.__version__}: dynamo cannot trace the backend choice, compiled "
                    "code keeps the custom ops (covered by test_ops_under_torch_compile_...)")
    monkeypatch.delenv("EPG_BACKEND", raising=False)
    monkeypatch.delenv("EPG_BACKEND_LAYER_NORM", raising=False)
    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm

    compiled = torch.compile(lambda x: ops.layer_norm(x, w, b), fullgraph=True, backend=recording_backend)

    def uses_custom_op():
        compiled(x)
        return "epg.layer_norm.default" in graphs[-1]

    assert not uses_custom_op()
    monkeypatch.setenv("EPG_BACKEND_LAYER_NORM", "reference")
    assert uses_custom_op() and len(graphs) == 2
    monkeypatch.delenv("EPG_BACKEND_LAYER_NORM")
    monkeypatch.setenv("UNRELATED_TO_EPG", "1")
    compiled(x)
    assert len(graphs) == 2  # the first graph again: no new tracing, unrelated variables unguarded
    with ops.use_backend("reference", "layer_norm"):
        assert uses_custom_op() and len(graphs) == 3


# --- input validation -----------------------------------------------------------------------


def test_bad_shapes_raise_value_errors_naming_the_expected_form():
    with pytest.raises(ValueError, match=r"shift and scale must be \(2, 8\)"):
        ops.ln_modulate(torch.randn(2, 3, 8), torch.ones(8), torch.zeros(8), torch.randn(2, 4), torch.randn(2, 8))
    with pytest.raises(ValueError, match="3·num_heads·head_dim"):
        ops.attention(torch.randn(1, 4, 20), 3)
    with pytest.raises(ValueError, match="expected 3 channels"):
        ops.patch_embed(torch.randn(1, 1, 8, 8), torch.randn(4, 3, 4, 4), torch.randn(4), torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"weight must be \(D, C, p, p\), got \(4, 3, 4\)"):
        ops.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 4), torch.randn(4),
                        torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., D\)"):
        ops.layer_norm(torch.tensor(1.0), torch.ones(1), torch.zeros(1))
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        ops.output_head(torch.randn(1, 4, 8), torch.ones(8), torch.zeros(8), torch.randn(12, 8),
                        torch.randn(12), 0)
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.edm_scalings(torch.ones(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.edm_scalings(torch.ones(3), mode="v")


# --- backend choice -----------------------------------------------------------------------------


def test_automatic_choice_on_cpu_is_reference():
    assert _backend.choose("layer_norm", torch.device("cpu")) == "reference"


def test_unknown_backend_name_is_rejected(monkeypatch):
    monkeypatch.setenv("EPG_BACKEND", "fast")
    with pytest.raises(ValueError, match="EPG_BACKEND='fast'"):
        ops.layer_norm(torch.randn(2, 4), torch.ones(4), torch.zeros(4))


def test_forcing_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("EPG_BACKEND", "triton")
    with pytest.raises(ops.BackendUnavailableError, match="triton"):
        ops.attention(torch.randn(1, 3, 12), 2)


def test_forcing_a_backend_for_an_op_it_lacks_says_which_ops_it_has():
    info = _backend.info("cuda")
    if not info.available or "attention" in info.implementations:
        pytest.skip("needs the extension without an attention kernel")
    with ops.use_backend("cuda", "attention"), pytest.raises(ops.BackendUnavailableError, match="no implementation of 'attention'"):
        ops.attention(torch.randn(1, 3, 12), 2)


@pytest.mark.parametrize("how", ["EPG_BACKEND", "use_backend"])
def test_a_backend_forced_for_every_op_runs_the_ops_it_has_and_leaves_the_others(monkeypatch, how):
    # EPG_BACKEND=triton means Triton wherever it has a kernel: strict, it failed at the
    # network's first op Triton lacks (timestep_embedding) and could only be used op by op.
    info = _backend.info("cuda")
    if not info.available or "attention" in info.implementations:
        pytest.skip("needs the extension without an attention kernel")
    cpu = torch.device("cpu")
    def force():
        return contextlib.nullcontext() if how == "EPG_BACKEND" else ops.use_backend("cuda")

    if how == "EPG_BACKEND":
        monkeypatch.setenv("EPG_BACKEND", "cuda")
    with force():
        assert _backend.choose("noise_precondition", cpu) == "cuda"  # its C++ twin
        assert _backend.choose("attention", cpu) == "reference"
        assert _backend.is_forced("noise_precondition") and not _backend.is_forced("attention")
        x = torch.randn(1, 3, 12)
        assert torch.equal(ops.attention(x, 2), reference.attention(x, 2))
    monkeypatch.setenv("EPG_BACKEND_ATTENTION", "cuda")  # forced for that op alone: it raises
    with force(), pytest.raises(ops.BackendUnavailableError, match="no implementation of 'attention'"):
        ops.attention(x, 2)


def test_a_forced_backend_that_cannot_run_here_is_an_environment_problem(monkeypatch):
    for var in [v for v in os.environ if v.startswith("EPG_BACKEND")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("EPG_BACKEND", "flash_attn")
    flash = _backend.info("flash_attn")
    if not flash.available:  # (the commands start with this check: see test_cli_inputs)
        expected = [f"EPG_BACKEND='flash_attn': {flash.reason}"]
    elif not torch.cuda.is_available():
        expected = ["EPG_BACKEND='flash_attn': no CUDA GPU here, and flash-attn runs CUDA tensors only"]
    else:
        expected = []
    assert _backend.environment_problems() == expected
    monkeypatch.setenv("EPG_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    problems = _backend.environment_problems()
    if torch.cuda.is_available() or not _backend.info("triton").available:
        pytest.skip("needs Triton and no GPU")
    assert problems == ["EPG_BACKEND='triton': no CUDA GPU here, and Triton runs CPU tensors only "
                        "under TRITON_INTERPRET=1 (set before import)"]  # fmt: skip
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.environment_problems() == []


def test_use_backend_auto_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("EPG_BACKEND", "triton")
    with ops.use_backend("auto"):
        assert _backend.choose("layer_norm", torch.device("cpu")) == "reference"


def test_per_op_environment_variable(monkeypatch):
    monkeypatch.setenv("EPG_BACKEND_LAYER_NORM", "reference")
    monkeypatch.setenv("EPG_BACKEND", "triton")
    assert _backend.choose("layer_norm", torch.device("cpu")) == "reference"
    assert _backend.choose("layer_norm_backward", torch.device("cpu")) == "reference"


def _cpu_backend_cases():
    """(backend, op) pairs that some non-reference backend can run on CPU tensors here."""
    cases = []
    for name in ("cuda", "triton"):
        info = _backend.info(name)
        for op in ops.OPS:
            if info.available and op in info.implementations and op not in CONVENTION_OPS:
                cases.append(pytest.param(name, op, id=f"{name}-{op}"))
    return cases


@pytest.mark.parametrize("backend,op", _cpu_backend_cases())
def test_forced_backend_matches_reference_forward_and_backward(backend, op):
    if backend == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before import")
        if reason := interpreter_problem():
            pytest.skip(reason)
    args64 = _make_inputs()[op]
    args = [a.detach().float().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in args64]  # fmt: skip
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    differentiable = [t for t in tensors if t.requires_grad]
    public = getattr(ops, op)
    rest = args[len(tensors):]

    def run():
        out = public(*tensors, *rest)
        out = out if isinstance(out, tuple) else (out,)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in out)
        return out, torch.autograd.grad(loss, differentiable)

    out_ref, grads_ref = run()
    with ops.use_backend(backend, op):
        assert _backend.choose(op, torch.device("cpu")) == backend
        out, grads = run()
    for o, e in zip(out, out_ref):
        assert_close(o, e, atol=2e-5, rtol=2e-5, what=f"{op} forward")
    for g, e in zip(grads, grads_ref):
        assert_close(g, e, atol=1e-4, rtol=1e-4, what=f"{op} backward")


# --- stage-2 ops: the references against the formulas the objectives and the data code use ----------


@pytest.mark.parametrize("mode", ["x0", "edm"])
def test_noise_precondition_reference_is_the_objectives_network_input(mode):
    x0, eps = torch.randn(3, 2, 4, 5, **f64), torch.randn(3, 2, 4, 5, **f64)
    sigma = torch.tensor([0.008, 0.7, 320.0], **f64)
    x_in, *scalings = reference.noise_precondition(x0, eps, sigma, 0.5, 0.008, mode)
    for got, expected in zip(scalings, reference.edm_scalings(sigma, 0.5, 0.008, mode)):
        assert torch.equal(got, expected)
    for i, s in enumerate(sigma.tolist()):  # c_in·(x0 + σ·ε), as DiffusionObjective.loss builds it
        assert_close(x_in[i], (x0[i] + s * eps[i]) / math.sqrt(s * s + 0.25), what=f"sample {i}")


def test_weighted_mse_reference_mean_is_the_diffusion_loss():
    x0_hat, x0 = torch.randn(4, 3, 6, 6).bfloat16(), torch.randn(4, 3, 6, 6)
    weight = torch.rand(4) * 100
    loss, mse = reference.weighted_mse_loss(x0_hat, x0, weight)
    # DiffusionObjective.loss: mean over (B, C, H, W) of w·(x̂0 − x0)² in float32.
    expected = (weight.view(4, 1, 1, 1) * (x0_hat.float() - x0.float()).square()).mean()
    assert_close(loss.mean(), expected, atol=1e-6, rtol=1e-6)
    assert_close(mse, (x0_hat.float() - x0).square().flatten(1).mean(dim=1), atol=1e-6, rtol=1e-6)
    assert loss.dtype == torch.float32


def test_pseudo_huber_loss_is_the_consistency_loss_with_its_stop_gradient():
    c = 0.06
    d_online = torch.randn(3, 2, 5, 5, **f64, requires_grad=True)
    d_target = torch.randn(3, 2, 5, 5, **f64, requires_grad=True)
    weight = torch.rand(3, **f64, requires_grad=True)
    # ConsistencyObjective.loss
    delta2 = (d_online - d_target).square().flatten(1).sum(dim=1)
    expected = weight * delta2 / torch.sqrt(delta2.detach() + c**2)
    got = ops.pseudo_huber_loss(d_online, d_target, weight, c)
    assert_close(got, expected)
    probe = torch.randn(3, **f64)
    inputs = (d_online, d_target, weight)
    grads = torch.autograd.grad((got * probe).sum(), inputs)
    for g, e in zip(grads, torch.autograd.grad((expected * probe).sum(), inputs, retain_graph=True)):
        assert_close(g, e)
    # ... which is twice the gradient of w·(sqrt(Δ² + c²) − c) with respect to the outputs.
    huber = weight * (torch.sqrt(delta2 + c**2) - c)
    assert_close(grads[0], 2 * torch.autograd.grad((huber * probe).sum(), d_online)[0])


@pytest.mark.parametrize("convention", ["simple", "imagenet"])
def test_normalize_images_reference_equals_the_loaders_normalisation(convention):
    from epg.data.augment import from_unit

    u = torch.randint(0, 256, (3, 6, 7, 3), dtype=torch.uint8)
    flip = torch.tensor([True, False, True])
    nchw = torch.where(flip.view(3, 1, 1, 1), u.flip(2), u).permute(0, 3, 1, 2)
    expected = from_unit(nchw.to(torch.float32).div_(255.0), convention)  # what the loaders do
    mean, std = reference.normalization_stats(convention, 3)
    assert torch.equal(reference.normalize_images(u, flip, mean, std, torch.float32), expected)
    assert torch.equal(ops.normalize_images(u, convention, flip), expected)
    bf16 = ops.normalize_images(u, convention, flip, torch.bfloat16)
    assert torch.equal(bf16, expected.bfloat16())  # float32 math rounded once


@pytest.mark.parametrize("convention", ["simple", "imagenet"])
def test_to_uint8_reference_equals_the_png_writer(convention):
    import numpy as np

    from epg.data.embedded import to_uint8 as png_pixels

    x = torch.randn(2, 3, 5, 6) * 1.5
    mean, std = reference.normalization_stats(convention, 3)
    got = reference.to_uint8(x, mean, std)
    assert np.array_equal(got.numpy(), png_pixels(x, convention))
    assert torch.equal(ops.to_uint8(x, convention), got)
    gray = torch.randn(2, 1, 4, 4)
    assert np.array_equal(ops.to_uint8(gray, "simple").numpy(), png_pixels(gray, "simple"))


def test_normalization_stats():
    assert reference.normalization_stats("simple", 1) == ([0.5], [0.5])
    mean, std = reference.normalization_stats("imagenet", 3)
    assert mean == [0.485, 0.456, 0.406] and std == pytest.approx([0.458, 0.448, 0.45], abs=1e-15)
    with pytest.raises(ValueError, match="'imagenet' convention needs 3 channels, got 1"):
        reference.normalization_stats("imagenet", 1)
    with pytest.raises(ValueError, match="convention must be one of"):
        reference.normalization_stats("[-1, 1]", 3)


def test_patchify_hwc_reference_is_the_output_head_layout():
    B, C, p, gh, gw = 2, 3, 4, 2, 3
    img = torch.randn(B, C, gh * p, gw * p, **f64)
    tokens = reference.patchify_hwc(img, p)
    assert tokens.shape == (B, gh * gw, p * p * C)
    for i in range(gh):
        for j in range(gw):
            for p1 in range(p):
                for p2 in range(p):
                    for c in range(C):  # features (p1, p2, c)
                        assert torch.equal(tokens[:, i * gw + j, (p1 * p + p2) * C + c], img[:, c, i * p + p1, j * p + p2])
    assert torch.equal(tokens, reference.patchify_output_order(img, p))
    assert torch.equal(reference.unpatchify_hwc(tokens, p, gh * p), img)
    square = torch.randn(B, 9, p * p * C, **f64)
    assert torch.equal(reference.unpatchify_hwc(square, p, 3 * p), reference.unpatchify(square, p, C))
    assert torch.equal(ops.unpatchify_hwc(square, p), reference.unpatchify(square, p, C))


def test_stage2_ops_reject_bad_arguments_with_value_errors():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"eps must match x0 \(2, 3, 4, 4\) torch.float32 on cpu"):
        ops.noise_precondition(x, x.double(), torch.rand(2))
    with pytest.raises(ValueError, match=r"eps must match x0"):
        ops.noise_precondition(x, x.to("meta"), torch.rand(2))
    with pytest.raises(ValueError, match=r"sigma must be \(2,\) for a batch of 2"):
        ops.noise_precondition(x, x, torch.rand(3))
    with pytest.raises(ValueError, match=r"sigma must be on cpu like the images"):
        ops.noise_precondition(x, x, torch.rand(2, device="meta"))
    with pytest.raises(ValueError, match="sigma must be float32 or float64"):
        ops.noise_precondition(x, x, torch.rand(2).half())
    with pytest.raises(ValueError, match="x0 must be float32, float64, bfloat16 or float16"):
        ops.noise_precondition(x.int(), x.int(), torch.rand(2))
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.noise_precondition(x, x, torch.rand(2), mode="v")
    with pytest.raises(ValueError, match=r"target must have pred's dtype torch.float32 \(or float32"):
        ops.weighted_mse_loss(x, x.double(), torch.rand(2))
    with pytest.raises(ValueError, match=r"target must have pred's shape \(2, 3, 4, 4\)"):
        ops.weighted_mse_loss(x, x[:, :2], torch.rand(2))
    with pytest.raises(ValueError, match=r"weight must be \(2,\)"):
        ops.pseudo_huber_loss(x, x, torch.rand(2, 1))
    with pytest.raises(ValueError, match="c must be a finite number > 0"):
        ops.pseudo_huber_loss(x, x, torch.rand(2), c=0.0)
    u = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"images must be uint8 \(B, H, W, C\), got torch.float32"):
        ops.normalize_images(u.float(), "imagenet")
    with pytest.raises(ValueError, match="convention must be one of"):
        ops.normalize_images(u, "imagenet2")
    with pytest.raises(ValueError, match="'imagenet' convention needs 3 channels"):
        ops.normalize_images(u[..., :1], "imagenet")
    with pytest.raises(ValueError, match=r"flip must be \(2,\)"):
        ops.normalize_images(u, "simple", torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="flip must be bool"):
        ops.normalize_images(u, "simple", torch.ones(2))
    with pytest.raises(ValueError, match="dtype must be float32, float64, bfloat16 or float16"):
        ops.normalize_images(u, "simple", dtype=torch.int64)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) with 1 <= C <= 16"):
        ops.to_uint8(torch.randn(1, 17, 2, 2), "simple")
    with pytest.raises(ValueError, match="images must be float32, float64, bfloat16 or float16"):
        ops.to_uint8(u.permute(0, 3, 1, 2), "simple")
    with pytest.raises(ValueError, match=r"H and W multiples of 4"):
        ops.patchify_hwc(torch.randn(1, 3, 8, 10), 4)
    with pytest.raises(ValueError, match="token count 6 is not a square; pass height"):
        ops.unpatchify_hwc(torch.randn(1, 6, 48), 4)
    with pytest.raises(ValueError, match=r"height must be a multiple of 4"):
        ops.unpatchify_hwc(torch.randn(1, 6, 48), 4, 10)
    with pytest.raises(ValueError, match=r"p·p = 16 dividing the last dim"):
        ops.unpatchify_hwc(torch.randn(1, 4, 40), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_cuda_backend_converts_images_like_the_reference(dtype):
    if "normalize_images" not in _backend.info("cuda").implementations:
        pytest.skip("needs the extension epg._C")
    u = torch.randint(0, 256, (3, 5, 9, 3), dtype=torch.uint8)
    flip = torch.tensor([False, True, True])
    expected = ops.normalize_images(u, "imagenet", flip, dtype)
    with ops.use_backend("cuda"):
        assert _backend.choose("normalize_images", torch.device("cpu")) == "cuda"
        got = ops.normalize_images(u, "imagenet", flip, dtype)
        pixels = ops.to_uint8(got, "imagenet")
    assert torch.equal(got, expected)
    assert torch.equal(pixels, ops.to_uint8(expected, "imagenet"))


def test_stage2_ops_under_torch_compile_fullgraph_equal_eager():
    u = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    flip = torch.tensor([True, False])
    eps, sigma, weight = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 5.0]), torch.tensor([2.0, 0.5])
    lin = torch.randn(48, 48, requires_grad=True)

    def step(u, flip, eps, sigma, weight, lin):
        x0 = ops.normalize_images(u, "imagenet", flip)
        x_in, _, c_skip, c_out, _ = ops.noise_precondition(x0, eps, sigma, 0.5, 0.008, "edm")
        out = ops.unpatchify_hwc(ops.patchify_hwc(x_in, 4) @ lin, 4)
        s = sigma.view(-1, 1, 1, 1)
        d = c_skip.view(-1, 1, 1, 1) * (x0 + s * eps) + c_out.view(-1, 1, 1, 1) * out
        loss = ops.weighted_mse_loss(out, x0, weight).mean() + ops.pseudo_huber_loss(d, x0, weight).mean()
        return loss, ops.to_uint8(d, "imagenet")

    eager, pixels = step(u, flip, eps, sigma, weight, lin)
    (grad_eager,) = torch.autograd.grad(eager, lin)
    compiled, pixels_c = torch.compile(step, fullgraph=True, backend="aot_eager")(u, flip, eps, sigma, weight, lin)
    (grad_compiled,) = torch.autograd.grad(compiled, lin)
    assert_close(compiled.detach(), eager.detach(), atol=1e-5, rtol=1e-5)
    assert_close(grad_compiled, grad_eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(pixels_c, pixels)


def test_info_nce_reference_matches_cross_entropy_and_objective_form():
    q = F.normalize(torch.randn(4, 16, **f64), dim=1)
    k = F.normalize(torch.randn(8, 16, **f64), dim=1)
    expected = F.cross_entropy(q @ k.T / 0.1, torch.arange(4), reduction="none")
    assert_close(reference.info_nce(q, k, 0.1), expected)
    # A tensor temperature (the schedule's per-step value) gives the same loss and gradient.
    qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
    la, lb = ops.info_nce(qa, k, 0.1), ops.info_nce(qb, k, torch.tensor(0.1, **f64))
    assert_close(la, lb)
    la.sum().backward()
    lb.sum().backward()
    assert_close(qa.grad, qb.grad)


def test_a_forced_backend_reaches_a_backward_run_on_another_thread(monkeypatch):
    """The autograd engine runs CUDA backwards on worker threads; use_backend must reach them."""
    import threading

    x = torch.randn(2, 3, 8, requires_grad=True)
    with ops.use_backend("reference", "layer_norm"):
        y = ops.layer_norm(x, torch.ones(8), torch.zeros(8))
    seen = {}
    original = _backend.choose

    def spy(op, device, args=()):
        seen[op] = _backend.forced_state()
        return original(op, device, args)

    monkeypatch.setattr(_backend, "choose", spy)
    thread = threading.Thread(target=lambda: y.sum().backward())  # a fresh context: nothing forced
    thread.start()
    thread.join()
    assert seen["layer_norm_backward"] == {"layer_norm": "reference"}
    assert x.grad is not None
