"""The benchmark tooling: FLOP counts, the plain PyTorch path, report.py, and gpu_check.sh.

The benchmarks themselves live in benchmarks/ (``pytest benchmarks``); these tests check that what
they report is computed right and that the GPU check still runs end to end on a CPU-only machine.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from epg import ops
from epg.models import build, get_config

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common, flops, report  # noqa: E402


def _bench_ops():
    """benchmarks/bench_ops.py (its markers cpu / gpu / quick are registered in pyproject)."""
    return importlib.import_module("benchmarks.bench_ops")


# --- FLOP counts ----------------------------------------------------------------------------------


def test_forward_flops_of_epg_tiny_match_a_hand_count():
    # epg-tiny: 32 px, patch 4 → N = 64 patches, T = 66 tokens; C·p² = 48 features per patch;
    # encoder 2 blocks of width 64, decoder 2 blocks of width 96, MLP ratio 4, 2 long skips.
    N, T, K, D, Dd = 64, 66, 48, 64, 96
    patch = N * K * D  # 196,608
    enc_block = T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * 4 * D  # 3,801,600
    e2d = T * D * Dd  # 405,504
    skips = 2 * T * (Dd + D) * Dd  # 2,027,520
    adaln = 2 * D * 6 * Dd  # per sample, 73,728
    dec_block = T * Dd * 3 * Dd + 2 * T * T * Dd + T * Dd * Dd + 2 * T * Dd * 4 * Dd  # 8,135,424
    head = N * Dd * K  # 294,912
    macs = patch + 2 * enc_block + e2d + skips + adaln + 2 * dec_block + head
    assert macs == 26_872_320
    assert flops.forward_flops(get_config("epg-tiny")) == 2 * macs


def test_rcm_tiny_hand_count_includes_the_projection_head():
    # rcm-tiny: the encoder of epg-tiny, then Linear 64→128, 128→128, 128→32 on the cls feature.
    N, T, K, D = 64, 66, 48, 64
    enc_block = T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * 4 * D
    head = 64 * 128 + 128 * 128 + 128 * 32
    assert flops.forward_flops(get_config("rcm-tiny")) == 2 * (N * K * D + 2 * enc_block + head)


@pytest.mark.parametrize("name", ["epg-tiny", "rcm-tiny"])
def test_forward_flops_equal_torch_flop_counter(name):
    """The analytic count equals what torch counts on the real network (plain ops, SDPA's math
    path, so Q·Kᵀ and P·V are visible matmuls)."""
    cfg = get_config(name)
    net = build(name).eval()
    B = 3
    x = torch.randn(B, cfg.in_channels, cfg.img_size, cfg.img_size)
    t = torch.randn(B)
    counter = FlopCounterMode(display=False)
    with common.plain_pytorch_ops(), sdpa_kernel(SDPBackend.MATH), counter:
        if cfg.kind == "epg":
            net(x, t, torch.zeros(B, dtype=torch.long))
        else:
            net(x, t)
    assert counter.get_total_flops() == B * flops.forward_flops(cfg)


def test_train_step_flops_count_every_pass():
    epg, rcm = get_config("epg-l-16"), get_config("rcm-l-16")
    f, fp = flops.forward_flops(epg), flops.forward_flops(rcm)
    assert flops.train_step_flops("diffusion", epg) == 3 * f
    assert flops.train_step_flops("consistency", epg, rcm) == 4 * f + 3 * fp
    assert flops.train_step_flops("consistency", epg) == 4 * f
    assert flops.train_step_flops("pretrain", rcm) == 12 * fp
    # The design estimate: ≈ 250 GFLOP per forward of EPG-XL/16, ≈ 750 per training image.
    assert 250e9 < flops.forward_flops(get_config("epg-xl-16")) < 270e9
    with pytest.raises(ValueError, match="mode"):
        flops.train_step_flops("sampling", epg)


def test_op_counts_by_hand():
    dims = {"B": 2, "T": 5, "H": 3, "Dh": 4}
    fwd = flops.op_counts("attention", "fwd", dims, {"act": 2})
    assert fwd.flops == 2 * (2 * 2 * 3 * 5 * 5 * 4)  # Q·Kᵀ and P·V, 2 FLOPs per multiply-add
    assert fwd.bytes == (3 + 1) * 2 * 5 * 12 * 2  # read qkv, write out, bf16
    assert flops.op_counts("attention", "bwd", dims, {"act": 2}).flops == 2 * fwd.flops
    ln = flops.op_counts("layer_norm", "fwd", {"B": 2, "T": 5, "D": 8}, {"act": 2, "param": 4})
    assert ln == flops.Counts(bytes=2 * 10 * 8 * 2 + 2 * 8 * 4, flops=0)
    assert flops.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert flops.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert flops.peak_bf16_tflops("some other GPU") is None


# --- the plain PyTorch path and the op cases ------------------------------------------------------


@pytest.mark.parametrize("name", ops.OPS)
def test_plain_ops_have_the_public_signatures(name):
    public = inspect.signature(getattr(ops, name)).parameters
    plain = inspect.signature(common.PLAIN_OPS[name]).parameters
    assert [(p.name, p.default) for p in plain.values()] == [
        (p.name, p.default) for p in public.values()
    ]


def test_plain_path_swaps_the_ops_and_computes_the_same_network():
    net = build("epg-tiny").eval()
    x, t, y = torch.randn(2, 3, 32, 32), torch.randn(2), torch.tensor([1, 2])
    before = {name: getattr(ops, name) for name in ops.OPS}
    with torch.no_grad():
        fused = net(x, t, y)
        with common.plain_pytorch_ops():
            assert ops.layer_norm is common.PLAIN_OPS["layer_norm"]
            plain = net(x, t, y)
    assert {name: getattr(ops, name) for name in ops.OPS} == before
    torch.testing.assert_close(plain, fused)


def test_the_op_benchmarks_cover_every_op():
    assert set(_bench_ops().SHAPES) == set(ops.OPS)


@pytest.mark.parametrize("op", ops.OPS)
def test_every_op_case_runs_forward_and_backward_on_cpu(op):
    """The GPU cases' inputs at small sizes: the public op and the plain PyTorch provider agree
    in value and gradient, and the byte counts are positive."""
    bench_ops = _bench_ops()
    dims = bench_ops.dims_of(op, next(iter(bench_ops.SHAPES[op])), 2)
    dims.update(img=8, p=4, N=4, T=7)
    if op == "attention":
        dims.update(D=24, H=2, Dh=12)
    elif "D" in dims:
        dims["D"] = 24
    if "dim" in dims:
        dims["dim"] = 16
    args = bench_ops.make_inputs(op, dims, torch.device("cpu"), torch.float32)
    out, expected = getattr(ops, op)(*args), common.PLAIN_OPS[op](*args)
    outs = out if isinstance(out, tuple) else (out,)
    for a, b in zip(outs, expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(a, b)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    assert bool(inputs) == (op not in bench_ops.NOT_DIFFERENTIABLE)
    if inputs:  # the plain provider's autograd gives the op's gradients (stop-gradients included)
        seeds = [torch.randn_like(o) for o in outs]
        grads = torch.autograd.grad(outs, inputs, seeds)
        plain = expected if isinstance(expected, tuple) else (expected,)
        for g, g_plain in zip(grads, torch.autograd.grad(plain, inputs, seeds)):
            torch.testing.assert_close(g, g_plain)
    for mode in ("fwd",) if op in bench_ops.NOT_DIFFERENTIABLE else ("fwd", "bwd"):
        assert flops.op_counts(op, mode, dims, bench_ops.byte_sizes(torch.bfloat16)).bytes > 0


def test_the_quick_gpu_subset_times_attention_at_every_paper_head_dim():
    """gpu_check.sh's figures include attention at 258 tokens and head dims 64, 72, 120, 128
    against SDPA, each kernel pinned, forward and backward."""
    bench_ops = _bench_ops()
    quick = {}
    for case in bench_ops._cases():
        device, op, shape, batch, mode, provider = case.values
        if device == "cuda" and op == "attention" and any(m.name == "quick" for m in case.marks):
            dh = bench_ops.dims_of(op, shape, batch)["Dh"]
            quick.setdefault(dh, set()).add((mode, provider))
    assert set(quick) == {64, 72, 120, 128}
    for cases in quick.values():
        for mode in ("fwd", "bwd"):
            assert {(mode, p) for p in ("triton", "ref", "sdpa_flash", "sdpa_cudnn")} <= cases


@pytest.fixture(scope="module")
def quick_gpu_order():
    """The order pytest runs gpu_check.sh's GPU subset in (collected only; no GPU needed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-m", "quick and gpu", "--collect-only",
         "-q", "-p", "no:cacheprovider", "-o", "addopts="],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_the_op_figures_then_the_headline_steps_run_before_compiles(quick_gpu_order):
    """Under gpu_check.sh's time budget the cheap op cases (attention, the extension's ops) come
    first, then sampling and eager training steps (the README's headline figures, ~10 s each);
    the reference compiles, loaders and compiled training steps after them."""

    def first(pattern):
        return min(i for i, name in enumerate(quick_gpu_order) if pattern in name)

    def last(pattern):
        return max(i for i, name in enumerate(quick_gpu_order) if pattern in name)

    plain_ops = [i for i, name in enumerate(quick_gpu_order)
                 if "bench_ops.py" in name and "-ref_compiled]" not in name]  # fmt: skip
    assert max(plain_ops) < first("bench_sampling.py")
    assert last("bench_sampling.py") < first("bench_train.py")
    assert last("-eager_epg-") < first("-ref_compiled]")
    assert last("-ref_compiled]") < min(first("bench_loader.py"), first("bench_folder_loader.py"))
    assert last("bench_loader.py") < first("-compiled_epg-")


