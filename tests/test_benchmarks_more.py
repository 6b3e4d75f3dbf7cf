"""More checks of the benchmark tooling: report.py's figures and tables, flops.py's counts,
common.py's helpers, conftest.py's hooks and gpu_check.sh's CPU-side logic.

A GPU is lent rarely and for minutes: what report.py says about a run (bandwidth fractions,
speed-ups against the right baseline, which cases still await a GPU) must be right the first time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common, flops, report  # noqa: E402
from test_benchmarks import CPU_ENV, GPU_ENV, NO_GPU, _bench, _results, run_bench_ops  # noqa: E402

def _op_params(provider, op="attention", mode="fwd", device="cuda"):
    return {"device": device, "op": op, "shape": "D1584-H22", "batch": 128, "mode": mode,
            "provider": provider}  # fmt: skip


def _op_bench(provider, median, op="attention", mode="fwd", device="cuda", nbytes=10**9):
    params = _op_params(provider, op, mode, device)
    return _bench(params, {"kind": "op", **params, "bytes": nbytes, "flops": 0}, median, calls=10)


def _speedups(measured):
    return {(r["fields"]["op"], r["fields"]["mode"], r["fields"]["provider"], r["run"].index):
            (r.get("speedup"), r.get("baseline")) for r in measured}  # fmt: skip


# --- report.py: numbers -----------------------------------------------------------------------


def test_fmt_and_pct_give_three_significant_digits_and_switch_at_ten_percent():
    """The tables' figures: 3 significant digits everywhere; a fraction under 10% keeps one
    decimal (8.5% of copy is not 9%), 10% and above are whole percents."""
    assert report.fmt(1) == "1.00", report.fmt(1)
    assert report.fmt(1.0) == "1.00"
    assert report.fmt(0) == "0"
    assert report.fmt(0.5) == "0.500"
    assert report.fmt(12345.6) == "12,346"
    assert report.fmt(None) == "—" and report.fmt(float("nan")) == "—"
    assert report.pct(0.1) == "10%", report.pct(0.1)
    assert report.pct(0.05) == "5.0%", report.pct(0.05)
    assert report.pct(0.0123) == "1.2%"
    assert report.pct(0.85) == "85%"
    assert report.pct(None) == "—"


# --- report.py: derived figures ---------------------------------------------------------------


def test_train_row_without_a_known_peak_has_no_mfu(tmp_path):
    """A GPU that is not in flops.PEAK_BF16_TFLOPS records no peak: the report must say the peak
    is unknown rather than quote MFU against some other GPU's peak."""
    params = {"device": "cuda", "mode": "diffusion", "model": "epg-xl-16", "path": "eager_epg",
              "batch": 64}  # fmt: skip
    extra = {"kind": "train", **params, "flops_per_image": 1e12, "peak_bf16_tflops": None}
    path = _results(tmp_path, "gpu.json", GPU_ENV, [_bench(params, extra, median=0.5)])
    runs, measured, not_run = report.load([path])
    (row,) = measured
    assert row["mfu"] is None, row["mfu"]
    assert row["matmul_fraction"] == pytest.approx(128 * 1e12 / 1e12 / 800.0)
    text = report.render_markdown(runs, measured, not_run)
    assert "128 (peak unknown)" in text, text


def test_a_not_run_entry_with_its_params_in_another_order_is_still_dropped(tmp_path):
    """A case measured in one run and skipped in another is the same case whatever the order of
    its parameters in the JSON: the measured figure wins and no 'not measured' row remains."""
    params = {"device": "cuda", "mode": "diffusion", "model": "epg-xl-16", "path": "eager_epg",
              "batch": 64}  # fmt: skip
    reordered = dict(reversed(list(params.items())))
    assert list(reordered) != list(params)
    extra = {"kind": "train", **params, "flops_per_image": 1e12, "peak_bf16_tflops": 989.0}
    cpu = _results(tmp_path, "cpu.json", CPU_ENV, [],
                   [{"kind": "train", "params": reordered, "gpu": True, "reason": NO_GPU}])
    gpu = _results(tmp_path, "gpu.json", GPU_ENV, [_bench(params, extra, median=0.5)])
    _, measured, not_run = report.load([cpu, gpu])
    assert len(measured) == 1
    assert not_run == [], not_run


