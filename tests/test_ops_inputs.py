"""The op layer refuses inputs it would otherwise mangle or misread, with errors saying what to pass:
transposed image layouts, integer activations, numbers where tensors are due, a zero tensor τ,
too small embedding widths, unknown op and backend names; and `epg info` says what can run here."""

import pytest
import torch
import torch.nn.functional as F

import epg.ops as ops
from epg import _backend, reference
from epg.cli import main

# --- image layouts ---------------------------------------------------------------------------------


def test_normalize_images_refuses_an_nchw_batch_and_names_the_permute():
    u = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    for convention in ("simple", "imagenet"):  # 'simple' returned a scrambled (2, 8, 3, 8)
        with pytest.raises(ValueError, match=r"looks like \(B, C, H, W\): pass images\.permute\(0, 2, 3, 1\)"):
            ops.normalize_images(u, convention)
    gray = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"images must be uint8 \(B, H, W, C\), got \(2, 1, 8, 8\)"):
        ops.normalize_images(gray, "simple")
    nhwc = u.permute(0, 2, 3, 1)
    assert ops.normalize_images(nhwc, "imagenet").shape == (2, 3, 8, 8)
    # Three rows of three channels: both dims are channel-like, so the layout stands as given.
    assert ops.normalize_images(torch.zeros(2, 3, 5, 3, dtype=torch.uint8), "simple").shape == (2, 3, 3, 5)


def test_to_uint8_refuses_an_nhwc_batch_and_names_the_permute():
    for shape in ((2, 8, 8, 3), (2, 8, 8, 1)):
        with pytest.raises(ValueError, match=r"looks like \(B, H, W, C\): pass images\.permute\(0, 3, 1, 2\)"):
            ops.to_uint8(torch.rand(*shape), "simple")
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(ops.to_uint8(x, "simple"), reference.to_uint8(x, [0.5] * 3, [0.5] * 3))
    assert ops.to_uint8(torch.rand(2, 3, 5, 3), "imagenet").shape == (2, 5, 3, 3)


# --- dtypes and argument types -------------------------------------------------------------------


def _int_activation_calls():
    def i(*shape):
        return torch.randint(-3, 4, shape)

    def f(*shape):
        return torch.randn(*shape)

    B, T, D = 2, 4, 6
    return {
        "layer_norm": lambda: ops.layer_norm(i(B, T, D), f(D), f(D)),  # returned truncated int64
        "ln_modulate": lambda: ops.ln_modulate(i(B, T, D), f(D), f(D), f(B, D), f(B, D)),
        "gated_residual": lambda: ops.gated_residual(i(B, T, D), i(B, D), i(B, T, D)),
        "attention": lambda: ops.attention(i(B, T, 12), 2),
        "patch_embed": lambda: ops.patch_embed(i(B, 3, 8, 8).to(torch.uint8), f(D, 3, 4, 4), f(D), f(4, D)),
        "output_head": lambda: ops.output_head(i(B, 4, D), f(D), f(D), f(48, D), f(48), 4),
        "info_nce": lambda: ops.info_nce(i(2, 4), i(3, 4), 0.1),
    }


@pytest.mark.parametrize("name", sorted(_int_activation_calls()))
def test_ops_of_float_activations_refuse_integer_inputs(name):
    with pytest.raises(ValueError, match=rf"{name}: \w+ must be float32, float64, bfloat16 or float16, got torch\.(int64|uint8)"):
        _int_activation_calls()[name]()


def test_a_number_where_a_tensor_is_due_is_a_type_error_naming_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match=r"edm_scalings: sigma must be a \(B,\) float32 or float64 tensor, got float"):
        ops.edm_scalings(1.0)
    with pytest.raises(TypeError, match=r"weighted_mse_loss: weight must be a \(2,\) tensor, got float"):
        ops.weighted_mse_loss(x, x, 1.0)
    with pytest.raises(TypeError, match=r"pseudo_huber_loss: weight must be a \(2,\) tensor, got int"):
        ops.pseudo_huber_loss(x, x, 1)
    with pytest.raises(TypeError, match=r"noise_precondition: sigma must be a \(2,\) tensor, got float"):
        ops.noise_precondition(x, x, 0.5)
    with pytest.raises(TypeError, match=r"timestep_embedding: t must be a \(B,\) float tensor, got float"):
        ops.timestep_embedding(0.5, 8)


# --- scalar arguments --------------------------------------------------------------------------------


