"""pytest setup of the benchmark suites (``pytest benchmarks``; see benchmarks/README.md).

* Collection: the suites are ``bench_<what>.py`` (the project's naming, style.md B3), which
  pytest's default ``python_files`` does not match; :func:`pytest_collect_file` collects them.
  The repository's own ``pytest`` run (``testpaths = ["tests"]``) never enters this folder.
* Markers: ``cpu`` (meaningful on a CPU-only machine), ``gpu`` (needs CUDA; skipped without a
  GPU), ``quick`` (the short subset ``gpu_check.sh`` runs).
* The JSON written with ``--benchmark-json`` gets ``machine_info["epg"]``: date, git revision,
  torch / Triton / CUDA versions, CPU and GPU, and the copy bandwidth and matrix-product rate of
  each device measured in the same run (``common.calibrate``); and ``epg_not_run``: every
  benchmark case that was skipped, with its parameters and the reason (a GPU case on a machine
  without a GPU, a backend with no kernel for an op, ...), so the report can say which figures
  are still missing. A run in which every case was skipped or failed gets the same file with no
  measured case (pytest-benchmark writes none then), so the report can say why.
"""

from __future__ import annotations

import json

import pytest
import torch

from . import common

MARKERS = (
    "cpu: a benchmark that is meaningful on a CPU-only machine",
    "gpu: a benchmark that needs a CUDA GPU (skipped without one)",
    "quick: part of the short subset run by benchmarks/gpu_check.sh",
)

_NOT_RUN: list[dict] = []
_CALIBRATION: dict[str, dict] = {}
_JSON_WRITTEN: list[bool] = []  # set when pytest-benchmark wrote --benchmark-json


def pytest_configure(config):
    for line in MARKERS:
        config.addinivalue_line("markers", line)


def pytest_collect_file(file_path, parent):
    # A path named on the command line is collected by pytest itself whatever its name.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _is_benchmark(item) -> bool:
    path = item.path.resolve()
    return path.name.startswith("bench_") and path.parent == common.REPO / "benchmarks"


def _run_order(item) -> int:
    """Where a case runs, so that a time budget (gpu_check.sh) spends itself on the figures the
    README leads with: the many cheap op cases, then sampling and eager training steps (about
    10 s each on a GPU), the op cases that compile the reference (a compile each), loaders, and
    compiled training steps (minutes each)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    kind = getattr(item.module, "KIND", None)
    if kind == "op":
        return 3 if params.get("provider") == "ref_compiled" else 0
    if kind == "train":
        return 5 if str(params.get("path", "")).startswith("compiled") else 2
    return 1 if kind == "sampling" else 4


def pytest_collection_modifyitems(config, items):
    bench = [i for i in items if _is_benchmark(i)]
    if bench:
        others = [i for i in items if not _is_benchmark(i)]
        items[:] = others + sorted(bench, key=_run_order)  # stable: file order within a rank
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine: not measured on a GPU")
    for item in bench:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _jsonable(value):
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


@pytest.hookimpl(hookwrapper=True)  # the old-style wrapper: any pytest the GPU image may have
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (report.skipped or report.failed) and _is_benchmark(item):
        longrepr = report.longrepr
        if report.failed:  # listed with its error: the summary would otherwise just lack the row
            errors = [line[1:].strip() for line in report.longreprtext.splitlines() if line.startswith("E ")]
            reason = "failed: " + (errors[0] if errors else "see benchmarks.log")[:200]
        else:
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        params = getattr(getattr(item, "callspec", None), "params", {})
        _NOT_RUN.append(
            {
                "name": item.name,
                "fullname": item.nodeid,
                "kind": getattr(item.module, "KIND", None),
                "params": {k: _jsonable(v) for k, v in params.items()},
                "gpu": "gpu" in item.keywords,
                "reason": reason.removeprefix("Skipped: "),
            }
        )


@pytest.fixture(autouse=True)
def _calibrated(request):
    """Measure the copy bandwidth and matmul rate of the case's device once per run."""
    if not _is_benchmark(request.node) or request.config.getoption("benchmark_disable", False):
        return
    device = "cuda" if request.node.get_closest_marker("gpu") else "cpu"
    if device not in _CALIBRATION:
        dev = common.cuda_device() if device == "cuda" else torch.device("cpu")
        _CALIBRATION[device] = common.calibrate(dev)


def _epg_machine_info() -> dict:
    return {**common.environment(), "calibration": dict(_CALIBRATION)}


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["epg"] = _epg_machine_info()


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["epg_not_run"] = list(_NOT_RUN)
    _JSON_WRITTEN.append(True)


def pytest_sessionfinish(session, exitstatus):
    """Write --benchmark-json when pytest-benchmark did not (no case was measured) but cases
    were skipped or failed: their reasons are the run's only result. Runs after the plugin's own
    sessionfinish, a wrapper that saves its JSON first."""
    config = session.config
    path = config.getoption("benchmark_json", None)
    if path is None or _JSON_WRITTEN or not _NOT_RUN:
        return
    data = {"machine_info": {"epg": _epg_machine_info()}, "benchmarks": [],
            "epg_not_run": list(_NOT_RUN)}  # fmt: skip
    path.write_text(json.dumps(data, indent=4))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:  # after pytest-benchmark's "Not saving anything" warning
        reporter.write_line(f"no benchmark case was measured; epg wrote the {len(_NOT_RUN)} cases "
                            f"not run and their reasons to {path} all the same")  # fmt: skip