def test_speedups_compare_only_rows_of_the_same_run(tmp_path):
    """Each run has its own GPU, clocks and versions: a baseline measured in one run must not
    give a speed-up to an epg row of another run."""
    first = _results(tmp_path, "a.json", GPU_ENV, [_op_bench("sdpa_flash", 200e-6)])
    second = _results(tmp_path, "b.json", GPU_ENV, [_op_bench("triton", 100e-6)])
    _, measured, _ = report.load([first, second])
    assert _speedups(measured)[("attention", "fwd", "triton", 2)] == (None, None)


@pytest.mark.parametrize("baseline", ["sdpa_efficient", "flash_attn", "flash_attn_lib", "sdpa"])
def test_every_attention_baseline_counts_for_the_speedup(tmp_path, baseline):
    """The attention target is against the best of SDPA (each kernel) and flash-attn (both of
    its entries): a faster flash-attn must lower epg's speed-up."""
    benchmarks = [_op_bench("sdpa_flash", 200e-6), _op_bench(baseline, 150e-6),
                  _op_bench("triton", 100e-6)]  # fmt: skip
    _, measured, _ = report.load([_results(tmp_path, "gpu.json", GPU_ENV, benchmarks)])
    speedup, base = _speedups(measured)[("attention", "fwd", "triton", 1)]
    assert base == baseline, base
    assert speedup == pytest.approx(1.5)


def test_compiled_reference_is_not_an_attention_baseline_nor_sdpa_one_for_other_ops(tmp_path):
    """Attention is judged against SDPA / flash-attn, the other ops against torch.compile of the
    reference: a row of the other family does not count."""
    benchmarks = [_op_bench("ref_compiled", 50e-6), _op_bench("ref", 200e-6),
                  _op_bench("triton", 100e-6),
                  _op_bench("ref", 10e-6, op="layer_norm"),
                  _op_bench("ref_compiled", 40e-6, op="layer_norm"),
                  _op_bench("cuda", 20e-6, op="layer_norm")]  # fmt: skip
    _, measured, _ = report.load([_results(tmp_path, "gpu.json", GPU_ENV, benchmarks)])
    s = _speedups(measured)
    assert s[("attention", "fwd", "triton", 1)] == (pytest.approx(2.0), "ref")
    assert s[("layer_norm", "fwd", "cuda", 1)] == (pytest.approx(2.0), "ref_compiled")


# --- report.py: not-run entries ---------------------------------------------------------------


def _entry(run_env, reason, gpu=True, index=1):
    run = report.Run(index, "x.json", {"machine_info": {"epg": run_env}})
    return {"run": run, "reason": reason, "gpu": gpu}


def test_not_run_text_of_gpu_cases():
    """A GPU case is 'not measured on a GPU' when its run had no GPU, whatever reason pytest gave
    (a time budget on a CPU machine is no GPU figure either), or when the reason is the no-GPU
    skip; a GPU run's other reasons are shown as they are."""
    assert report.not_run_text(_entry(CPU_ENV, "time budget: 3 s left")) == report.NOT_ON_GPU
    assert report.not_run_text(_entry(GPU_ENV, NO_GPU)) == report.NOT_ON_GPU
    assert report.not_run_text(_entry(GPU_ENV, "time budget: 3 s left")) == (
        "not run: time budget: 3 s left")
    assert report.not_run_text(_entry(CPU_ENV, "no kernel", gpu=False)) == "not run: no kernel"


def test_a_gpu_runs_reason_wins_over_a_cpu_runs_no_gpu_entry(tmp_path):
    """The same case skipped in a CPU run and in a GPU run: the GPU run's reason (why it really
    did not run) is the one kept, whatever the order of the files."""
    params = {"device": "cuda", "mode": "diffusion", "model": "epg-xl-16", "path": "eager_epg",
              "batch": 64}  # fmt: skip
    cpu = _results(tmp_path, "cpu.json", CPU_ENV, [],
                   [{"kind": "train", "params": params, "gpu": True, "reason": NO_GPU}])
    gpu = _results(tmp_path, "gpu.json", GPU_ENV, [],
                   [{"kind": "train", "params": params, "gpu": True,
                     "reason": "time budget: 4 s left"}])  # fmt: skip
    _, _, not_run = report.load([cpu, gpu])
    assert [report.not_run_text(e) for e in not_run] == ["not run: time budget: 4 s left"]


def test_not_run_entries_without_a_kind_are_left_out(tmp_path):
    """conftest.py records kind None for a skipped test outside the suites' modules: it has no
    table, and must not reach the report."""
    path = _results(tmp_path, "cpu.json", CPU_ENV, [],
                    [{"kind": None, "params": {}, "gpu": False, "reason": "whatever"}])
    _, _, not_run = report.load([path])
    assert not_run == []


