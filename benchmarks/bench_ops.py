"""Per-op microbenchmarks: every ``epg.ops`` op, forward and backward, each provider.

Providers:
  ref             the reference math called directly with the public signature
                  (``common.PLAIN_OPS``), eager; backward = autograd through it
  ref_compiled    the same under ``torch.compile(dynamic=False)``, compiled afresh per case
  epg             ``epg.ops.<op>`` with the automatic backend choice (what the networks run)
  triton, cuda    ``epg.ops.<op>`` with that backend forced (skipped where it has no kernel);
  sdpa, flash_attn  likewise for attention, when the op layer has these backends
  sdpa_flash, sdpa_cudnn, sdpa_efficient
                  attention only: the reference attention with PyTorch SDPA pinned to one kernel,
                  called directly (no epg op in between)
  flash_attn_lib  attention only: ``flash_attn_qkvpacked_func`` called directly, when installed

GPU shapes: the paper configs at 256 px: 258 tokens (256 patches + 2), per-GPU batch 32, 128 and
256, encoder widths 768/1024, decoder widths 1024/1584/1920/2688, attention head dims 64 (B, L),
72 (XL), 120 (XXL), 128 (G); 256×256 RGB images for the image-sized ops. Dtypes as a bf16
training step has them: activations, weights and network outputs bf16; LayerNorm affine
parameters, data images, noise and per-sample values float32 (see ``make_inputs``). The CPU cases
(``-m cpu``) time the extension's C++ ops (backend ``cuda`` on CPU tensors) against the reference
in float32.

Forward rows time the op with gradients enabled (as in training); backward rows time
``torch.autograd.grad`` of its outputs with respect to the inputs marked as requiring grad.
Every row records bytes moved and FLOPs (``flops.op_counts``) and which backend ran. Where no
GPU was available the GPU rows have not run: ``report.py`` lists them as not measured on a GPU.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from epg import _backend, ops

from . import common, flops

KIND = "op"
SEQ = 258  # tokens: 256 patches at 256 px / 16 + cls + time
IMG, PATCH, CHANNELS = 256, 16, 3
GPU_BATCHES = (32, 128, 256)
QUICK_BATCH = 128

_DEC = (1584, 1024, 1920, 2688)  # decoder widths, XL first (the quick case)
_IMAGE = {"img256": {}}
# Shape cases per op: id -> dims besides B. The first id of each op is its quick case, except
# for attention: every head dim of QUICK_SHAPES.
SHAPES: dict[str, dict[str, dict[str, int]]] = {
    "layer_norm": {f"D{d}": {"D": d} for d in (*_DEC, 768)},
    "ln_modulate": {f"D{d}": {"D": d} for d in _DEC},
    "gated_residual": {f"D{d}": {"D": d} for d in _DEC},
    "attention": {
        f"D{d}-H{h}": {"D": d, "H": h}
        for d, h in ((1584, 22), (768, 12), (1024, 16), (1920, 16), (2688, 21))
    },
    "patch_embed": {f"D{d}": {"D": d} for d in (768, 1024)},
    "output_head": {f"D{d}": {"D": d} for d in _DEC},
    "timestep_embedding": {f"dim{d}": {"dim": d} for d in (768, 1024)},
    "edm_scalings": {"edm": {}},
    "noise_precondition": _IMAGE,
    "weighted_mse_loss": _IMAGE,
    "pseudo_huber_loss": _IMAGE,
    # stage 1: per-GPU queries against the keys of a global batch of 1024 (projector width 768)
    "info_nce": {"D768-M1024": {"D": 768, "M": 1024}},
    "normalize_images": _IMAGE,
    "to_uint8": _IMAGE,
    "patchify_hwc": _IMAGE,
    "unpatchify_hwc": _IMAGE,
}
NOT_DIFFERENTIABLE = ("normalize_images", "to_uint8")  # uint8 in or out
# The op whose backend runs each op's backward: <op>_backward, except the patch layout pair,
# each the other's gradient.
BACKWARD_OP = {"patchify_hwc": "unpatchify_hwc", "unpatchify_hwc": "patchify_hwc"}
# CPU: the ops the extension has C++ kernels for; per-sample ops at large batches.
CPU_BATCHES = {"edm_scalings": (4096, 1 << 20)}
CPU_IMAGE_BATCHES = (16,)

ATTENTION_ONLY_BACKENDS = ("sdpa", "flash_attn")
EPG_BACKENDS = tuple(b for b in _backend.BACKENDS if b != "reference")
SDPA_PINNED = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
               "sdpa_efficient": "EFFICIENT_ATTENTION"}  # fmt: skip
# Attention's quick cases: head dims 72 (XL), 64 (B, L), 120 (XXL) and 128 (G) at 258 tokens.
QUICK_SHAPES = {"attention": ("D1584-H22", "D768-H12", "D1920-H16", "D2688-H21")}
# Ops whose compiled reference is in the quick subset: the memory-bound ones where the
# compiler's fusion is the alternative to epg's kernels.
QUICK_COMPILED = ("layer_norm", "ln_modulate", "gated_residual")


def providers(op: str, device: str) -> tuple[str, ...]:
    backends = tuple(
        b for b in EPG_BACKENDS if op == "attention" or b not in ATTENTION_ONLY_BACKENDS
    )
    if device == "cpu":  # the extension's C++ ops against the reference; no compiling
        return ("ref", "epg", *backends)
    names = ("ref", "ref_compiled", "epg", *backends)
    if op == "attention":
        names += (*SDPA_PINNED, "flash_attn_lib")
    return names


def _cpu_ops() -> tuple[str, ...]:
    return ("edm_scalings", "noise_precondition", "weighted_mse_loss", "pseudo_huber_loss",
            "normalize_images", "to_uint8", "patchify_hwc", "unpatchify_hwc")  # fmt: skip


def _is_quick(device: str, op: str, shape: str, batch: int, provider: str) -> bool:
    if device == "cpu":
        return op == "edm_scalings" and batch == 4096 and provider in ("ref", "cuda")
    if shape not in QUICK_SHAPES.get(op, (next(iter(SHAPES[op])),)) or batch != QUICK_BATCH:
        return False
    return provider != "ref_compiled" or op in QUICK_COMPILED


def _cases():
    plan = [("cuda", op, GPU_BATCHES, pytest.mark.gpu) for op in SHAPES]
    plan += [
        ("cpu", op, CPU_BATCHES.get(op, CPU_IMAGE_BATCHES), pytest.mark.cpu) for op in _cpu_ops()
    ]
    for device, op, batches, mark in plan:
        modes = ("fwd",) if op in NOT_DIFFERENTIABLE else ("fwd", "bwd")
        for shape in SHAPES[op]:
            for batch in batches:
                for mode in modes:
                    for provider in providers(op, device):
                        marks = [mark]
                        if _is_quick(device, op, shape, batch, provider):
                            marks.append(pytest.mark.quick)
                        yield pytest.param(
                            device, op, shape, batch, mode, provider, marks=marks,
                            id=f"{device}-{op}-{shape}-B{batch}-{mode}-{provider}",
                        )  # fmt: skip


def dims_of(op: str, shape: str, batch: int) -> dict[str, int]:
    dims = {"B": batch, "T": SEQ, "C": CHANNELS, "img": IMG, "p": PATCH, **SHAPES[op][shape]}
    if op == "attention":
        dims["Dh"] = dims["D"] // dims["H"]
    dims["N"] = (dims["img"] // dims["p"]) ** 2
    return dims


def make_inputs(op: str, dims: dict[str, int], device: torch.device, act: torch.dtype) -> list:
    """Public arguments of ``epg.ops.<op>`` for a case. ``act`` is the dtype of activations,
    weights and network outputs (bf16 on a GPU); LayerNorm affine parameters, data images,
    noise and per-sample values are float32, as in a training step. Floating inputs require
    grad where the op's backward is benchmarked (the data image of patch_embed does not)."""
    f32 = torch.float32

    def rand(*shape, dtype=act, grad=True, scale=1.0):
        t = (torch.randn(shape, device=device, dtype=f32) * scale).to(dtype)
        return t.requires_grad_(grad and op not in NOT_DIFFERENTIABLE)

    def sigma(n):  # shifted σ for ln σ ~ N(−0.4, 1.6), as the consistency recipe draws
        return ((torch.randn(n, device=device) * 1.6 - 0.4).exp() * 4.0).requires_grad_(True)

    B, T, C, side, p, N = (dims[k] for k in ("B", "T", "C", "img", "p", "N"))
    D = dims.get("D")
    if op == "layer_norm":
        return [rand(B, T, D), rand(D, dtype=f32), rand(D, dtype=f32), 1e-6]
    if op == "ln_modulate":
        return [rand(B, T, D), rand(D, dtype=f32), rand(D, dtype=f32),
                rand(B, D, scale=0.1), rand(B, D, scale=0.1), 1e-6]  # fmt: skip
    if op == "gated_residual":
        return [rand(B, T, D), rand(B, D, scale=0.1), rand(B, T, D)]
    if op == "attention":
        return [rand(B, T, 3 * D), dims["H"]]
    if op == "patch_embed":  # as the op layer hands them on under autocast: a float32 table
        return [rand(B, C, side, side, grad=False), rand(D, C, p, p, scale=0.02), rand(D),
                rand(N, D, dtype=f32, scale=0.02)]  # fmt: skip
    if op == "output_head":
        k = C * p * p
        # fp32 weights, as training gives them (the op layer passes them on uncast)
        return [rand(B, N, D), rand(D, dtype=f32), rand(D, dtype=f32),
                rand(k, D, dtype=f32, scale=0.02), rand(k, dtype=f32), p, 1e-6]  # fmt: skip
    if op == "timestep_embedding":
        return [rand(B, dtype=f32, scale=400.0), dims["dim"]]  # t = 250·ln σ
    if op == "edm_scalings":
        return [sigma(B), 0.5, 0.008, "edm"]
    if op == "noise_precondition":
        return [rand(B, C, side, side, dtype=f32), rand(B, C, side, side, dtype=f32), sigma(B),
                0.5, 0.008, "edm"]  # fmt: skip
    if op == "weighted_mse_loss":  # x̂0 of the network (bf16) against the data x0 (float32)
        return [rand(B, C, side, side), rand(B, C, side, side, dtype=f32, grad=False),
                rand(B, dtype=f32, grad=False).abs()]  # fmt: skip
    if op == "pseudo_huber_loss":  # D_θ(x_t) against the no-grad target D(x_r), both float32
        return [rand(B, C, side, side, dtype=f32), rand(B, C, side, side, dtype=f32, grad=False),
                rand(B, dtype=f32, grad=False).abs(), 0.06]  # fmt: skip
    if op == "info_nce":  # L2-normalised projector outputs; the keys carry no gradient
        q = torch.nn.functional.normalize(torch.randn(B, D, device=device), dim=1)
        k = torch.nn.functional.normalize(torch.randn(dims["M"], D, device=device), dim=1)
        return [q.to(act).requires_grad_(True), k.to(act), 0.2]
    if op == "normalize_images":  # a decoded uint8 NHWC batch with random flips
        images = torch.randint(0, 256, (B, side, side, C), device=device, dtype=torch.uint8)
        return [images, "imagenet", torch.rand(B, device=device) < 0.5, f32]
    if op == "to_uint8":
        return [rand(B, C, side, side, dtype=f32).clamp(-1, 1), "simple"]
    if op == "patchify_hwc":
        return [rand(B, C, side, side), p]
    if op == "unpatchify_hwc":
        return [rand(B, N, p * p * C), p]
    raise ValueError(f"no benchmark inputs for op {op!r}")