# --- report.py -----------------------------------------------------------------------------------


def _bench(params, extra, median, calls=1):
    """A pytest-benchmark entry: ``median`` seconds per call, ``calls`` calls per round."""
    return {"name": "x", "params": params, "extra_info": {**extra, "calls_per_round": calls},
            "stats": {"median": median * calls}}  # fmt: skip


def _results(tmp_path, name, env, benchmarks, not_run=()):
    path = tmp_path / name
    data = {"machine_info": {"epg": env}, "benchmarks": benchmarks, "epg_not_run": list(not_run)}
    path.write_text(json.dumps(data))
    return str(path)


CPU_ENV = {
    "date": "2026-11-30", "git_revision": "abc1234", "torch": "2.14.1", "triton": "3.8.0",
    "cuda": "13.0", "cpu": "Test CPU", "cpu_count": 2, "torch_threads": 2, "gpu": None,
    "calibration": {"cpu": {"copy_gbps": 10.0, "matmul_tflops": 0.1, "matmul_dtype": "float32"}},
}  # fmt: skip
GPU_ENV = {
    "date": "2026-12-01", "git_revision": "def5678", "torch": "2.11.0+cu130", "triton": "3.6.0",
    "cuda": "13.0", "cpu": "Host CPU", "cpu_count": 16, "torch_threads": 16, "gpu": "NVIDIA H200",
    "gpu_count": 1,
    "calibration": {"cuda": {"copy_gbps": 4000.0, "matmul_tflops": 800.0,
                             "matmul_dtype": "bfloat16"}},
}  # fmt: skip
TRAIN_GPU = {"device": "cuda", "mode": "diffusion", "model": "epg-xl-16", "path": "compiled_epg",
             "batch": 64}  # fmt: skip