def test_a_results_file_that_is_not_an_object_is_left_out(tmp_path, capsys):
    """A JSON file of another shape (a list) is said and left out; the other runs still report."""
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    good = _results(tmp_path, "gpu.json", GPU_ENV, [_op_bench("triton", 1e-4)])
    runs, measured, _ = report.load([str(bad), good])
    assert [r.path for r in runs] == [good] and len(measured) == 1
    assert "list.json is not pytest-benchmark JSON" in capsys.readouterr().err


# --- report.py: markdown and compact ----------------------------------------------------------


def test_runs_column_lists_each_run_once_in_order(tmp_path):
    """A training row built from several paths of the same run names that run once."""
    base = {"device": "cpu", "mode": "diffusion", "model": "epg-tiny", "batch": 16}
    rows = []
    for path in ("eager_ref", "eager_epg"):
        params = {**base, "path": path}
        rows.append(_bench(params, {"kind": "train", **params, "flops_per_image": 2e9}, 0.5))
    path = _results(tmp_path, "cpu.json", CPU_ENV, rows)
    text = report.render_markdown(*report.load([path]))
    assert "| epg-tiny | diffusion | 16 | 32.0 (64% of fp32 matmul) | — | 32.0 (64% of fp32 " \
           "matmul) | — | [1] |" in text, text


def test_cpu_figures_stay_out_of_the_gpu_section(tmp_path):
    """CPU figures must never read as GPU performance."""
    cpu = _results(tmp_path, "cpu.json", CPU_ENV,
                   [_op_bench("cuda", 1e-4, op="edm_scalings", device="cpu")])
    text = report.render_markdown(*report.load([cpu]))
    assert "**GPU figures**" not in text, text
    assert "**CPU figures" in text and "edm_scalings" in text


def test_cpu_sampling_rows_quote_the_matmul_fraction_not_mfu(tmp_path):
    """On a CPU the sampling rate is a fraction of the measured float32 matmul rate, even when a
    peak happens to be recorded."""
    params = {"device": "cpu", "model": "epg-tiny", "path": "eager", "batch": 8}
    extra = {"kind": "sampling", **params, "flops_per_image": 1e9, "passes_per_image": 64,
             "peak_bf16_tflops": 989.0}  # fmt: skip
    path = _results(tmp_path, "cpu.json", CPU_ENV, [_bench(params, extra, median=1.0)])
    text = report.render_markdown(*report.load([path]))
    # 8 images/s × 1 GFLOP = 8 GFLOP/s = 8% of 0.1 TFLOP/s
    assert "| epg-tiny | eager | 8 | 8.00 | 64.0 | 8.0% of matmul | [1] |" in text, text


def test_compact_keeps_baseline_rows_of_a_case_without_speedup(tmp_path):
    """Only the baselines of a case that has a speed-up are folded into it; a case measured
    with baselines alone (the epg row failed) keeps its rows in the compact table."""
    benchmarks = [_op_bench("ref", 50e-6, op="layer_norm"),
                  _op_bench("ref_compiled", 40e-6, op="layer_norm")]  # fmt: skip
    path = _results(tmp_path, "gpu.json", GPU_ENV, benchmarks)
    compact = report.render_compact(*report.load([path]))
    assert "op layer_norm D1584-H22 B128 fwd ref_compiled [cuda]" in compact, compact
    assert "baseline op rows" not in compact


def test_compact_counts_cases_not_run_for_another_reason(tmp_path):
    """Cases skipped for a reason other than the missing GPU (a time budget, a backend without a
    kernel) are counted in the compact table, the reasons being in summary.md."""
    params = _op_params("triton", op="layer_norm", device="cpu")
    path = _results(tmp_path, "cpu.json", CPU_ENV, [],
                    [{"kind": "op", "params": params, "gpu": False, "reason": "no kernel"},
                     {"kind": "op", "params": _op_params("triton"), "gpu": True,
                      "reason": NO_GPU}])  # fmt: skip
    compact = report.render_compact(*report.load([path]))
    assert "other cases not run" in compact and "1 (reasons in summary.md)" in compact, compact
    assert "1 op (not measured on a GPU)" in compact, compact


