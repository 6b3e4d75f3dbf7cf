"""Compile every Triton kernel of ``epg_kernels`` for A100 (sm_80) and H100/H200 (sm_90a) on a
machine without a GPU, and check that each would launch there.

The interpreter (``TRITON_INTERPRET=1``) that the unit tests use never compiles a kernel, so it
cannot see what breaks only on a GPU: a kernel that does not lower (a ``tl.dot`` shape or layout
the compiler refuses), one that asks for more shared memory than a block may have (the launch
raises OutOfResources), or registers spilled to local memory (slow, not wrong). This script runs
each launcher at the model's shapes with Triton's driver replaced by one that stands for the chosen
GPU: each launch binds and specialises its arguments as on that GPU (autotuned kernels try each
configuration), is compiled to a cubin by Triton's own compiler and ptxas, and is not run. The
compiled kernel's shared memory is checked against the architecture's per-block limit, and its
registers and stack frame (spills) are read from the cubin with ``cuobjdump``.

What it does not show: speed, and whether the launch grid fits (grids are not compiled).

    python scripts/compile_triton_kernels.py [--arch 80 --arch 90] [--set quick|models|all]
                                             [--json OUT.json] [--max-shared BYTES]

Exit status 1 when a kernel fails to compile or exceeds the shared-memory limit; spills are
reported, not failed. Needs the CUDA backend of Triton (the Linux wheels bundle ptxas and
cuobjdump); runs each architecture in a child process, since the launch configuration Triton
caches per device would otherwise carry over.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import types

# Largest dynamic shared memory one block may opt in to, bytes (CUDA programming guide,
# compute capability table), and the SM counts of the GPUs the launch heuristics are sized for.
SHARED_LIMIT = {80: 166912, 90: 232448}
SM_COUNT = {80: 108, 90: 132}
ARCH_NAME = {80: "sm_80 (A100)", 90: "sm_90a (H100/H200)"}
SETS = ("quick", "models", "all")
FAMILIES = ("attention", "layer_norm", "residual", "patch_embed", "precondition", "info_nce")


# --- the cases: one launcher call each, at the model's shapes --------------------------------

T, B = 258, 2  # tokens (256 patches + the class and time tokens) and a batch: grid sizes only
HALF_AND_FULL = ("fp16", "bf16", "fp32")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}
MODEL_HEAD_DIMS = (8, 64, 72, 120, 128, 192, 256)  # the configs' 64/72/120/128, ends, 192
MODEL_WIDTHS = (768, 1024, 1584, 1920, 2688)  # encoder and decoder widths of the configs
PATCHES = ((256, 16, 768), (256, 16, 1024), (512, 32, 1024))  # (pixels, patch, width)
NCE = ((256, 1024, 256), (256, 1024, 768), (4096, 4096, 768))  # (queries, keys, dim)
# family -> [(shape, dtypes)] per set. quick: the bf16 path of training at one decoder size, the
# float32 InfoNCE of stage 1, and attention's shared-memory extreme (float32, head dim 256).
CASES = {
    "quick": {
        "attention": [(72, ("bf16",)), (256, ("fp32",))],
        "layer_norm": [(1584, ("bf16",))],
        "residual": [(1584, ("bf16",))],
        "patch_embed": [(PATCHES[0], ("bf16",))],
        "precondition": [((3, 256, 256), ("bf16",))],
        "info_nce": [(NCE[0], ("fp32",))],
    },
    "models": {
        "attention": [(dh, HALF_AND_FULL) for dh in MODEL_HEAD_DIMS],
        "layer_norm": [(D, HALF_AND_FULL) for D in MODEL_WIDTHS],
        "residual": [(D, HALF_AND_FULL) for D in MODEL_WIDTHS],
        "patch_embed": [(g, HALF_AND_FULL) for g in PATCHES],
        "precondition": [((3, 256, 256), HALF_AND_FULL)],
        "info_nce": [(problem, HALF_AND_FULL) for problem in NCE],
    },
}
CASES["all"] = {
    **CASES["models"],
    "attention": [(dh, HALF_AND_FULL) for dh in range(8, 257, 8)],
    # up to the width cap (kernels/layer_norm.py MAX_WIDTH), and float64
    "layer_norm": [(D, HALF_AND_FULL + ("fp64",)) for D in MODEL_WIDTHS + (8192,)],
    "residual": [(D, HALF_AND_FULL + ("fp64",)) for D in MODEL_WIDTHS + (8192,)],
    "precondition": [((3, 256, 256), HALF_AND_FULL + ("fp64",))],
}


LABELS = {
    "attention": lambda dh: f"head dim {dh}",
    "layer_norm": lambda D: f"width {D}",
    "residual": lambda D: f"width {D}",
    "patch_embed": lambda shape: "{} px / {} → {}".format(*shape),
    "precondition": lambda shape: "×".join(map(str, shape)),
    "info_nce": lambda shape: "{}×{} keys, dim {}".format(*shape),
}


def _launch(torch, kernels, family: str, shape, dtype) -> None:
    """Call ``family``'s launchers, forward and backward, at ``shape``. Every autotune
    candidate of an autotuned kernel compiles (the stand-in driver's timings)."""
    def randn(*size, dtype=dtype):
        return torch.randn(*size, dtype=dtype)

    if family == "attention":
        qkv = randn(B, T, 3 * 2 * shape)
        out = kernels.attention.attention(qkv, 2)
        kernels.attention.attention_backward(torch.ones_like(out), qkv, 2)
    elif family == "layer_norm":
        ln, eps = kernels.layer_norm, 1e-6
        x, w, b = randn(B, T, shape), randn(shape, dtype=torch.float32), randn(shape, dtype=torch.float32)
        shift, scale = randn(B, shape), randn(B, shape)
        ln.layer_norm_backward(torch.ones_like(ln.layer_norm(x, w, b, eps)), x, w, eps)
        y = ln.ln_modulate(x, w, b, shift, scale, eps)
        ln.ln_modulate_backward(torch.ones_like(y), x, w, b, shift, scale, eps)
    elif family == "residual":
        x, gate, y = randn(B, T, shape), randn(B, shape), randn(B, T, shape)
        out = kernels.residual.gated_residual(x, gate, y)
        kernels.residual.gated_residual_backward(torch.ones_like(out), gate, y)
    elif family == "patch_embed":
        size, p, D = shape
        img, weight = randn(B, 3, size, size), randn(D, 3, p, p)
        bias, pos = randn(D), randn((size // p) ** 2, D)
        out = kernels.patch_embed.patch_embed(img, weight, bias, pos)
        kernels.patch_embed.patch_embed_backward(torch.ones_like(out), img, weight, pos, True)
    elif family == "precondition":
        pc = kernels.precondition
        x0, eps = randn(B, *shape), randn(B, *shape)
        sigma = torch.rand(B) + 0.1
        ones = torch.ones(B)
        for mode in ("x0", "edm"):
            x_in = pc.noise_precondition(x0, eps, sigma, 0.5, 0.002, mode)[0]
            pc.noise_precondition_backward(torch.ones_like(x_in), ones, ones, ones, ones, x0, eps,
                                           sigma, 0.5, 0.002, mode)  # fmt: skip
        pc.weighted_mse_loss(x0, eps, ones)
        pc.weighted_mse_loss_backward(ones, x0, eps, ones)
        sqsum = pc.pseudo_huber_loss(x0, eps, ones, 0.06)[1]
        pc.pseudo_huber_loss_backward(ones, x0, eps, ones, sqsum, 0.06)
    elif family == "info_nce":
        queries, keys, D = shape
        q, k = randn(queries, D), randn(keys, D)
        loss = kernels.infonce.info_nce(q, k, 0.2)
        kernels.infonce.info_nce_backward(torch.ones_like(loss), q, k, 0.2)
    else:
        raise ValueError(f"unknown kernel family {family!r}")


# --- one architecture, in this process ------------------------------------------------------


def _resources(cuobjdump: str, cubin: bytes) -> dict:
    """Registers, stack frame and local memory per thread, as the cubin states them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    return {"registers": int(found["REG"]), "stack_bytes": int(found["STACK"]),
            "local_bytes": int(found["LOCAL"])}  # fmt: skip


def stand_in_gpu(arch: int, case: dict) -> tuple[object, list[dict]]:
    """Make this process's Triton launches compile for ``arch`` and stop before running.

    Returns (the kernel modules of ``epg_kernels`` as attributes of a namespace, the list each
    compiled kernel appends its record to, tagged with ``case``'s current items). Irreversible:
    for a process of its own.
    """
    os.environ["TRITON_INTERPRET"] = "0"  # compile, not interpret (set before Triton's import)
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", arch, 32)
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(bin_dir, "cuobjdump")

    class StandInDriver:
        """What JITFunction.run and the autotuner ask of a driver before launching: the target,
        a device and stream id, and a benchmarker (each autotune candidate 'takes' the same
        time, so every one is compiled and the first is kept)."""

        def get_current_target(self):
            return target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            def bench(fn, quantiles=None, **_):
                fn()
                return [1.0] * len(quantiles) if quantiles else 1.0
            return bench

        def get_empty_cache_for_benchmark(self):
            return torch.empty(1)

        def clear_cache(self, cache):
            pass

    records: list[dict] = []
    seen: set = set()

    def compile_only(self, key, signature, device, constexprs, options, attrs, warmup):
        # Replaces JITFunction._do_compile: compile as the launch would, keep what the cubin
        # says, and return no kernel, so run() stops before launching.
        if (self.fn.__qualname__, key) in seen:
            return None
        seen.add((self.fn.__qualname__, key))
        record = {"arch": arch, **case, "kernel": self.fn.__name__,
                  "num_warps": options.num_warps, "num_stages": options.num_stages,
                  # keyed by argument path: (i,) is the i-th parameter
                  "constexprs": {self.arg_names[path[0]]: value for path, value in constexprs.items()
                                 if len(path) == 1 and isinstance(value, (int, float, bool))}}  # fmt: skip
        start = time.perf_counter()
        try:
            kernel = self.compile(self.ASTSource(self, signature, constexprs, attrs),
                                  target=target, options=options.__dict__)  # fmt: skip
            record.update(shared_bytes=int(kernel.metadata.shared),
                          **_resources(cuobjdump, kernel.asm["cubin"]))  # fmt: skip
        except Exception as exc:  # a kernel that does not compile is the finding
            record["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
        record["compile_s"] = round(time.perf_counter() - start, 3)
        records.append(record)
        return None

    JITFunction._do_compile = compile_only
    driver.set_active(StandInDriver())
    # The launchers refuse CPU tensors outside the interpreter and size reduction grids from the
    # GPU's SM count: let host tensors stand for device ones (they are never read) and give the
    # stand-in GPU's SM count.
    torch.Tensor.is_cuda = property(lambda self: True)
    package = importlib.import_module("epg_kernels")
    if package.UNAVAILABLE_REASON:
        raise SystemExit(package.UNAVAILABLE_REASON)
    common = importlib.import_module("epg_kernels._common")
    modules = {}
    for name in ("attention", "infonce", "layer_norm", "patch_embed", "precondition", "residual"):
        modules[name] = mod = importlib.import_module(f"epg_kernels.{name}")
        if hasattr(mod, "device_guard"):
            mod.device_guard = lambda t: contextlib.nullcontext()
        if hasattr(mod, "target_programs"):
            mod.target_programs = lambda device: common._PROGRAMS_PER_SM * SM_COUNT[arch]
    return types.SimpleNamespace(**modules), records


def compile_arch(arch: int, which: str, only: tuple[str, ...] = ()) -> list[dict]:
    """Run every case (of the families in ``only``, if given) with Triton's driver standing for
    ``arch``; one record per compiled kernel (or per case that failed before compiling)."""
    import torch

    case = {"family": None, "label": None}
    kernels, records = stand_in_gpu(arch, case)
    torch.manual_seed(0)
    for family, cases in CASES[which].items():
        if only and family not in only:
            continue
        for shape, dtypes in cases:
            for dtype in dtypes:
                case.update(family=family, label=f"{LABELS[family](shape)}, {dtype}")
                try:
                    _launch(torch, kernels, family, shape, getattr(torch, DTYPES[dtype]))
                except Exception as exc:
                    records.append({"arch": arch, **case, "kernel": None, "error":
                                    "".join(traceback.format_exception_only(exc)).strip()[:2000]})  # fmt: skip
    return records


# --- the report -------------------------------------------------------------------------------


def verdict(record: dict, max_shared: int | None = None) -> str:
    """'error', 'over shared' (the launch would fail), 'spills' (slow, not wrong) or 'ok'."""
    if "error" in record:
        return "error"
    limit = max_shared if max_shared is not None else SHARED_LIMIT[record["arch"]]
    if record["shared_bytes"] > limit:
        return "over shared"
    if record["stack_bytes"] or record["local_bytes"]:
        return "spills"
    return "ok"


def report(records: list[dict], max_shared: int | None = None) -> tuple[str, int]:
    """A table of the records and the number of failures (errors and over-shared kernels)."""
    verdicts = [verdict(r, max_shared) for r in records]
    lines = [f"{'arch':6} {'kernel':30} {'case':36} {'warps':>5} {'shared KiB':>10} {'regs':>4} "
             f"{'stack B':>7}  verdict"]  # fmt: skip
    for r, v in zip(records, verdicts):
        if v == "error":
            lines.append(f"sm_{r['arch']:<3} {str(r['kernel']):30} {r['label']:36} {'':>5} {'':>10} "
                         f"{'':>4} {'':>7}  error: {r['error'].splitlines()[-1][:200]}")  # fmt: skip
        else:
            lines.append(f"sm_{r['arch']:<3} {r['kernel']:30} {r['label']:36} {r['num_warps']:>5} "
                         f"{r['shared_bytes'] / 1024:>10.1f} {r['registers']:>4} {r['stack_bytes']:>7}  {v}")  # fmt: skip
    counts = collections.Counter(verdicts)
    lines.append("kernels compiled: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return "\n".join(lines), counts["error"] + counts["over shared"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                        help="compute capability ×10 to compile for (repeatable; default: 80 and 90)")
    parser.add_argument("--set", dest="which", choices=SETS, default="models",
                        help="quick: a few cases; models: the model configs' shapes (default); "
                             "all: every attention head dim and the fp64 kernels")
    parser.add_argument("--only", action="append", choices=FAMILIES, default=[],
                        help="compile only this kernel family (repeatable)")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--max-shared", type=int,
                        help="shared-memory limit in bytes instead of the architecture's")
    parser.add_argument("--one-arch", type=int, help=argparse.SUPPRESS)  # the child process:
    parser.add_argument("--records", help=argparse.SUPPRESS)  # it writes its records here
    args = parser.parse_args(argv)

    if args.one_arch is not None:
        records = compile_arch(args.one_arch, args.which, tuple(args.only))
        with open(args.records, "w") as f:
            json.dump(records, f)
        return 0
    records = []
    for arch in args.arch or sorted(SHARED_LIMIT):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "records.json")
            child = subprocess.run([sys.executable, os.path.abspath(__file__), "--one-arch",
                                    str(arch), "--set", args.which, "--records", out]
                                   + [f"--only={family}" for family in args.only])  # fmt: skip
            if child.returncode:
                print(f"compiling for {ARCH_NAME[arch]} failed (exit {child.returncode})",
                      file=sys.stderr)  # fmt: skip
                return 1
            with open(out) as f:
                found = json.load(f)
        print(f"{ARCH_NAME[arch]}: {len(found)} kernels in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        records += found
    text, failures = report(records, args.max_shared)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