NO_GPU = "no CUDA GPU on this machine: not measured on a GPU"  # benchmarks/conftest.py's reason


def test_report_turns_a_cpu_run_into_tables_and_lists_gpu_rows_as_not_measured(tmp_path):
    train = {"device": "cpu", "mode": "diffusion", "model": "epg-tiny", "path": "eager_ref",
             "batch": 16}  # fmt: skip
    op = {"device": "cpu", "op": "edm_scalings", "shape": "edm", "batch": 4096, "mode": "fwd",
          "provider": "cuda"}  # fmt: skip
    op_extra = {"kind": "op", **op, "bytes": 2_000_000, "flops": 0, "ran": {"fwd": "cuda"}}
    benchmarks = [
        _bench(train, {"kind": "train", **train, "flops_per_image": 2e9}, median=0.5),
        _bench(op, op_extra, median=1e-4, calls=50),
    ]
    not_run = [
        {"kind": "train", "params": TRAIN_GPU, "gpu": True, "reason": NO_GPU},
        {"kind": "op", "params": {**op, "device": "cuda", "op": "attention"}, "gpu": True,
         "reason": NO_GPU},
        {"kind": "op", "params": {**op, "provider": "triton"}, "gpu": False,
         "reason": "Triton runs on a CPU only in its interpreter"},
    ]  # fmt: skip
    path = _results(tmp_path, "cpu.json", CPU_ENV, benchmarks, not_run)
    md = tmp_path / "summary.md"
    assert report.main([path, "--markdown", str(md)]) == 0
    text = md.read_text()
    legend = ("| [1] | 2026-11-30 | CPU: Test CPU, 2 cores, 2 threads; no GPU | 2.14.1 | 3.8.0 | "
              "13.0 (no GPU) | abc1234 | CPU: copy 10.0 GB/s, float32 matmul 0.100 TFLOP/s |")
    assert legend in text
    # GPU section: the diffusion row exists only as "not measured on a GPU".
    gpu, cpu = text.split("**CPU figures")
    assert "| epg-xl-16 | diffusion | 64 | — | — | — | not measured on a GPU | — |" in gpu
    assert "- `attention`: 1 not measured on a GPU" in gpu
    # CPU: 16 images / 0.5 s = 32 images/s; 32 × 2 GFLOP = 64 GFLOP/s = 64% of 0.1 TFLOP/s.
    assert "| epg-tiny | diffusion | 16 | 32.0 (64% of fp32 matmul) | — | — | — | [1] |" in cpu
    # 2 MB in 100 µs = 20 GB/s = 200% of the 10 GB/s copy rate (a cached working set).
    assert ("| edm_scalings | edm | 4096 | fwd | cuda | 100 | 20.0 | 200% | — | — | — | — | [1] |"
            in cpu)  # no target on a CPU
    assert "1 not run: Triton runs on a CPU only in its interpreter" in cpu
    compact = report.render_compact(*report.load([path]))
    assert "train diffusion epg-tiny B16 PyTorch eager [cpu]" in compact
    assert "GPU cases skipped" in compact and "not measured on a GPU" in compact


