"""pytest-benchmark JSON from the epg suites → the performance tables of the README.

    python benchmarks/report.py RESULTS.json [MORE.json ...] [--markdown OUT.md]
        [--summary-json OUT.json] [--steps STEPS.tsv] [--compact]

Each input file is one run (``pytest benchmarks ... --benchmark-json=RESULTS.json``). Every figure
is tied to its run: a legend lists each run's date, device, torch / Triton / CUDA versions, git
revision and the copy bandwidth and matrix-product rate measured in it. Cases a run recorded as
not run (``epg_not_run``, written by benchmarks/conftest.py) appear as "not measured on a GPU"
when the run had no GPU, else with their skip reason; a case measured in any input wins over its
not-run entries. GPU and CPU figures go to separate sections, the CPU ones marked as CPU figures.

Figures (per call = median round time / calls per round):
  op        µs per call; GB/s = bytes / time and its fraction of the run's measured copy
            bandwidth; TFLOP/s = matmul FLOPs / time and its fraction of the measured matmul rate;
            on the epg providers (epg, triton, cuda) the speed-up = time of the fastest baseline
            measured in the same run for the same case / this time: for attention the fastest
            of the reference provider "ref" (SDPA's own choice forward, float32 math backward),
            each pinned SDPA kernel, the sdpa backend and flash-attn (both of its entries), for
            every other op torch.compile of the reference (ref_compiled)
  train     images/s = batch / step time; MFU = images/s × model FLOPs per image / the device's
            dense bf16 peak (GPU), then the peak memory torch allocated over the timed steps; on
            a CPU the fraction of the measured float32 matmul rate
  sampling  images/s = batch / time of one Heun-32 batch; the same FLOP-based fraction
  loader    images/s = batch / time per batch
  target    GPU op rows that forced and ran one of epg's Triton or CUDA kernels: met /
            missed / not judged (a figure missing) against the issues' targets: Triton
            attention ≥1.3× the fastest attention baseline; memory-bound Triton kernels ≥85% of
            the copy bandwidth and ≥1.1× torch.compile of the reference; CUDA kernels ≥85% of
            the copy bandwidth

``--compact`` prints a short plain-text table, the steps and the run last (gpu_check.sh
prints it last); ``--steps`` adds
gpu_check.sh's step statuses (a TSV of step, status, detail). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

NOT_ON_GPU = "not measured on a GPU"
NO_GPU_REASON = "no CUDA GPU on this machine"  # the skip reason of benchmarks/conftest.py

TRAIN_PATHS = {  # the paths of bench_train.py, in table order
    "eager_ref": "PyTorch eager",
    "compiled_ref": "PyTorch + compile",
    "eager_epg": "epg ops",
    "compiled_epg": "epg ops + compile",
}
MODES = {"pretrain": "stage 1", "diffusion": "diffusion", "consistency": "consistency"}
SAMPLING_PATHS = {"eager": "eager", "cuda_graph": "CUDA graphs"}
MFU_BASIS = (
    "MFU: model FLOPs (matmul multiply-adds × 2, attention Q·Kᵀ and P·V included, backward = "
    "2 × forward) per second / the GPU's dense bf16 peak; then the peak memory allocated"
)
CPU_BASIS = "in brackets: model FLOP/s as a fraction of the float32 matmul rate measured in the run"
EPG_PROVIDERS = ("epg", "triton", "cuda")  # the op rows that get a speed-up
ATTENTION_BASELINES = ("ref", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash_attn",
                       "flash_attn_lib")  # fmt: skip
OP_BASELINES = ("ref_compiled",)
# The issues' performance targets for epg's own kernels on a GPU (issues #6 and #7).
ATTENTION_TARGET = 1.3  # Triton attention: × the fastest of SDPA and flash-attn
COPY_TARGET = 0.85  # memory-bound Triton and CUDA kernels: of the run's copy bandwidth
COMPILE_TARGET = 1.1  # memory-bound Triton kernels: × torch.compile of the reference
KERNEL_BACKENDS = ("triton", "cuda")  # the providers that force one of epg's kernels
TARGET_WORDS = {True: "met", False: "missed", None: "not judged"}
# Each rule as a row states it; the summary line lists the three.
ATTENTION_RULE = f"≥{ATTENTION_TARGET}× SDPA/flash-attn"
TRITON_RULE = f"≥{COPY_TARGET:.0%} of copy, ≥{COMPILE_TARGET}× compile"
CUDA_RULE = f"≥{COPY_TARGET:.0%} of copy"
TARGET_RULES = (f"Triton attention {ATTENTION_RULE}; memory-bound Triton kernels {TRITON_RULE}; "
                f"CUDA kernels {CUDA_RULE}")  # fmt: skip


# --- numbers --------------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 3) -> str:
    """``digits`` significant digits, thousands separated; '—' for None."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:,.{decimals}f}"