def test_main_compact_prints_only_the_compact_table(tmp_path, capsys):
    """gpu_check.sh's last output is the compact table; the markdown goes to summary.md, not
    into the log where it would push the table out of the last 12,000 characters."""
    path = _results(tmp_path, "gpu.json", GPU_ENV, [_op_bench("triton", 1e-4)])
    assert report.main([path, "--compact"]) == 0
    out = capsys.readouterr().out
    assert "op attention D1584-H22 B128 fwd triton [cuda]" in out
    assert "| run |" not in out and "Runs:" not in out, out


def test_main_says_a_results_file_is_missing(tmp_path, capsys):
    """When the benchmark step wrote no JSON the report says so (no benchmark ran) and still
    gives the step statuses."""
    steps = tmp_path / "steps.tsv"
    steps.write_text("benchmarks (quick)\tfailed\tstopped\n")
    assert report.main([str(tmp_path / "none.json"), "--steps", str(steps), "--compact"]) == 0
    out, err = capsys.readouterr()
    assert "none.json does not exist (no benchmark ran?)" in err, err
    assert "benchmarks (quick)  failed: stopped" in out, out


# --- flops.py ---------------------------------------------------------------------------------


def test_peak_lookup_tells_h100_pcie_from_sxm_and_ignores_case():
    """MFU is quoted against the dense bf16 peak of the GPU that ran: an H100 PCIe (756) must not
    be taken for an SXM (989), and a name in other case still matches."""
    assert flops.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_bf16_tflops("nvidia h200") == 989.0