def test_report_measured_gpu_row_wins_and_gives_mfu(tmp_path):
    not_run = [{"kind": "train", "params": TRAIN_GPU, "gpu": True, "reason": NO_GPU}]
    cpu = _results(tmp_path, "cpu.json", CPU_ENV, [], not_run)
    extra = {"kind": "train", **TRAIN_GPU, "flops_per_image": 787.7e9, "peak_bf16_tflops": 989.0,
             "peak_memory_gib": 61.25}  # fmt: skip
    gpu = _results(tmp_path, "gpu.json", GPU_ENV, [_bench(TRAIN_GPU, extra, median=0.2)], [])
    runs, measured, not_run = report.load([cpu, gpu])
    assert not_run == []
    (row,) = measured
    assert row["images_per_s"] == pytest.approx(320.0)
    assert row["mfu"] == pytest.approx(320.0 * 787.7e9 / 989e12)
    text = report.render_markdown(runs, measured, not_run)
    assert "| epg-xl-16 | diffusion | 64 | — | — | — | 320 (25% MFU, 61.2 GiB) | [2] |" in text
    assert "320 img/s, MFU 25%, peak 61.2 GiB" in report.render_compact(runs, measured, not_run)
    legend = ("| [2] | 2026-12-01 | NVIDIA H200 (CPU: Host CPU, 16 cores) | 2.11.0+cu130 | 3.6.0 "
              "| 13.0 |")
    assert legend in text
    assert "not measured on a GPU" not in text