def byte_sizes(act: torch.dtype) -> dict[str, int]:
    a = torch.empty((), dtype=act).element_size()
    # "weight": output_head's, float32 in training (see make_inputs)
    return {"act": a, "param": 4, "weight": 4, "mod": a, "f32": 4, "data": 4}


def _provider_fn(op: str, provider: str, device: torch.device):
    """(callable, context-manager factory or None) for a provider; skips when it cannot run."""
    if provider == "ref":
        return common.PLAIN_OPS[op], None
    if provider == "ref_compiled":
        common.release_memory()  # a fresh cache: no recompile limit, no dynamic shapes carried over
        return torch.compile(common.PLAIN_OPS[op], dynamic=False), None
    if provider == "epg" or provider in EPG_BACKENDS:
        if provider == "triton" and device.type != "cuda":
            pytest.skip("Triton runs on a CPU only in its interpreter (TRITON_INTERPRET=1), "
                        "far too slow to benchmark")  # fmt: skip
        forced = None if provider == "epg" else provider
        with common.forced_backend(forced, op):
            try:
                _backend.choose(op, device)
            except ops.BackendUnavailableError as exc:
                pytest.skip(str(exc))
        return getattr(ops, op), lambda: common.forced_backend(forced, op)
    if provider in SDPA_PINNED:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_PINNED[provider], None)
        if backend is None:
            pytest.skip(f"this torch has no SDPA kernel {SDPA_PINNED[provider]}")
        return common.PLAIN_OPS["attention"], lambda: sdpa_kernel([backend])
    if provider == "flash_attn_lib":
        try:
            from flash_attn import flash_attn_qkvpacked_func
        except ImportError as exc:
            pytest.skip(f"flash-attn is not installed ({exc})")

        def flash(qkv, num_heads):
            B, T, three_d = qkv.shape
            packed = qkv.view(B, T, 3, num_heads, three_d // (3 * num_heads))
            return flash_attn_qkvpacked_func(packed).reshape(B, T, three_d // 3)

        return flash, None
    raise ValueError(f"unknown provider {provider!r}")


@pytest.mark.parametrize("device,op,shape,batch,mode,provider", list(_cases()))
def test_op(benchmark, device, op, shape, batch, mode, provider):
    gpu = device == "cuda"
    common.require_time(30.0 if provider == "ref_compiled" else 5.0)
    dev = common.cuda_device() if gpu else torch.device("cpu")
    act = torch.bfloat16 if gpu else torch.float32  # as autocast training gives the ops
    dims = dims_of(op, shape, batch)
    fn, context = _provider_fn(op, provider, dev)
    args = make_inputs(op, dims, dev, act)
    grad_inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    with context() if context else contextlib.nullcontext():
        try:
            if mode == "fwd":
                call = functools.partial(fn, *args)
            else:
                out = fn(*args)
                outs = out if isinstance(out, tuple) else (out,)
                grads = [torch.randn_like(o) for o in outs]
                call = functools.partial(torch.autograd.grad, outs, grad_inputs, grads,
                                         retain_graph=True)  # fmt: skip
            call()
        except RuntimeError as exc:  # an SDPA kernel or library that does not take this case
            if provider in SDPA_PINNED or provider == "flash_attn_lib":
                pytest.skip(f"{provider} cannot run this case: {str(exc).splitlines()[0]}")
            raise

        ran = None
        if provider == "epg" or provider in EPG_BACKENDS:
            ran = {"fwd": _backend.choose(op, dev)}
            if mode == "bwd":
                ran["bwd"] = _backend.choose(BACKWARD_OP.get(op, f"{op}_backward"), dev)
        counts = flops.op_counts(op, mode, dims, byte_sizes(act))
        benchmark.group = f"{device} {op} {shape} B{batch} {mode}"
        benchmark.extra_info.update(
            kind=KIND, device=device, device_name=torch.cuda.get_device_name(dev) if gpu else "cpu",
            op=op, shape=shape, batch=batch, mode=mode, provider=provider, dims=dims,
            dtype=str(act).removeprefix("torch."), bytes=counts.bytes, flops=counts.flops, ran=ran,
        )  # fmt: skip
        rounds = common.rounds(20, 7) if gpu else common.rounds(10, 5)
        common.time_rounds(benchmark, call, dev, rounds=rounds, warmup_rounds=2,
                           target_round_s=0.005 if gpu else 0.02)  # fmt: skip