def test_forward_flops_match_torch_for_an_epg_with_equal_widths_and_a_deeper_decoder():
    """The count's branches the paper configs may not reach: no encoder→decoder linear when the
    widths agree, long skips only into the first ``depth`` decoder blocks, an MLP width rounded
    down as the model does. torch's own FLOP counter on the built network is the judge."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from epg.models import build, get_config

    overrides = dict(decoder_embed_dim=64, decoder_depth=3, decoder_num_heads=4, mlp_ratio=2.7)
    cfg = get_config("epg-tiny", **overrides)
    assert cfg.embed_dim == cfg.decoder_embed_dim and cfg.decoder_depth > cfg.depth
    assert cfg.embed_dim * cfg.mlp_ratio != int(cfg.embed_dim * cfg.mlp_ratio)
    net = build("epg-tiny", **overrides).eval()
    B = 2
    x = torch.randn(B, cfg.in_channels, cfg.img_size, cfg.img_size)
    counter = FlopCounterMode(display=False)
    with common.plain_pytorch_ops(), sdpa_kernel(SDPBackend.MATH), counter:
        net(x, torch.randn(B), torch.zeros(B, dtype=torch.long))
    assert counter.get_total_flops() == B * flops.forward_flops(cfg)


# Bytes per element, each a different number so that a tensor counted at the wrong dtype shows;
# float32 outputs the ops always write (timestep embedding, InfoNCE losses) are 4.
SIZES = {"act": 2, "param": 3, "weight": 5, "mod": 7, "f32": 4, "data": 6}
DIMS = {"B": 2, "T": 5, "D": 8, "H": 2, "Dh": 4, "N": 4, "C": 3, "img": 8, "p": 4, "dim": 16,
        "M": 6}  # fmt: skip


def _ledger(*tensors):
    """Bytes of the tensors an op must read or write: (elements, bytes per element) pairs."""
    return sum(n * size for n, size in tensors)


def test_op_byte_and_flop_counts_are_the_tensors_read_and_written():
    """GB/s and its fraction of the copy bandwidth (the >= 85% target) are only as right as the
    byte counts: each one here is the op's inputs read once and outputs written once, listed
    tensor by tensor at its dtype (flops.py's convention)."""
    a, p, w, m, f = (SIZES[k] for k in ("act", "param", "weight", "mod", "f32"))
    B, T, D, Dh, H = DIMS["B"], DIMS["T"], DIMS["D"], DIMS["Dh"], DIMS["H"]
    rows = B * T
    expected = {
        # x, w, b read; y written  |  dy, x, w, b read; dx, dw, db written
        ("layer_norm", "fwd"): _ledger((rows * D, a), (D, p), (D, p), (rows * D, a)),
        ("layer_norm", "bwd"): _ledger((rows * D, a), (rows * D, a), (D, p), (D, p),
                                       (rows * D, a), (D, p), (D, p)),
        ("ln_modulate", "fwd"): _ledger((rows * D, a), (D, p), (D, p), (B * D, m), (B * D, m),
                                        (rows * D, a)),
        ("ln_modulate", "bwd"): _ledger((rows * D, a), (rows * D, a), (D, p), (D, p), (B * D, m),
                                        (B * D, m), (rows * D, a), (D, p), (D, p), (B * D, m),
                                        (B * D, m)),
        # x, y, gate read; out written  |  dy, y, gate read; dy·gate, dgate written
        ("gated_residual", "fwd"): _ledger((rows * D, a), (rows * D, a), (B * D, m),
                                           (rows * D, a)),
        ("gated_residual", "bwd"): _ledger((rows * D, a), (rows * D, a), (B * D, m),
                                           (rows * D, a), (B * D, m)),
        # qkv read, out written  |  qkv, dout read, dqkv written
        ("attention", "fwd"): _ledger((3 * B * T * H * Dh, a), (B * T * H * Dh, a)),
        ("attention", "bwd"): _ledger((3 * B * T * H * Dh, a), (B * T * H * Dh, a),
                                      (3 * B * T * H * Dh, a)),
    }  # fmt: skip
    # patch_embed: 8-px images of 3 channels in 4-px patches → N = 4 patches of K = 48 features
    side, pp, C = DIMS["img"], DIMS["p"], DIMS["C"]
    N, K = (side // pp) ** 2, C * pp * pp
    img, weight, bias, pos, tokens = (B * C * side**2, a), (K * D, a), (D, a), (N * D, f), (B * N * D, f)
    expected[("patch_embed", "fwd")] = _ledger(img, weight, bias, pos, tokens)
    expected[("patch_embed", "bwd")] = _ledger(tokens, img, weight, bias, pos)
    # output_head: x (B, N, D) → LayerNorm → Linear D → K = C·p²
    Nh = DIMS["N"]
    x, image = (B * Nh * D, a), (B * Nh * K, a)
    norm, hw, hb = (D, p), (K * D, w), (K, w)
    expected[("output_head", "fwd")] = _ledger(x, norm, norm, hw, hb, image)
    expected[("output_head", "bwd")] = _ledger(image, x, norm, norm, hw, x, norm, norm, hw, hb)
    # per-sample float32 ops
    dim = DIMS["dim"]
    expected[("timestep_embedding", "fwd")] = _ledger((B, f), (B * dim, 4))
    expected[("timestep_embedding", "bwd")] = _ledger((B * dim, 4), (B, f), (B, f))
    expected[("edm_scalings", "fwd")] = _ledger((B, f), *[(B, f)] * 4)
    expected[("edm_scalings", "bwd")] = _ledger(*[(B, f)] * 4, (B, f), (B, f))
    # info_nce: q (B, D), k (M, D) → (B,) float32 losses
    M = DIMS["M"]
    expected[("info_nce", "fwd")] = _ledger((B * D, a), (M * D, a), (B, 4))
    expected[("info_nce", "bwd")] = _ledger((B, 4), (B * D, a), (M * D, a), (B * D, a))
    for (op, mode), nbytes in expected.items():
        got = flops.op_counts(op, mode, DIMS, SIZES)
        assert got.bytes == nbytes, f"{op} {mode}: {got.bytes} bytes, expected {nbytes}"
    qk = 2 * B * H * T * T * Dh  # one of Q·Kᵀ, P·V
    flop_counts = {
        ("attention", "fwd"): 2 * qk, ("attention", "bwd"): 4 * qk,
        ("patch_embed", "fwd"): 2 * B * N * K * D, ("patch_embed", "bwd"): 2 * B * N * K * D,
        ("output_head", "fwd"): 2 * B * Nh * D * K, ("output_head", "bwd"): 4 * B * Nh * D * K,
        ("info_nce", "fwd"): 2 * B * M * D, ("info_nce", "bwd"): 2 * B * M * D,
        ("layer_norm", "fwd"): 0, ("edm_scalings", "bwd"): 0,
    }  # fmt: skip
    for (op, mode), n in flop_counts.items():
        got = flops.op_counts(op, mode, DIMS, SIZES).flops
        assert got == n, f"{op} {mode}: {got} FLOPs, expected {n}"


@pytest.mark.parametrize(
    "op, mode, per_element, per_sample",
    [
        ("noise_precondition", "fwd", 3 * 6, 5 * 4),  # read x0, eps, σ; write x_in, 4 scalings
        ("noise_precondition", "bwd", 5 * 6, 6 * 4),  # dx_in, x0, eps, 4 grads, σ; dx0, deps, dσ
        ("weighted_mse_loss", "fwd", 2 + 6, 3 * 4),  # read pred (act), target (data), weight
        ("weighted_mse_loss", "bwd", 2 * 2 + 6, 2 * 4),  # read dloss, pred, target, weight
        ("pseudo_huber_loss", "fwd", 2 * 6, 3 * 4),  # read pred, target (data), weight
        ("pseudo_huber_loss", "bwd", 3 * 6, 3 * 4),  # read dloss, weight, squared sum too
        ("normalize_images", "fwd", 1 + 6, 1),  # read uint8 and a bool flip; write float32
        ("to_uint8", "fwd", 6 + 1, 0),  # read float; write uint8
        ("patchify_hwc", "fwd", 2 * 2, 0),  # a permuted copy
        ("unpatchify_hwc", "bwd", 2 * 2, 0),
    ],
)
def test_image_sized_op_bytes_are_the_image_and_per_sample_tensors(op, mode, per_element,
                                                                   per_sample):  # fmt: skip
    """The image-sized ops' traffic: per element, one read or write of each image-sized tensor at
    its dtype; per sample, one of each (B,) tensor (float32 per-sample values, bool flips)."""
    small = flops.op_counts(op, mode, {**DIMS, "img": 8}, SIZES).bytes
    large = flops.op_counts(op, mode, {**DIMS, "img": 16}, SIZES).bytes
    added = DIMS["B"] * DIMS["C"] * (16**2 - 8**2)
    assert large - small == added * per_element, (large - small, added * per_element)
    per_sample_bytes = small - DIMS["B"] * DIMS["C"] * 8**2 * per_element
    assert per_sample_bytes == DIMS["B"] * per_sample, (per_sample_bytes, DIMS["B"] * per_sample)


def test_op_counts_refuse_an_unknown_mode_or_op():
    """A typo in a benchmark's mode or op must not silently give a forward or zero count."""
    with pytest.raises(ValueError, match="mode"):
        flops.op_counts("layer_norm", "backward", DIMS, SIZES)
    with pytest.raises(ValueError, match="unknown op"):
        flops.op_counts("layer_nrom", "fwd", DIMS, SIZES)


# --- common.py --------------------------------------------------------------------------------


def test_rounds_are_quick_only_under_gpu_checks_flag(monkeypatch):
    """gpu_check.sh sets EPG_BENCH_QUICK=1 to fit its budget; a plain run takes the full rounds."""
    monkeypatch.delenv(common.QUICK_ENV, raising=False)
    assert common.rounds(20, 7) == 20
    monkeypatch.setenv(common.QUICK_ENV, " 1 ")
    assert common.rounds(20, 7) == 7
    monkeypatch.setenv(common.QUICK_ENV, "0")
    assert common.rounds(20, 7) == 20


def test_require_time_skips_only_a_case_that_no_longer_fits(monkeypatch):
    """Under gpu_check.sh's deadline a case that fits runs and one that does not is skipped;
    without a deadline every case runs."""
    import time

    def runs(seconds):
        try:
            common.require_time(seconds)
        except pytest.skip.Exception:  # a skip here would skip this test, not fail it
            return False
        return True

    monkeypatch.delenv(common.DEADLINE_ENV, raising=False)
    assert runs(1e9)
    monkeypatch.setenv(common.DEADLINE_ENV, str(time.time() + 100))
    assert runs(10.0), "a 10 s case skipped with 100 s left"
    assert not runs(1000.0), "a 1000 s case run with 100 s left"
    with pytest.raises(pytest.skip.Exception, match="time budget"):
        common.require_time(1000.0)


class _FakeBenchmark:
    """The parts of pytest-benchmark's fixture time_rounds uses; a round 'takes' 6 s."""

    def __init__(self, enabled=True, median=6.0):
        self.enabled, self.extra_info, self.has_error, self.rounds = enabled, {}, False, []
        self.stats = type("S", (), {"stats": type("T", (), {"median": median})()})()

    def pedantic(self, fn, rounds, warmup_rounds, iterations):
        for _ in range(rounds + warmup_rounds):
            fn()
            self.rounds.append(1)


def test_time_rounds_sizes_rounds_and_divides_by_the_calls():
    """report.py divides the round median by calls_per_round: time_rounds must cap the calls at
    max_calls, record them before the rounds and return the median per call."""
    calls = []
    bench = _FakeBenchmark()
    per_call = common.time_rounds(bench, lambda: calls.append(1), torch_cpu(), rounds=2,
                                  warmup_rounds=1, target_round_s=10.0, max_calls=3)  # fmt: skip
    assert bench.extra_info["calls_per_round"] == 3, bench.extra_info
    assert len(calls) == 2 + 3 * 3  # warm-up, sizing call, then 3 rounds of 3 calls
    assert per_call == pytest.approx(2.0) and bench.extra_info["seconds_per_call"] == per_call


def test_time_rounds_disabled_runs_once_and_times_nothing():
    """With --benchmark-disable a benchmark is a test: one call, no rounds, no figure."""
    calls = []
    bench = _FakeBenchmark(enabled=False)
    assert common.time_rounds(bench, lambda: calls.append(1), torch_cpu(), rounds=3) is None
    assert len(calls) == 1 and bench.rounds == [] and "calls_per_round" not in bench.extra_info


def torch_cpu():
    import torch

    return torch.device("cpu")


def test_best_rate_is_the_fastest_trial(monkeypatch):
    """The calibration is the device's attainable rate: the best of the trials, per call."""
    ticks = iter([0.0, 6.0, 10.0, 12.0, 20.0, 30.0])  # trials of 6, 2 and 10 s for 2 calls
    monkeypatch.setattr(common, "time", type("Clock", (), {"perf_counter": lambda: next(ticks)}))
    assert common._best_rate(lambda: None, torch_cpu(), reps=2, trials=3) == pytest.approx(1.0)


def test_calibrate_counts_copy_read_and_write_and_two_flops_per_multiply_add(monkeypatch):
    """The copy bandwidth the >= 85% target is measured against counts the bytes read and the
    bytes written; the matmul rate counts 2 FLOPs per multiply-add."""
    monkeypatch.setattr(common, "_best_rate", lambda run, device, reps, trials: 0.5)
    c = common.calibrate(torch_cpu())
    assert c["copy_bytes"] == 64 << 20
    assert c["copy_gbps"] == pytest.approx(2 * (64 << 20) / 0.5 / 1e9)
    assert c["matmul_n"] == 1024 and c["matmul_dtype"] == "float32"
    assert c["matmul_tflops"] == pytest.approx(2 * 1024**3 / 0.5 / 1e12)


def test_git_revision_prefers_the_named_one_and_marks_a_dirty_tree(monkeypatch):
    """Figures are tied to the code that made them: EPG_GIT_REV (a tree copied without .git)
    wins, and uncommitted changes are marked +dirty."""
    answers = {"rev-parse": "0123456789ab", "status": " M epg/ops.py"}
    monkeypatch.setattr(common, "_git", lambda *args: answers[args[0]])
    monkeypatch.setenv("EPG_GIT_REV", "feedbeef")
    assert common.git_revision() == "feedbeef"
    monkeypatch.delenv("EPG_GIT_REV")
    assert common.git_revision() == "0123456789ab+dirty"
    answers["status"] = ""
    assert common.git_revision() == "0123456789ab"


def test_forced_backend_sets_the_ops_variable_and_restores_the_old_value(monkeypatch):
    """epg reads EPG_BACKEND_<OP> (upper case); a value set before the block comes back after."""
    monkeypatch.setenv("EPG_BACKEND_LAYER_NORM", "cuda")
    monkeypatch.delenv("EPG_BACKEND", raising=False)
    with common.forced_backend("triton", "layer_norm"):
        assert os.environ["EPG_BACKEND_LAYER_NORM"] == "triton"
    assert os.environ["EPG_BACKEND_LAYER_NORM"] == "cuda"
    with common.forced_backend("reference"):
        assert os.environ["EPG_BACKEND"] == "reference"
    assert "EPG_BACKEND" not in os.environ


def test_plain_info_nce_lets_no_gradient_reach_the_keys():
    """As the public op: the keys are a stop-gradient target, so the plain PyTorch path (the
    'PyTorch without epg' baseline) must not do the keys' backward either."""
    import torch

    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(5, 8), dim=1).requires_grad_()
    common.PLAIN_OPS["info_nce"](q, k, 0.1).sum().backward()
    assert q.grad is not None and k.grad is None, k.grad


def test_benchmarks_hear_ctrl_c_when_started_with_it_ignored():
    """gpu_check.sh stops the suite with SIGINT at its limit; a pytest started with SIGINT ignored
    (a background job) must take it back, or it is killed before writing its JSON."""
    code = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "from benchmarks import common\n"
            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)  # fmt: skip
    assert proc.stdout.strip() == "True", proc.stdout + proc.stderr[-2000:]