def test_info_nce_checks_a_cpu_tensor_tau_like_a_float_one():
    q = F.normalize(torch.randn(3, 8), dim=1)
    k = F.normalize(torch.randn(5, 8), dim=1)
    for tau in (0.0, -0.1):
        for given in (tau, torch.tensor(tau)):
            with pytest.raises(ValueError, match="info_nce: tau must be positive"):
                ops.info_nce(q, k, given)
    with pytest.raises(ValueError, match=r"a tensor tau must hold one value, got shape \(3,\)"):
        ops.info_nce(q, k, torch.full((3,), 0.2))
    expected = ops.info_nce(q, k, 0.2)
    torch.testing.assert_close(ops.info_nce(q, k, torch.tensor(0.2)), expected)
    torch.testing.assert_close(ops.info_nce(q, k, torch.tensor([0.2])), expected)


def test_info_nce_with_a_tensor_tau_compiles_without_a_graph_break():
    # The value check reads the tensor, which a traced graph cannot: it is skipped there.
    q = F.normalize(torch.randn(3, 8), dim=1)
    k = F.normalize(torch.randn(5, 8), dim=1)
    compiled = torch.compile(ops.info_nce, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, torch.tensor(0.2)), ops.info_nce(q, k, 0.2))


@pytest.mark.parametrize("dim", [-4, 0, 1])
def test_timestep_embedding_refuses_a_width_below_two(dim):
    with pytest.raises(ValueError, match=rf"timestep_embedding: dim must be >= 2 .*got {dim}"):
        ops.timestep_embedding(torch.randn(3), dim)


def test_timestep_embedding_takes_an_odd_width_with_a_zero_last_column():
    t = torch.randn(3) * 50
    assert torch.equal(ops.timestep_embedding(t, 2), torch.stack((t.cos(), t.sin()), dim=1))
    odd = ops.timestep_embedding(t, 5)
    assert odd.shape == (3, 5) and torch.equal(odd[:, 4], torch.zeros(3))


# --- backend and op names ----------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["layernorm", "patchify", "layer_norm_backward"])
def test_use_backend_refuses_an_op_that_is_not_dispatched(op):
    with pytest.raises(ValueError, match=rf"use_backend: epg has no op '{op}'"), ops.use_backend("triton", op):
        pass


def test_use_backend_suggests_the_op_meant():
    with pytest.raises(ValueError, match="did you mean 'layer_norm'"), ops.use_backend("triton", "layernorm"):
        pass


@pytest.mark.parametrize("name", ["ref", "REF", "Reference", " reference "])
def test_use_backend_takes_the_names_the_variable_takes(monkeypatch, name):
    cpu = torch.device("cpu")
    with ops.use_backend(name, "layer_norm"):
        assert _backend.is_forced("layer_norm") and _backend.choose("layer_norm", cpu) == "reference"
    monkeypatch.setenv("EPG_BACKEND_LAYER_NORM", name)
    assert _backend.environment_problems() == []
    assert _backend.is_forced("layer_norm") and _backend.choose("layer_norm", cpu) == "reference"


@pytest.mark.parametrize(
    "op", ["normalization_stats", "patchify", "patchify_output_order", "unpatchify", "unpatchify_conv_order"]
)
def test_a_variable_for_a_reference_helper_is_an_environment_problem(monkeypatch, op):
    # Helpers of epg.reference have no backends to choose from: the variable would do nothing.
    var = f"EPG_BACKEND_{op.upper()}"
    monkeypatch.setenv(var, "reference")
    (problem,) = _backend.environment_problems()
    assert problem.startswith(f"{var}: epg has no op {op!r} (")


def test_a_misspelt_op_variable_suggests_the_op_meant(monkeypatch):
    monkeypatch.setenv("EPG_BACKEND_LAYERNORM", "triton")
    (problem,) = _backend.environment_problems()
    assert problem.startswith("EPG_BACKEND_LAYERNORM: epg has no op 'layernorm' (did you mean 'layer_norm'? ops: ")


# --- what `epg info` says can run here ---------------------------------------------------------------


@pytest.fixture
def fresh_probes(monkeypatch):
    """Probes the Triton and extension backends anew, and again after the test (which patches what
    they see): their results are cached per process."""
    _backend.probe_again()
    yield
    _backend.probe_again()