def _op_bench(provider, median, op="attention", mode="fwd", device="cuda"):
    params = {"device": device, "op": op, "shape": "D1584-H22", "batch": 128, "mode": mode,
              "provider": provider}  # fmt: skip
    return _bench(params, {"kind": "op", **params, "bytes": 10**9, "flops": 0}, median, calls=10)


def test_report_gives_speedups_over_the_fastest_baseline_of_the_same_case(tmp_path):
    benchmarks = [
        # attention: against the fastest of SDPA (own choice or pinned) and flash-attn
        _op_bench("ref", 300e-6), _op_bench("sdpa_flash", 200e-6), _op_bench("sdpa_cudnn", 250e-6),
        _op_bench("triton", 100e-6), _op_bench("epg", 160e-6),
        _op_bench("triton", 500e-6, mode="bwd"),  # no baseline measured for the backward
        # other ops: against torch.compile of the reference, even where eager is faster
        _op_bench("ref", 50e-6, op="layer_norm"),
        _op_bench("ref_compiled", 120e-6, op="layer_norm"),
        _op_bench("triton", 100e-6, op="layer_norm"), _op_bench("cuda", 80e-6, op="layer_norm"),
    ]  # fmt: skip
    path = _results(tmp_path, "gpu.json", GPU_ENV, benchmarks, [])
    runs, measured, not_run = report.load([path])
    speedups = {(r["fields"]["op"], r["fields"]["mode"], r["fields"]["provider"]):
                (r.get("speedup"), r.get("baseline")) for r in measured}  # fmt: skip
    assert speedups[("attention", "fwd", "triton")] == (pytest.approx(2.0), "sdpa_flash")
    assert speedups[("attention", "fwd", "epg")] == (pytest.approx(1.25), "sdpa_flash")
    assert speedups[("attention", "fwd", "sdpa_cudnn")] == (None, None)
    assert speedups[("attention", "bwd", "triton")] == (None, None)
    assert speedups[("layer_norm", "fwd", "triton")] == (pytest.approx(1.2), "ref_compiled")
    assert speedups[("layer_norm", "fwd", "cuda")] == (pytest.approx(1.5), "ref_compiled")
    text = report.render_markdown(runs, measured, not_run)
    assert ("| attention | D1584-H22 | 128 | fwd | triton | 100 | 10,000 | 250% | — | — | "
            "2.00× vs sdpa_flash | met (≥1.3× SDPA/flash-attn) | [1] |") in text
    compact = report.render_compact(runs, measured, not_run)
    assert "op attention D1584-H22 B128 fwd triton [cuda]" in compact
    assert "2.00× vs sdpa_flash (200 µs)" in compact
    assert "fwd sdpa_flash [cuda]" not in compact  # in the speed-ups; all rows in summary.md
    assert "op attention D1584-H22 B128 bwd triton [cuda]" in compact
    assert json.loads(json.dumps(report.summary(runs, measured, not_run), default=str))