# --- conftest.py ------------------------------------------------------------------------------


def test_skipped_gpu_cases_are_recorded_with_the_plain_no_gpu_reason(tmp_path):
    """Without a GPU every GPU case is skipped and written to epg_not_run with its parameters and
    conftest's reason, without pytest's 'Skipped: ' prefix: report.py matches that reason."""
    out = tmp_path / "b.json"
    # One CPU case is measured too, so that the JSON is pytest-benchmark's own.
    run_bench_ops(out, "quick", "edm_scalings and fwd and not triton", EPG_BENCH_QUICK="1")
    results = json.loads(out.read_text())
    assert {b["extra_info"]["device"] for b in results["benchmarks"]} == {"cpu"}
    entries = [e for e in results["epg_not_run"] if e["gpu"]]
    assert entries, "no GPU case recorded as not run"
    for e in entries:
        assert e["kind"] == "op" and e["gpu"] is True and e["params"]["device"] == "cuda", e
        assert e["reason"] == NO_GPU, e["reason"]


# --- gpu_check.sh's shell logic, with a stand-in interpreter ----------------------------------

STUB = r"""#!/usr/bin/env bash
# A stand-in for python: no GPU, every module present, pytest answers with $STUB_RC.
case "$1" in
  -) cat > /dev/null
     if [ $# -eq 1 ]; then printf '0 - 2.0.0 -\nno GPU\n'; else echo ""; fi ;;
  -c) case "$2" in *epg_kernels*) exit 0 ;; *) exit 1 ;; esac ;;
  -m) printf '%s\n' "$*" "QUICK=${EPG_BENCH_QUICK:-} DEADLINE=${EPG_BENCH_DEADLINE:-}" \
          "OMP=${OMP_NUM_THREADS:-}" >> "$STUB_LOG"
      printf 'collected 8 items / 3 deselected / 5 selected\n'
      printf '===== 5 passed,\t3 skipped in 2.00s =====\n'
      exit "$STUB_RC" ;;
  *) exec "$REAL_PY" "$@" ;;
esac
"""