def _detail(name, monkeypatch, gpu, interpret=None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    _backend.probe_again()
    backend = _backend.info(name)
    if not backend.available:
        pytest.skip(f"{name} is unavailable here: {backend.reason}")
    return backend.reason


def test_triton_detail_says_what_it_can_run_here(monkeypatch, fresh_probes):
    import triton

    version = f"Triton {triton.__version__}"
    assert _detail("triton", monkeypatch, gpu=True) == version
    assert _detail("triton", monkeypatch, gpu=False) == (
        f"{version} (GPU only here: no CUDA GPU; CPU tensors need TRITON_INTERPRET=1)"
    )
    assert _detail("triton", monkeypatch, gpu=False, interpret="1") == (
        f"{version} (no CUDA GPU here: CPU tensors under TRITON_INTERPRET=1, when forced)"
    )


def test_extension_detail_says_what_it_can_run_here(monkeypatch, fresh_probes):
    _C = pytest.importorskip("epg._C", reason="needs the extension epg._C")
    if not getattr(_C, "WITH_CUDA", 0):
        detail = "epg._C: C++ kernels only (built without CUDA): they run on CPU when forced"
        assert _detail("cuda", monkeypatch, gpu=False) == detail
        return
    assert _detail("cuda", monkeypatch, gpu=True) == "epg._C: C++ and CUDA kernels"
    assert _detail("cuda", monkeypatch, gpu=False) == (
        "epg._C built with CUDA kernels; no GPU here: its C++ twins run on CPU when forced"
    )


def test_extension_detail_says_when_its_cpu_kernels_are_single_threaded(monkeypatch, fresh_probes):
    _C = pytest.importorskip("epg._C", reason="needs the extension epg._C")
    monkeypatch.setattr(_C, "WITH_OPENMP", 0)
    assert _detail("cuda", monkeypatch, gpu=False).endswith(
        " (C++ kernels on one thread: built without OpenMP)"
    )
    monkeypatch.setattr(_C, "WITH_OPENMP", 1)
    assert "OpenMP" not in _detail("cuda", monkeypatch, gpu=False)


def test_info_prints_what_the_backends_can_run_here(monkeypatch, fresh_probes, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the text printed on a machine without a GPU")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    if _backend.info("triton").available:
        assert "CPU tensors need TRITON_INTERPRET=1" in out
    if _backend.info("cuda").available:
        assert "run on CPU when forced" in out


def test_every_op_names_a_tensor_argument_given_as_a_number():
    # gated_residual(x, 0.5, x) and ln_modulate(..., 0.0, scale) were "'float' object has no
    # attribute 'shape'".
    x, w, b = torch.randn(2, 3, 8), torch.ones(8), torch.zeros(8)
    cases = [
        (lambda: ops.gated_residual(x, 0.5, x), "gated_residual: gate must be a tensor, got float"),
        (lambda: ops.ln_modulate(x, w, b, 0.0, torch.zeros(2, 8)), "ln_modulate: shift must be a tensor, got float"),
        (lambda: ops.layer_norm([1.0], w, b), "layer_norm: x must be a tensor, got list"),
        (lambda: ops.patch_embed(torch.randn(2, 3, 8, 8), 1.0, b, b), "patch_embed: weight must be a tensor, got float"),
        (lambda: ops.info_nce(torch.randn(2, 4), None, 0.2), "info_nce: k must be a tensor, got NoneType"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(TypeError, match=f"^{message}$"):
            call()


def test_a_bad_sdpa_kernel_variable_is_an_environment_problem(monkeypatch):
    # It was read at the first attention call only: after the run folder was made.
    monkeypatch.setenv("EPG_SDPA_KERNEL", "bogus")
    assert any("EPG_SDPA_KERNEL='bogus': expected one of" in p for p in _backend.environment_problems())
    monkeypatch.setenv("EPG_SDPA_KERNEL", "math")
    assert not any("EPG_SDPA_KERNEL" in p for p in _backend.environment_problems())


def test_patch_embed_names_the_permute_for_a_channels_last_image():
    weight, bias, pos = torch.randn(64, 3, 4, 4), torch.zeros(64), torch.zeros(64, 64)
    with pytest.raises(ValueError, match=r"looks like \(B, H, W, C\), pass img.permute\(0, 3, 1, 2\)"):
        ops.patch_embed(torch.randn(2, 32, 32, 3), weight, bias, pos)
    with pytest.raises(ValueError, match=r"expected 3 channels and sides divisible by 4\)$"):
        ops.patch_embed(torch.randn(2, 1, 32, 32), weight, bias, pos)  # not transposed: no hint


# --- shapes, dtypes and devices each op checks itself ---------------------------------------------


def _refused_calls():
    def f(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype)

    x, w, b = f(2, 4, 6), f(6), f(6)
    img = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8)
    return {
        "layer_norm bias": (lambda: ops.layer_norm(x, w, f(5)), r"layer_norm: weight and bias must be \(6,\)"),
        "ln_modulate scale": (lambda: ops.ln_modulate(x, w, b, f(2, 6), f(2, 7)), r"shift and scale must be \(2, 6\)"),
        "attention no heads": (lambda: ops.attention(f(1, 3, 12), 0), r"last dim 12 is not 3·num_heads·head_dim for num_heads=0"),
        "attention width": (lambda: ops.attention(f(1, 3, 8), 2), r"last dim 8 is not 3·num_heads·head_dim for num_heads=2"),
        "patch_embed kernel": (lambda: ops.patch_embed(f(2, 3, 8, 8), f(6, 3, 4, 2), b, f(4, 6)), r"does not fit weight \(6, 3, 4, 2\)"),
        "output_head tokens": (lambda: ops.output_head(f(2, 5, 6), w, b, f(16, 6), f(16), 2), "token count 5 is not a square"),
        "output_head patch": (lambda: ops.output_head(f(2, 4, 6), w, b, f(16, 6), f(16), 0), "patch_size must be >= 1, got 0"),
        "output_head weight": (lambda: ops.output_head(f(2, 4, 6), w, b, f(15, 6), f(15), 2), r"weight must be \(p·p·C, 6\) with p=2"),
        "timestep_embedding t": (lambda: ops.timestep_embedding(torch.arange(3), 8), "t must be float, got torch.int64"),
        "edm_scalings sigma": (lambda: ops.edm_scalings(f(3, dtype=torch.float16)), "sigma must be float32 or float64, got torch.float16"),
        "loss weight device": (lambda: ops.weighted_mse_loss(f(2, 3), f(2, 3), torch.ones(2, device="meta")),
                               "weighted_mse_loss: weight must be on cpu like the images, got meta"),
        "noise_precondition eps": (lambda: ops.noise_precondition(f(2, 3), f(2, 3, dtype=torch.float64), torch.ones(2)),
                                   r"eps must match x0 \(2, 3\) torch.float32"),
        "loss target dtype": (lambda: ops.weighted_mse_loss(f(2, 3, dtype=torch.float64), f(2, 3), torch.ones(2, dtype=torch.float64)),
                              "target must have pred's dtype torch.float64"),
        "pseudo_huber c": (lambda: ops.pseudo_huber_loss(f(2, 3), f(2, 3), torch.ones(2), c=float("inf")), "c must be a finite number > 0, got inf"),
        "normalize_images channels": (lambda: ops.normalize_images(torch.zeros(2, 4, 4, 17, dtype=torch.uint8), "simple"),
                                      r"with 1 <= C <= 16, got \(2, 4, 4, 17\)"),
        "normalize_images flip": (lambda: ops.normalize_images(img, "simple", flip=torch.ones(2, dtype=torch.uint8)),
                                  "flip must be bool, got torch.uint8"),
        "normalize_images dtype": (lambda: ops.normalize_images(img, "simple", dtype=torch.int32),
                                   "dtype must be float32, float64, bfloat16 or float16, got torch.int32"),
        "unpatchify_hwc height": (lambda: ops.unpatchify_hwc(f(1, 6, 16), 2, height=8), r"height/2 dividing N = 6, got 8"),
        "info_nce dtypes": (lambda: ops.info_nce(f(2, 4), f(3, 4, dtype=torch.float64), 0.1), "q and k must share a dtype"),
    }  # fmt: skip


@pytest.mark.parametrize("case", sorted(_refused_calls()))
def test_inputs_an_op_would_mangle_are_refused_saying_what_to_pass(case):
    # Each went on to the kernel: a shape error from deep inside, a ZeroDivisionError, or a result.
    call, message = _refused_calls()[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_the_edge_sizes_each_op_takes():
    q = F.normalize(torch.randn(3, 8), dim=1)
    assert ops.info_nce(q, q, 0.1).shape == (3,)  # in-batch keys: M = B
    x = torch.randn(5)  # a single (D,) vector
    torch.testing.assert_close(ops.layer_norm(x, torch.ones(5), torch.zeros(5)), F.layer_norm(x, (5,)))
    u = torch.randint(0, 256, (2, 6, 6, 16), dtype=torch.uint8)  # the most channels, 1 byte each
    assert ops.normalize_images(u, "simple").shape == (2, 16, 6, 6)
    img = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8)
    assert torch.equal(ops.unpatchify_hwc(ops.patchify_hwc(img, 3), 3, 6), img)
    images = torch.rand(2, 3, 4, 4, requires_grad=True)  # a network output that still has a graph
    assert ops.to_uint8(images, "simple").dtype == torch.uint8
