"""scripts/compile_triton_kernels.py: the Triton kernels compile for A100 and H100 without a GPU.

The interpreter tests check what the kernels compute; this checks what only compiling shows: that
each launch configuration lowers to a cubin for sm_80 and sm_90a, fits the architecture's shared
memory, and (on the paths training runs) keeps its registers out of local memory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compile_triton_kernels.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("compile_triton_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ctk = _load_script()


def _toolchain_missing() -> str | None:
    try:
        import triton
    except Exception as exc:  # noqa: BLE001 - any failure to import means no compiler
        return f"triton does not import: {exc}"
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for tool in ("ptxas", "cuobjdump"):
        if not (bin_dir / tool).is_file():
            return f"Triton's CUDA backend ships no {tool} here"
    return None


TOOLCHAIN_MISSING = _toolchain_missing()
needs_toolchain = pytest.mark.skipif(TOOLCHAIN_MISSING is not None, reason=str(TOOLCHAIN_MISSING))


def _run(tmp_path, *args) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "records.json"
    # The children must compile, not interpret: the script says so before importing Triton.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    records = json.loads(out.read_text()) if out.exists() else []
    return proc, records


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("compile"), "--set", "quick")


@needs_toolchain
def test_quick_set_compiles_for_both_architectures(quick):
    proc, records = quick
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r for r in records if "error" in r] == []
    for arch in (80, 90):
        mine = [r for r in records if r["arch"] == arch]
        assert {r["family"] for r in mine} == set(ctk.FAMILIES)
        # the forward and backward kernels of every family, each a real cubin
        assert {r["kernel"] for r in mine} >= {
            "_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_ln_fwd_kernel",
            "_ln_bwd_kernel", "_gated_residual_fwd_kernel", "_gated_residual_bwd_kernel",
            "_patch_embed_fwd_kernel", "_patch_embed_bwd_weight_kernel",
            "_patch_embed_bwd_img_kernel", "_precondition_fwd_kernel", "_precondition_bwd_kernel",
            "_squared_sum_kernel", "_scaled_difference_kernel", "_lse_partial_kernel",
            "_lse_combine_kernel", "_grad_partial_kernel", "_grad_finalize_kernel",
        }  # fmt: skip
        for r in mine:
            assert 0 <= r["shared_bytes"] <= ctk.SHARED_LIMIT[arch], r
            assert 0 < r["registers"] <= 255, r
    # The autotuned elementwise kernels compile every candidate block size.
    tuned = {r["constexprs"]["BLOCK"] for r in records if r["kernel"] == "_scaled_difference_kernel"}
    assert len(tuned) > 1
    assert "kernels compiled:" in proc.stdout


@needs_toolchain
def test_training_path_kernels_do_not_spill(quick):
    """The float32 InfoNCE of stage 1 (its tiles spilled up to 2.5 KB per thread on sm_80 before
    they were narrowed) and the bfloat16 kernels of training on sm_90a keep their registers out
    of local memory; on sm_80 only the attention dk/dv kernel spills, 16 bytes per thread."""
    _, records = quick
    spills = {(r["arch"], r["kernel"], r["label"]): r["stack_bytes"] + r["local_bytes"]
              for r in records if r["label"].endswith("bf16") or r["family"] == "info_nce"}  # fmt: skip
    assert len(spills) > 20
    spilled = {key: n for key, n in spills.items() if n}
    allowed = (80, "_attn_bwd_dkdv_kernel", "head dim 72, bf16")
    assert set(spilled) <= {allowed} and spilled.get(allowed, 0) <= 64, spilled


@needs_toolchain
def test_shared_memory_over_the_limit_fails_the_run(tmp_path, quick):
    """The same kernels against a 1 KiB limit: reported as over, and the exit status says so."""
    proc, records = _run(tmp_path, "--set", "quick", "--only", "info_nce", "--arch", "90",
                         "--max-shared", "1024")  # fmt: skip
    assert proc.returncode == 1
    assert "over shared" in proc.stdout
    assert {r["family"] for r in records} == {"info_nce"} and {r["arch"] for r in records} == {90}


def _record(**overrides) -> dict:
    record = {"arch": 80, "family": "attention", "label": "head dim 72, bf16",
              "kernel": "_attn_fwd_kernel", "num_warps": 8, "num_stages": 2, "constexprs": {},
              "shared_bytes": 30720, "registers": 191, "stack_bytes": 0, "local_bytes": 0}  # fmt: skip
    return {**record, **overrides}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, "ok"),
        ({"stack_bytes": 16}, "spills"),
        ({"local_bytes": 8}, "spills"),
        ({"shared_bytes": ctk.SHARED_LIMIT[80]}, "ok"),
        ({"shared_bytes": ctk.SHARED_LIMIT[80] + 1}, "over shared"),
        ({"arch": 90, "shared_bytes": ctk.SHARED_LIMIT[80] + 1}, "ok"),  # H100 has more
        ({"error": "CompilationError: at 12:4"}, "error"),
    ],
)
def test_verdict(overrides, expected):
    assert ctk.verdict(_record(**overrides)) == expected


def test_report_counts_failures_not_spills():
    records = [_record(), _record(stack_bytes=8), _record(shared_bytes=10**6),
               {**_record(kernel=None), "error": "ValueError: bad shape\nsecond line"}]  # fmt: skip
    text, failures = ctk.report(records)
    assert failures == 2
    assert text.splitlines()[-1] == "kernels compiled: 1 error, 1 ok, 1 over shared, 1 spills"
    assert "error: second line" in text
    # a looser limit passes the big kernel
    assert ctk.report(records, max_shared=10**6)[1] == 1