def _gpu_check(tmp_path, rc, **env_extra):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "OMP_NUM_THREADS")}
    env.update(PYTHON=str(stub), REAL_PY=sys.executable, STUB_RC=str(rc),
               STUB_LOG=str(tmp_path / "calls.log"), EPG_WHEELS=str(tmp_path / "none"),
               **env_extra)  # fmt: skip
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = (out / "steps.tsv").read_text().splitlines()
    steps = {name: rest for name, *rest in (line.split("\t") for line in lines)}
    return proc, steps, (tmp_path / "calls.log").read_text().splitlines()


def test_gpu_check_without_a_gpu_skips_the_gpu_steps_and_passes(tmp_path):
    """On a CPU machine: the GPU steps say they are skipped (not failed), the quick subset runs
    its CPU cases (marker 'quick', EPG_BENCH_QUICK=1, a deadline, one thread), pytest's last
    summary line is the step's detail (tabs made spaces), and the exit status is 0."""
    proc, steps, calls = _gpu_check(tmp_path, 0)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert steps["environment"][0] == "ok" and "OMP_NUM_THREADS=1" in steps["environment"][1]
    assert steps["build CUDA extension"] == ["skipped", "no GPU; no epg._C: reference paths"]
    assert steps["GPU tests (cuda, triton)"] == ["skipped", "no GPU"]
    assert steps["benchmarks (quick)"] == ["ok", "5 passed, 3 skipped in 2.00s; GPU cases "
                                           "skipped: no GPU"], steps["benchmarks (quick)"]
    assert "pytest benchmarks -m quick -q" in calls[0], calls
    assert calls[1].startswith("QUICK=1 DEADLINE=") and calls[1] != "QUICK=1 DEADLINE=", calls
    assert calls[2] == "OMP=1", calls
    # The compact table ends the output with the steps (no run line: the stand-in writes no JSON).
    tail = proc.stdout.strip().splitlines()
    assert tail[-1].startswith("benchmarks (quick)") and "ok: 5 passed" in tail[-1], tail[-3:]


@pytest.mark.parametrize("rc, detail", [(130, "stopped at the "), (1, "(see benchmarks.log)")])
def test_gpu_check_reports_a_failed_or_stopped_benchmark_step_and_exits_1(tmp_path, rc, detail):
    """A benchmark run stopped at the time limit (SIGINT: 130) or failing is a failed step, said
    with its summary line, and the script's exit status is 1."""
    proc, steps, _ = _gpu_check(tmp_path, rc)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    status, text = steps["benchmarks (quick)"]
    assert status == "failed" and detail in text and "5 passed, 3 skipped" in text, text