def test_report_judges_epg_kernels_against_the_issue_targets(tmp_path):
    """Triton attention ≥1.3× the fastest SDPA/flash-attn; memory-bound Triton kernels ≥85% of
    the copy bandwidth and ≥1.1× torch.compile; CUDA kernels ≥85% of copy. GPU_ENV's copy
    bandwidth is 4000 GB/s and _op_bench moves 1 GB: 294 µs is 85%."""

    def op(provider, median, op="layer_norm", mode="fwd", ran=None, flops=0, device="cuda"):
        bench = _op_bench(provider, median, op=op, mode=mode, device=device)
        bench["extra_info"].update(ran=ran, flops=flops)
        return bench

    benchmarks = [
        _op_bench("sdpa_flash", 200e-6),
        op("triton", 150e-6, op="attention"),  # 1.33×: met
        op("epg", 120e-6, op="attention", ran={"fwd": "triton"}),  # automatic choice: no target
        op("sdpa_flash", 200e-6, op="attention", mode="bwd"),
        op("triton", 500e-6, op="attention", mode="bwd"),  # 0.4×: missed
        op("ref_compiled", 200e-6),
        op("triton", 170e-6),  # 147% of copy, 1.18× compile: met
        op("triton", 190e-6, mode="bwd"),  # 1.05× compile: missed
        op("ref_compiled", 200e-6, mode="bwd"),
        op("triton", 100e-6, op="gated_residual"),  # no compiled baseline measured: not judged
        op("cuda", 290e-6, op="edm_scalings"),  # 86% of copy: met
        op("cuda", 300e-6, op="noise_precondition"),  # 83%: missed
        op("cuda", 100e-6, op="noise_precondition", mode="bwd", ran={"bwd": "reference"}),
        op("triton", 100e-6, op="patch_embed", flops=10**12),  # matmul-bound: no target
        op("cuda", 1e-3, op="patchify_hwc", device="cpu"),  # CPU: no target
    ]  # fmt: skip
    path = _results(tmp_path, "gpu.json", GPU_ENV, benchmarks, [])
    runs, measured, not_run = report.load([path])
    attention = "≥1.3× SDPA/flash-attn"
    triton, cuda = "≥85% of copy, ≥1.1× compile", "≥85% of copy"
    expected = [None, (attention, True), None, None, (attention, False), None, (triton, True),
                (triton, False), None, (triton, None), (cuda, True), (cuda, False), None, None,
                None]  # fmt: skip
    assert [r["target"] for r in measured] == expected  # in the order of `benchmarks`
    counts = {"met": 3, "missed": 3, "not judged": 1}
    assert report.target_counts(measured) == counts
    text = report.render_markdown(runs, measured, not_run)
    assert "flash-attn; memory-bound Triton kernels ≥85% of copy" in text
    assert "CUDA kernels ≥85% of copy): 3 met, 3 missed, 1 not judged" in text
    assert "| 1.05× vs ref_compiled | missed (≥85% of copy, ≥1.1× compile) | [1] |" in text
    assert ("| gated_residual | D1584-H22 | 128 | fwd | triton | 100 | 10,000 | 250% | — | — | — | "
            "not judged (≥85% of copy, ≥1.1× compile) | [1] |") in text
    assert "| 0.40× vs sdpa_flash | missed (≥1.3× SDPA/flash-attn) | [1] |" in text
    compact = report.render_compact(runs, measured, not_run)
    assert "3 met, 3 missed, 1 not judged (rules in summary.md)" in compact
    assert "83% of copy), target missed" in compact
    summary = json.loads(json.dumps(report.summary(runs, measured, not_run), default=str))
    assert summary["targets"] == counts
    # Without the run's copy bandwidth a memory-bound kernel cannot be judged.
    no_copy = {**GPU_ENV, "calibration": {}}
    path = _results(tmp_path, "nocopy.json", no_copy, [op("cuda", 290e-6, op="edm_scalings")])
    (row,) = report.load([path])[1]
    assert row["target"] == (cuda, None)