def speedup_text(row: dict) -> str:
    """'1.42× vs sdpa_flash' for an op row with a speed-up (see add_speedups), else '—'."""
    if row.get("speedup") is None:
        return "—"
    return f"{row['speedup']:.2f}× vs {row['baseline']}"


def pct(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" if x < 0.1 else f"{100 * x:.0f}%"


# --- loading --------------------------------------------------------------------------------------


class Run:
    """One results file: its environment, its calibration, its number in the legend."""

    def __init__(self, index: int, path: str, data: dict):
        self.index, self.path = index, path
        self.env = data.get("machine_info", {}).get("epg", {})
        self.calibration = self.env.get("calibration", {})
        self.has_gpu = bool(self.env.get("gpu"))

    @property
    def ref(self) -> str:
        return f"[{self.index}]"

    def device_text(self) -> str:
        env = self.env
        cpu = f"CPU: {env.get('cpu', '?')}, {env.get('cpu_count', '?')} cores"
        if env.get("gpu"):
            count = env.get("gpu_count", 1)
            gpu = f"{count}× {env['gpu']}" if count > 1 else env["gpu"]
            return f"{gpu} ({cpu})"
        threads = env.get("torch_threads", "?")
        return f"{cpu}, {threads} thread{'' if threads == 1 else 's'}; no GPU"

    def cuda_text(self) -> str:
        cuda = self.env.get("cuda")
        if not cuda:
            return "— (CPU build)"
        return cuda if self.has_gpu else f"{cuda} (no GPU)"


def _key(kind: str, params: dict) -> tuple:
    return kind, json.dumps(params, sort_keys=True)


def derive(bench: dict, run: Run) -> dict | None:
    """The figures of one measured case (see the module docstring)."""
    info = bench.get("extra_info", {})
    kind = info.get("kind")
    if kind is None or not bench.get("stats"):
        return None
    seconds = bench["stats"]["median"] / info.get("calls_per_round", 1)
    device = info.get("device", "cpu")
    calib = run.calibration.get(device, {})
    matmul = calib.get("matmul_tflops")
    row = {"kind": kind, "device": device, "run": run, "seconds": seconds, "fields": info,
           "key": _key(kind, bench.get("params") or {})}  # fmt: skip
    if kind == "op":
        gbps = info["bytes"] / seconds / 1e9
        tflops = info["flops"] / seconds / 1e12 if info.get("flops") else None
        copy = calib.get("copy_gbps")
        row.update(gbps=gbps, copy_fraction=gbps / copy if copy else None, tflops=tflops,
                   matmul_fraction=tflops / matmul if tflops and matmul else None)  # fmt: skip
    else:
        row["images_per_s"] = info["batch"] / seconds
        if "flops_per_image" in info:
            tflops = row["images_per_s"] * info["flops_per_image"] / 1e12
            peak = info.get("peak_bf16_tflops")
            row.update(tflops=tflops, mfu=tflops / peak if peak else None,
                       matmul_fraction=tflops / matmul if matmul else None)  # fmt: skip
    return row


def _case(row: dict) -> tuple:
    """An op row's case: its run, device, op, shape, batch and mode (every provider shares it)."""
    f = row["fields"]
    return row["run"].index, row["device"], f["op"], f["shape"], f["batch"], f["mode"]


def add_speedups(measured: list[dict]) -> None:
    """Give each op row of an epg provider ``speedup``, ``baseline`` and ``baseline_seconds``
    (see the module docstring): the fastest baseline measured in the same run for the case."""
    best: dict[tuple, dict] = {}
    for row in measured:
        if row["kind"] != "op":
            continue
        f = row["fields"]
        if f["provider"] not in (ATTENTION_BASELINES if f["op"] == "attention" else OP_BASELINES):
            continue
        key = _case(row)
        if key not in best or row["seconds"] < best[key]["seconds"]:
            best[key] = row
    for row in measured:
        base = best.get(_case(row)) if row["kind"] == "op" else None
        if base is not None and row["fields"]["provider"] in EPG_PROVIDERS:
            row.update(speedup=base["seconds"] / row["seconds"],
                       baseline=base["fields"]["provider"], baseline_seconds=base["seconds"])


def target_of(row: dict) -> tuple[str, bool | None] | None:
    """(the target, met?) of a GPU op row that forced one of epg's kernels (provider triton or
    cuda) and ran it; met is None where the run lacks a figure to judge it by. None for every
    other row: CPU rows, baselines, epg's automatic choice (its kernel has its own forced row),
    a backward the kernel's backend hands to the reference, matmul-bound ops but attention."""
    f = row["fields"]
    if row["kind"] != "op" or row["device"] != "cuda" or f["provider"] not in KERNEL_BACKENDS:
        return None
    backend = (f.get("ran") or {}).get(f["mode"]) or f["provider"]
    if backend != f["provider"]:
        return None
    speedup, copy = row.get("speedup"), row.get("copy_fraction")
    if f["op"] == "attention":
        if backend != "triton":
            return None
        rule, checks = ATTENTION_RULE, [(speedup, ATTENTION_TARGET)]
    elif f.get("flops"):
        return None
    elif backend == "cuda":
        rule, checks = CUDA_RULE, [(copy, COPY_TARGET)]
    else:
        rule, checks = TRITON_RULE, [(copy, COPY_TARGET), (speedup, COMPILE_TARGET)]
    if any(value is not None and value < goal for value, goal in checks):
        return rule, False
    return rule, None if any(value is None for value, _ in checks) else True


def target_text(row: dict) -> str:
    target = row.get("target")
    if target is None:
        return "—"
    rule, met = target
    return TARGET_WORDS[met] + f" ({rule})"


def target_counts(measured: list[dict]) -> dict[str, int]:
    """{'met': n, 'missed': n, 'not judged': n} over the rows with a target."""
    counts = {"met": 0, "missed": 0, "not judged": 0}
    for row in measured:
        if row.get("target") is not None:
            counts[TARGET_WORDS[row["target"][1]]] += 1
    return counts


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {word}" for word, n in counts.items())


def _read(path: str) -> dict | None:
    """A results file, or None (said on stderr) when it cannot be read: the other files and the
    step statuses still make a report."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # ValueError: cut short or not JSON
        print(f"report.py: {path} cannot be read, left out ({exc})", file=sys.stderr)
        return None
    if not isinstance(data, dict):
        print(f"report.py: {path} is not pytest-benchmark JSON, left out", file=sys.stderr)
        return None
    return data


def load(paths: list[str]) -> tuple[list[Run], list[dict], list[dict]]:
    """(runs, measured rows, not-run rows); a case measured anywhere drops its not-run entries."""
    runs, measured, not_run = [], [], []
    readable = [(path, data) for path in paths if (data := _read(path)) is not None]
    for i, (path, data) in enumerate(readable, start=1):
        run = Run(i, path, data)
        runs.append(run)
        for bench in data.get("benchmarks", []):
            row = derive(bench, run)
            if row is not None:
                measured.append(row)
        for entry in data.get("epg_not_run", []):
            if entry.get("kind"):
                not_run.append({**entry, "fields": entry["params"], "run": run,
                                "device": entry["params"].get("device", "cpu"),
                                "key": _key(entry["kind"], entry["params"])})  # fmt: skip
    add_speedups(measured)
    for row in measured:
        row["target"] = target_of(row)
    seen = {row["key"] for row in measured}
    kept: dict[tuple, dict] = {}
    for entry in not_run:
        # Keep one entry per case; a run with a GPU gives the informative reason.
        if entry["key"] not in seen and (entry["key"] not in kept or entry["run"].has_gpu):
            kept[entry["key"]] = entry
    return runs, measured, list(kept.values())


def not_run_text(entry: dict) -> str:
    no_gpu = not entry["run"].has_gpu or entry["reason"].startswith(NO_GPU_REASON)
    return NOT_ON_GPU if entry.get("gpu") and no_gpu else f"not run: {entry['reason']}"


# --- markdown -------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _runs_of(rows: list[dict]) -> str:
    refs = sorted({row["run"].index for row in rows})
    return ", ".join(f"[{i}]" for i in refs) if refs else "—"


def _legend(runs: list[Run]) -> list[str]:
    rows = []
    for run in runs:
        env, measured = run.env, []
        for device, name in (("cuda", "GPU"), ("cpu", "CPU")):
            c = run.calibration.get(device)
            if c:
                measured.append(f"{name}: copy {fmt(c['copy_gbps'])} GB/s, {c['matmul_dtype']} "
                                f"matmul {fmt(c['matmul_tflops'])} TFLOP/s")  # fmt: skip
        rows.append([run.ref, env.get("date", "?"), run.device_text(), env.get("torch", "?"),
                     env.get("triton") or "—", run.cuda_text(), env.get("git_revision", "?"),
                     "; ".join(measured) or "—"])  # fmt: skip
    header = ["run", "date", "device", "torch", "Triton", "CUDA", "git revision", "measured in it"]
    return _table(header, rows)


def _train_section(measured: list[dict], not_run: list[dict], gpu: bool) -> list[str]:
    cells: dict[tuple, dict[str, str]] = defaultdict(dict)
    sources: dict[tuple, list] = defaultdict(list)
    for row in measured:
        f = row["fields"]
        key = (f["mode"], f["model"], f["batch"])
        if gpu:
            rate = f"{pct(row['mfu'])} MFU" if row.get("mfu") is not None else "peak unknown"
            if f.get("peak_memory_gib") is not None:
                rate += f", {fmt(f['peak_memory_gib'])} GiB"
        else:
            rate = f"{pct(row.get('matmul_fraction'))} of fp32 matmul"
        cells[key][f["path"]] = f"{fmt(row['images_per_s'])} ({rate})"
        sources[key].append(row)
    for entry in not_run:
        f = entry["fields"]
        cells[(f["mode"], f["model"], f["batch"])].setdefault(f["path"], not_run_text(entry))
    if not cells:
        return []
    rows = []
    for key in sorted(cells):
        mode, model, batch = key
        paths = [cells[key].get(path, "—") for path in TRAIN_PATHS]
        rows.append([model, MODES.get(mode, mode), str(batch), *paths, _runs_of(sources[key])])
    header = ["model", "stage", "batch", *TRAIN_PATHS.values(), "run"]
    title = f"Training step, images/s ({MFU_BASIS if gpu else CPU_BASIS}):"
    return [title, "", *_table(header, rows), ""]


def _sampling_section(measured: list[dict], not_run: list[dict], gpu: bool) -> list[str]:
    rows = []
    for row in sorted(measured, key=lambda r: (r["fields"]["model"], r["fields"]["batch"])):
        f = row["fields"]
        if gpu and row.get("mfu") is not None:
            rate = f"{pct(row['mfu'])} MFU"
        else:
            rate = f"{pct(row.get('matmul_fraction'))} of matmul"
        rows.append([f["model"], SAMPLING_PATHS.get(f["path"], f["path"]), str(f["batch"]),
                     fmt(row["images_per_s"]), fmt(f["passes_per_image"]), rate,
                     row["run"].ref])  # fmt: skip
    for entry in sorted(not_run, key=lambda e: (e["fields"]["model"], e["fields"]["batch"])):
        f = entry["fields"]
        rows.append([f["model"], SAMPLING_PATHS.get(f["path"], f["path"]), str(f["batch"]),
                     not_run_text(entry), "", "", "—"])  # fmt: skip
    if not rows:
        return []
    header = ["model", "path", "batch", "images/s", "network passes / image", "FLOP rate", "run"]
    title = "Sampling, Heun-32 with interval CFG (scale 2.5), images/s:"
    return [title, "", *_table(header, rows), ""]


def _loader_section(measured: list[dict], not_run: list[dict]) -> list[str]:
    rows = []
    for item in measured + not_run:
        f = item["fields"]
        figure = fmt(item["images_per_s"]) if "images_per_s" in item else not_run_text(item)
        ref = item["run"].ref if "images_per_s" in item else "—"
        rows.append([f["loader"], f"{f['image_size']} px × {f['channels']}", str(f["batch"]),
                     figure, ref])  # fmt: skip
    if not rows:
        return []
    header = ["loader", "images", "batch", "images/s", "run"]
    return ["Data loading, images/s:", "", *_table(header, rows), ""]


def _op_section(measured: list[dict], not_run: list[dict]) -> list[str]:
    out, rows = [], []
    order = ("op", "shape", "batch", "mode", "provider")
    for row in sorted(measured, key=lambda r: tuple(r["fields"][k] for k in order)):
        f = row["fields"]
        provider = f["provider"]
        ran = (f.get("ran") or {}).get(f["mode"])
        if ran and ran != provider:  # epg → triton, or cuda → reference for a backward
            provider += f" → {ran}"
        rows.append([f["op"], f["shape"], str(f["batch"]), f["mode"], provider,
                     fmt(row["seconds"] * 1e6), fmt(row["gbps"]), pct(row["copy_fraction"]),
                     fmt(row["tflops"]), pct(row["matmul_fraction"]), speedup_text(row),
                     target_text(row), row["run"].ref])  # fmt: skip
    counts = target_counts(measured)
    if sum(counts.values()):
        out += [f"Targets of epg's kernels ({TARGET_RULES}): {counts_text(counts)}", ""]
    if rows:
        header = ["op", "shape", "batch", "mode", "provider (→ backend that ran)", "µs", "GB/s",
                  "of copy", "TFLOP/s", "of matmul", "speed-up", "target", "run"]  # fmt: skip
        out += ["Ops (µs per call; GB/s of minimum traffic and its share of the measured copy "
                "bandwidth; matmul TFLOP/s and its share of the measured matmul rate; speed-up of "
                "an epg provider over the fastest baseline of the same run: SDPA or flash-attn "
                "for attention, torch.compile of the reference for the other ops):", "",
                *_table(header, rows), ""]  # fmt: skip
    if not_run:
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for entry in not_run:
            counts[entry["fields"]["op"]][not_run_text(entry)] += 1
        lines = [f"- `{op}`: " + "; ".join(f"{n} {text}" for text, n in sorted(by_text.items()))
                 for op, by_text in sorted(counts.items())]  # fmt: skip
        out += ["Op cases not measured (count, reason):", "", *lines, ""]
    return out


def render_markdown(runs: list[Run], measured: list[dict], not_run: list[dict],
                    steps: list[tuple[str, str, str]] | None = None) -> str:  # fmt: skip
    out = [f"<!-- generated by benchmarks/report.py from {', '.join(r.path for r in runs)} -->", ""]
    if steps:
        table = _table(["step", "status", "detail"], [list(step) for step in steps])
        out += ["gpu_check.sh steps:", "", *table, ""]
    out += ["Runs:", "", *_legend(runs), ""]
    sections = (("cuda", "GPU figures"),
                ("cpu", "CPU figures (measured on a CPU; not GPU performance)"))  # fmt: skip
    for device, title in sections:
        m = [r for r in measured if r["device"] == device]
        n = [e for e in not_run if e["device"] == device]

        def of(kind, rows):
            return [r for r in rows if r["kind"] == kind]

        gpu = device == "cuda"
        body = (_train_section(of("train", m), of("train", n), gpu)
                + _sampling_section(of("sampling", m), of("sampling", n), gpu)
                + _loader_section(of("loader", m), of("loader", n))
                + _op_section(of("op", m), of("op", n)))  # fmt: skip
        if body:
            out += [f"**{title}**", "", *body]
    return "\n".join(out).rstrip() + "\n"


# --- compact text ---------------------------------------------------------------------------------


def _label(item: dict) -> str:
    f, kind, dev = item["fields"], item["kind"], item["device"]
    if kind == "train":
        path = TRAIN_PATHS.get(f["path"], f["path"])
        return f"train {f['mode']} {f['model']} B{f['batch']} {path} [{dev}]"
    if kind == "sampling":
        path = SAMPLING_PATHS.get(f["path"], f["path"])
        return f"sample heun-32 {f['model']} B{f['batch']} {path} [{dev}]"
    if kind == "loader":
        return f"loader {f['loader']} {f['image_size']}px B{f['batch']} [{dev}]"
    return f"op {f['op']} {f['shape']} B{f['batch']} {f['mode']} {f['provider']} [{dev}]"


def _value(row: dict) -> str:
    if row["kind"] == "op":
        value = (f"{fmt(row['seconds'] * 1e6)} µs, {fmt(row['gbps'])} GB/s "
                 f"({pct(row['copy_fraction'])} of copy)")  # fmt: skip
        value += f", {fmt(row['tflops'])} TFLOP/s" if row.get("tflops") else ""
        if row.get("speedup") is not None:
            value += f", {speedup_text(row)} ({fmt(row['baseline_seconds'] * 1e6)} µs)"
        if row.get("target") is not None:
            value += f", target {TARGET_WORDS[row['target'][1]]}"
        return value
    value = f"{fmt(row['images_per_s'])} img/s"
    if row.get("mfu") is not None:
        value += f", MFU {pct(row['mfu'])}"
    elif row.get("matmul_fraction") is not None:
        value += f", {pct(row['matmul_fraction'])} of measured matmul"
    if row["fields"].get("peak_memory_gib") is not None:
        value += f", peak {fmt(row['fields']['peak_memory_gib'])} GiB"
    return value


def render_compact(runs: list[Run], measured: list[dict], not_run: list[dict],
                   steps: list[tuple[str, str, str]] | None = None) -> str:  # fmt: skip
    lines = []
    for run in runs:
        env = run.env
        lines.append(f"run {run.ref} {env.get('date', '?')}  {run.device_text()}  "
                     f"torch {env.get('torch')}  Triton {env.get('triton') or '—'}  "
                     f"CUDA {run.cuda_text()}  git {env.get('git_revision')}")  # fmt: skip
    rows = []
    # The other providers of an op case with a speed-up are in it (and in summary.md): the
    # table stays short enough for the end of a log that is cut to its last 12,000 characters.
    summarised = {_case(row) for row in measured if row.get("speedup") is not None}

    def folded(row: dict) -> bool:
        return (row["kind"] == "op" and row["fields"]["provider"] not in EPG_PROVIDERS
                and _case(row) in summarised)  # fmt: skip

    for kind in ("train", "sampling", "loader", "op"):
        rows += [(_label(r), _value(r)) for r in measured if r["kind"] == kind and not folded(r)]
    count = sum(map(folded, measured))
    if count:
        rows.append(("baseline op rows", f"{count} in the speed-ups above (all in summary.md)"))
    other = [e for e in not_run if not_run_text(e) != NOT_ON_GPU]
    if other:
        rows.append(("other cases not run", f"{len(other)} (reasons in summary.md)"))
    missing = defaultdict(int)
    for entry in not_run:
        if not_run_text(entry) == NOT_ON_GPU:
            missing[entry["kind"]] += 1
    if missing:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(missing.items()))
        rows.append(("GPU cases skipped", f"{counts} ({NOT_ON_GPU})"))
    targets = target_counts(measured)
    if sum(targets.values()):
        rows.append(("kernel targets", f"{counts_text(targets)} (rules in summary.md)"))
    # The steps and the run last: a log cut to its last 12,000 characters keeps them.
    rows += [(name, f"{status}: {det}" if det else status) for name, status, det in steps or []]
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join([f"{name.ljust(width)}  {value}" for name, value in rows] + lines) + "\n"


# --- summary JSON and the command line --------------------------------------------------------


def summary(runs: list[Run], measured: list[dict], not_run: list[dict]) -> dict:
    def plain(item: dict) -> dict:
        fields = {k: v for k, v in item.items() if k not in ("run", "key")}
        return {**fields, "run": item["run"].index}

    return {
        "runs": [{"run": r.index, "file": r.path, **r.env} for r in runs],
        "measured": [plain(r) for r in measured],
        "not_run": [plain(e) for e in not_run],
        "targets": target_counts(measured),
    }


def read_steps(path: str | None) -> list[tuple[str, str, str]]:
    if not path or not Path(path).is_file():
        return []
    steps = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            name, status, *detail = line.split("\t")
            steps.append((name, status, detail[0] if detail else ""))
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", help="pytest-benchmark JSON files, one per run")
    parser.add_argument("--markdown", help="write the markdown here (default: standard output)")
    parser.add_argument("--summary-json", help="write the derived figures here as JSON")
    parser.add_argument("--steps", help="TSV of gpu_check.sh step statuses to include")
    parser.add_argument("--compact", action="store_true", help="print the compact text table")
    args = parser.parse_args(argv)
    present = [p for p in args.results if Path(p).is_file()]
    for path in args.results:
        if path not in present:
            print(f"report.py: {path} does not exist (no benchmark ran?)", file=sys.stderr)
    runs, measured, not_run = load(present)
    steps = read_steps(args.steps)
    markdown = render_markdown(runs, measured, not_run, steps)
    if args.markdown:
        Path(args.markdown).write_text(markdown)
    elif not args.compact:
        sys.stdout.write(markdown)
    if args.summary_json:
        data = summary(runs, measured, not_run)
        Path(args.summary_json).write_text(json.dumps(data, indent=1, default=str))
    if args.compact:
        sys.stdout.write(render_compact(runs, measured, not_run, steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
