"""Packaging: pyproject.toml lists every package (so a non-editable install ships all of epg),
and setup.py compiles the extension with the flags its kernels need."""

import os
import runpy
import shutil
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUILD_SWITCHES = ("EPG_SKIP_EXT", "EPG_REQUIRE_EXT", "EPG_OPENMP")  # cleared: setup.py's defaults


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "epg").rglob("__init__.py")
    }
    assert found <= listed, f"missing from pyproject.toml: {sorted(found - listed)}"
    assert config["package-dir"]["epg_kernels"] == "kernels" and "epg_kernels" in listed


def run_setup(monkeypatch, **env):
    """setup.py's globals and the arguments it passes to setuptools.setup(), building nothing."""
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.setenv("EPG_BUILD_CUDA", "0")  # the CPU extension: no CUDA toolkit needed
    for name in BUILD_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    namespace = runpy.run_path(str(ROOT / "setup.py"), run_name="epg_setup_under_test")
    if not captured.get("ext_modules"):
        pytest.skip("setup.py plans no extension here (no torch or no C++ compiler)")
    (ext,) = captured["ext_modules"]
    return namespace, ext


def fake_torch(backend):
    info = f"ATen parallel backend: {backend}\n"
    return types.SimpleNamespace(__config__=types.SimpleNamespace(parallel_info=lambda: info))


def test_cpu_kernels_are_compiled_with_openmp_where_torch_threads_with_it(monkeypatch):
    """at::parallel_for is inlined into the extension: without -fopenmp it runs on one thread."""
    if not sys.platform.startswith("linux"):
        pytest.skip("OpenMP is only switched on for Linux builds")
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch's ATen does not run on OpenMP")
    namespace, ext = run_setup(monkeypatch)
    assert "-fopenmp" in ext.extra_compile_args["cxx"]
    assert ext.extra_link_args == namespace["_openmp_link_args"](torch)
    _, ext = run_setup(monkeypatch, EPG_OPENMP="0")
    assert "-fopenmp" not in ext.extra_compile_args["cxx"] and "-fopenmp" not in ext.extra_link_args


def test_openmp_is_refused_or_skipped_where_torch_does_not_thread_with_it(monkeypatch):
    namespace, _ = run_setup(monkeypatch)
    use_openmp = namespace["_use_openmp"]
    assert use_openmp(fake_torch("native thread pool")) is False
    monkeypatch.setenv("EPG_OPENMP", "1")
    with pytest.raises(SystemExit, match="EPG_OPENMP=1 needs Linux"):
        use_openmp(fake_torch("native thread pool"))
    monkeypatch.setenv("EPG_OPENMP", "0")
    assert use_openmp(fake_torch("OpenMP")) is False
    monkeypatch.setenv("EPG_OPENMP", "sometimes")
    with pytest.raises(SystemExit, match="EPG_OPENMP='sometimes' is not a boolean"):
        use_openmp(fake_torch("OpenMP"))
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv("EPG_OPENMP")
    assert use_openmp(fake_torch("OpenMP")) is False


def test_the_extension_links_the_openmp_runtime_torch_ships(monkeypatch, tmp_path):
    """By path, renamed or not (a second runtime would have its own thread pool); the compiler's
    only where torch ships none (it then uses the system's, the same one)."""
    namespace, _ = run_setup(monkeypatch)
    link_args = namespace["_openmp_link_args"]
    package = tmp_path / "site-packages" / "torch"
    (package / "lib").mkdir(parents=True)
    fake = types.SimpleNamespace(__file__=str(package / "__init__.py"))
    assert link_args(fake) == ["-fopenmp"]
    renamed = tmp_path / "site-packages" / "torch.libs" / "libgomp-a34b3233.so.1.0.0"
    renamed.parent.mkdir()
    renamed.write_bytes(b"")
    assert link_args(fake) == [str(renamed)]
    (package / "lib" / "libgomp.so.1").write_bytes(b"")
    assert link_args(fake) == [str(package / "lib" / "libgomp.so.1")]
    bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    if bundled:  # this torch's own copy
        assert link_args(torch) == [str(bundled[0])]


def test_a_build_failing_on_openmp_says_how_to_build_without_it(tmp_path):
    """A compiler without OpenMP support fails on -fopenmp; the optional build then installs no
    extension, and its warning must name the switch that builds one anyway."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch's ATen does not run on OpenMP")
    if not sys.platform.startswith("linux") or shutil.which("c++") is None:
        pytest.skip("needs Linux and a C++ compiler")
    shutil.copy(ROOT / "setup.py", tmp_path)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    cxx = tmp_path / "cxx-without-openmp"
    refused = tmp_path / "refused-fopenmp"
    cxx.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && touch {refused} && exit 1; '
                   f'done\nexec {shutil.which("c++")} "$@"\n')  # fmt: skip
    cxx.chmod(0o755)
    env = {**os.environ, "CXX": str(cxx), "EPG_BUILD_CUDA": "0", "MAX_JOBS": "1"}
    for name in BUILD_SWITCHES:
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert refused.exists(), "the build failed before it reached -fopenmp"
    assert "building the native extension epg._C failed" in proc.stderr
    assert "EPG_OPENMP=0 builds the CPU kernels single-threaded" in proc.stderr
    assert not list(tmp_path.rglob("_C*.so"))
    # A required extension fails the build, with the same hint on its error.
    refused.unlink()
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                          env={**env, "EPG_REQUIRE_EXT": "1"}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode != 0 and refused.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "EPG_OPENMP=0 builds the CPU kernels single-threaded" in proc.stderr