def run_bench_ops(out, marks, select, **env):
    """``pytest benchmarks/bench_ops.py -m marks -k select --benchmark-json=out`` with no GPU
    visible; the finished process, checked to have passed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **env}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_ops.py", "-m", marks, "-k", select,
         "-q", "-p", "no:cacheprovider", "-o", "addopts=", f"--benchmark-json={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_a_benchmark_run_with_nothing_measured_still_writes_its_json(tmp_path):
    """pytest-benchmark writes no JSON when no case ran; the not-run list and reasons must still
    reach the report (gpu_check.sh would otherwise say only "no benchmark ran?")."""
    out = tmp_path / "out.json"
    proc = run_bench_ops(out, "gpu", "cuda-edm_scalings and fwd")
    assert "no benchmark case was measured" in proc.stdout
    data = json.loads(out.read_text())
    assert data["benchmarks"] == [] and data["machine_info"]["epg"]["gpu"] is None
    assert data["epg_not_run"] and all(e["reason"] == NO_GPU for e in data["epg_not_run"])
    runs, measured, not_run = report.load([str(out)])
    assert len(runs) == 1 and not measured and len(not_run) == len(data["epg_not_run"])
    assert "`edm_scalings`: " in report.render_markdown(runs, measured, not_run)


def test_report_leaves_out_an_unreadable_results_file_and_still_reports(tmp_path, capsys):
    good = _results(tmp_path, "gpu.json", GPU_ENV, [_op_bench("triton", 1e-4)], [])
    cut = tmp_path / "cut.json"
    cut.write_text(Path(good).read_text()[:200])  # a file written only in part
    steps = tmp_path / "steps.tsv"
    steps.write_text("build CUDA extension\tok\tin 90s\n")
    md = tmp_path / "summary.md"
    assert report.main([str(cut), good, "--steps", str(steps), "--markdown", str(md),
                        "--compact"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert "cut.json cannot be read" in err
    assert "build CUDA extension" in out and "op attention D1584-H22 B128 fwd triton" in out
    assert "| [1] | 2026-12-01 | NVIDIA H200" in md.read_text()


# --- gpu_check.sh and timing ----------------------------------------------------------------------

INTERRUPTED_BENCH = """
import os, signal

import torch

from benchmarks import common


def test_measured(benchmark):
    common.time_rounds(benchmark, lambda: None, torch.device("cpu"), rounds=3)


def test_interrupted(benchmark):
    calls = []

    def fn():  # gpu_check.sh's time limit (SIGINT) arrives in the first warm-up round
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    common.time_rounds(benchmark, fn, torch.device("cpu"), rounds=3, warmup_rounds=2)
"""


def test_a_benchmark_stopped_at_the_time_limit_leaves_the_others_in_the_json(tmp_path):
    (tmp_path / "test_interrupted_bench.py").write_text(INTERRUPTED_BENCH)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         "--benchmark-json=out.json", "test_interrupted_bench.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]  # interrupted
    assert (tmp_path / "out.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    assert [b["name"] for b in results["benchmarks"]] == ["test_measured"]
    assert results["benchmarks"][0]["extra_info"]["calls_per_round"] == 1


def test_gpu_check_writes_at_most_eight_files():
    """The lent GPU machine sends back at most 8 files from $OUT; gpu_check.sh writes no more."""
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    names = set(re.findall(r"\$OUT_DIR/([A-Za-z0-9_.-]+)", script))
    assert {"benchmarks.json", "summary.md", "summary.json", "steps.tsv"} <= names
    assert len(names) <= 8, sorted(names)



@pytest.mark.slow
def test_gpu_check_runs_to_the_end_without_a_gpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "EPG_CHECK_CPU_ONLY": "1", "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    script = REPO / "benchmarks" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (out / "steps.tsv").read_text().splitlines()
    steps = {name: rest for name, *rest in (line.split("\t") for line in lines)}
    assert steps["build CUDA extension"][0] == "skipped"
    assert "no GPU" in steps["build CUDA extension"][1]
    assert steps["GPU tests (cuda, triton)"] == ["skipped", "no GPU"]
    assert steps["benchmarks (quick)"][0] == "ok"
    results = json.loads((out / "benchmarks.json").read_text())
    assert results["machine_info"]["epg"]["gpu"] is None
    assert {b["extra_info"]["device"] for b in results["benchmarks"]} == {"cpu"}
    assert any(e["gpu"] and "not measured on a GPU" in e["reason"] for e in results["epg_not_run"])
    summary = (out / "summary.md").read_text()
    assert "not measured on a GPU" in summary and "CPU figures" in summary
    assert json.loads((out / "summary.json").read_text())["measured"]
    # The compact table comes last, ending with the steps and the run (kept by a cut log).
    tail = proc.stdout.strip().splitlines()
    assert tail[-1].startswith("run [1] ") and "no GPU" in tail[-1]
    assert tail[-2].startswith("benchmarks (quick)") and "GPU cases skipped" in "\n".join(tail[-8:])
