"""Builds the optional native extension ``epg._C`` (and nothing else).

Project metadata and package discovery live in pyproject.toml; this file only
adds ``ext_modules`` and the ``build_ext`` command. Install with

    pip install --no-build-isolation -e .

so that the build can import the torch you will run with (the extension is
compiled against its headers and ABI). Without the extension, epg falls back
to its PyTorch reference implementations.

What gets built
  * C++ CPU kernels (csrc/**/*.cpp) whenever a C++ compiler is found.
  * CUDA kernels (csrc/**/*.cu) too when torch is a CUDA build and nvcc is found
    (auto mode). If that build fails, it is retried CPU-only with a warning.

Environment variables
  EPG_SKIP_EXT=1         build no extension at all.
  EPG_BUILD_CUDA=1       require the CUDA kernels: any failure is an error.
  EPG_BUILD_CUDA=0       never build the CUDA kernels.
  EPG_REQUIRE_EXT=1      a failed (CPU-only) build is an error, not a warning.
  EPG_NVCC_THREADS=N     nvcc --threads (default 2).
  EPG_CUDA_LINEINFO=1    add -lineinfo (for profilers / compute-sanitizer).
  EPG_OPENMP=0           compile the CPU kernels without -fopenmp (they then run on one
                         thread); default on Linux when torch's ATen runs on OpenMP.
  TORCH_CUDA_ARCH_LIST   target GPUs, default "8.0;9.0a" (A100, H100/H200).
  MAX_JOBS               parallel compile jobs (read by torch's ninja build).
  CUDA_HOME              CUDA toolkit holding bin/nvcc (torch's usual lookup).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
EXT_NAME = "epg._C"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a"
DEFAULT_NVCC_THREADS = 2

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env_flag(name):
    """True / False for a set boolean variable, None when unset or empty."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return None
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise SystemExit(f"epg setup.py: {name}={os.environ[name]!r} is not a boolean; use 1 or 0")


def _env_int(name, default):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"epg setup.py: {name}={raw!r} is not an integer") from None
    if value < 1:
        raise SystemExit(f"epg setup.py: {name}={raw!r} must be >= 1")
    return value


def _info(msg):
    print(f"epg setup.py: {msg}", file=sys.stderr, flush=True)


def _warn(msg):
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (epg setup.py): {msg}\n{bar}\n", file=sys.stderr, flush=True)


def _sources(pattern):
    """Paths (relative to setup.py, '/'-separated, sorted) under csrc/ matching pattern."""
    found = glob.glob(os.path.join(ROOT, CSRC, "**", pattern), recursive=True)
    return sorted(os.path.relpath(p, ROOT).replace(os.sep, "/") for p in found)


def _have_cxx_compiler():
    # torch's ninja backend compiles with $CXX (default c++, cl on Windows).
    default = "cl" if os.name == "nt" else "c++"
    cxx = os.environ.get("CXX", "").strip() or default
    return shutil.which(cxx.split()[0]) is not None


class _Plan:
    """What to build, decided once from the environment and the installed torch."""

    def __init__(self):
        self.skip = bool(_env_flag("EPG_SKIP_EXT"))
        self.cuda_request = _env_flag("EPG_BUILD_CUDA")  # None = auto
        self.require = bool(_env_flag("EPG_REQUIRE_EXT")) or self.cuda_request is True
        self.cuda = False
        self.nvcc = None
        self.torch = None
        self.openmp = False

    def decide(self):
        if self.skip:
            _info("EPG_SKIP_EXT=1: not building the native extension epg._C")
            return False
        try:
            import torch  # noqa: F401
            import torch.utils.cpp_extension as cpp_ext
        except Exception as exc:  # ImportError, or a broken torch install
            msg = (
                f"torch is not importable at build time ({type(exc).__name__}: {exc}), so "
                "the native extension epg._C is NOT built and epg will use its slower PyTorch "
                "reference paths. Install torch first and build with "
                "`pip install --no-build-isolation ...` so the build sees it."
            )
            if self.require:
                raise SystemExit(f"epg setup.py: {msg}") from exc
            _warn(msg)
            return False
        self.torch = torch

        if not _have_cxx_compiler():
            msg = "no C++ compiler found ($CXX / c++); the native extension epg._C is not built."
            if self.require:
                raise SystemExit(f"epg setup.py: {msg}")
            _warn(msg)
            return False

        self.openmp = _use_openmp(torch)
        torch_cuda = torch.version.cuda
        want_cuda = bool(torch_cuda) and self.cuda_request is not False
        cuda_home = _resolve_cuda_home(cpp_ext) if want_cuda else None
        nvcc = _nvcc_path(cuda_home) if cuda_home else None
        have_nvcc = nvcc is not None

        if self.cuda_request is False:
            _info("EPG_BUILD_CUDA=0: building the CPU kernels only")
        elif self.cuda_request is True:
            if not torch_cuda:
                raise SystemExit(
                    "epg setup.py: EPG_BUILD_CUDA=1 but the installed torch "
                    f"{torch.__version__} is not a CUDA build (torch.version.cuda is None)"
                )
            if not have_nvcc:
                raise SystemExit(
                    "epg setup.py: EPG_BUILD_CUDA=1 but nvcc was not found "
                    f"(CUDA_HOME={cpp_ext.CUDA_HOME!r}); set CUDA_HOME to a CUDA toolkit"
                )
            self.cuda = True
        elif torch_cuda and have_nvcc:
            self.cuda = True
        else:
            if not torch_cuda:
                why = "torch is a CPU-only build"
            else:
                why = f"no CUDA toolkit found (CUDA_HOME={cpp_ext.CUDA_HOME!r})"
            _info(f"building the CPU kernels only: {why}")
        if self.cuda:
            self.nvcc = nvcc
            if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
            _info(
                f"building CPU + CUDA kernels (torch {torch.__version__}, CUDA {torch_cuda}, "
                f"nvcc {nvcc}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r}, "
                f"MAX_JOBS={os.environ.get('MAX_JOBS', '<unset: ninja default>')})"
            )
        return True


def _use_openmp(torch):
    """Whether to compile the C++ kernels with -fopenmp.

    at::parallel_for is a header template: with torch's OpenMP backend it is a
    `#pragma omp parallel` region, compiled into *this* extension, so without
    -fopenmp it silently runs its whole range on the calling thread. The
    extension must use torch's OpenMP runtime (see _openmp_link_args) so that
    both share one thread pool and torch.set_num_threads.
    Linux only: macOS clang needs a separate libomp and Windows another flag.
    """
    request = _env_flag("EPG_OPENMP")
    if request is False:
        _info("EPG_OPENMP=0: the C++ CPU kernels are compiled without OpenMP (one thread)")
        return False
    backend_openmp = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    if not sys.platform.startswith("linux") or not backend_openmp:
        if request:
            raise SystemExit(
                "epg setup.py: EPG_OPENMP=1 needs Linux and a torch whose ATen parallel "
                f"backend is OpenMP (platform {sys.platform!r}, OpenMP backend {backend_openmp})"
            )
        return False
    return True


def _openmp_link_args(torch):
    """Link the OpenMP runtime torch ships, by path, else the compiler's (-fopenmp).

    A wheel's copy may be renamed (libgomp-<hash>.so.1 under torch.libs/, as
    auditwheel does); linking the compiler's libgomp.so.1 next to it would load
    a second runtime with its own thread pool, deaf to torch.set_num_threads.
    Linked by path, the extension needs the soname torch already loaded.
    """
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    for folder in (os.path.join(torch_dir, "lib"), torch_dir + ".libs"):
        found = sorted(glob.glob(os.path.join(folder, "libgomp*.so*")))
        if found:
            return [found[0]]
    return ["-fopenmp"]


def _nvcc_path(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc.exe" if os.name == "nt" else "nvcc")
    return nvcc if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK) else None


def _is_cuda_toolkit(cuda_home):
    return bool(cuda_home) and _nvcc_path(cuda_home) is not None and os.path.isfile(
        os.path.join(cuda_home, "include", "cuda_runtime.h")
    )


def _resolve_cuda_home(cpp_ext):
    """The CUDA toolkit root torch's build will use, or None.

    torch guesses CUDA_HOME from $CUDA_HOME / $CUDA_PATH, else from the parent of
    `which nvcc`, else /usr/local/cuda. The second guess is wrong when nvcc on PATH
    is a wrapper script (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local, which has
    no CUDA headers or libraries). If the guess is not a toolkit and the user did
    not set CUDA_HOME / CUDA_PATH, fall back to /usr/local/cuda and point torch at it.
    """
    guess = cpp_ext.CUDA_HOME
    if _is_cuda_toolkit(guess):
        return guess
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        _info(f"CUDA_HOME={guess!r} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h)")
        return None
    fallback = "/usr/local/cuda" if os.name != "nt" else None
    if fallback and _is_cuda_toolkit(fallback):
        _info(
            f"torch guessed CUDA_HOME={guess!r}, which is not a CUDA toolkit; using {fallback!r} "
            "instead (set CUDA_HOME to choose another one)"
        )
        cpp_ext.CUDA_HOME = fallback
        os.environ["CUDA_HOME"] = fallback
        return fallback
    return guess if guess and _nvcc_path(guess) else None


def _nvidia_wheel_include_dirs(torch):
    """Headers of the nvidia-* pip wheels torch depends on.

    A minimal CUDA toolkit (e.g. only nvcc + cudart) lacks cuBLAS/cuSPARSE
    headers that torch's CUDA headers include (cusparse.h via
    ATen/cuda/CUDAContextLight.h); the pip wheels ship them under
    site-packages/nvidia/cu<major>/include (CUDA 13 layout) or
    site-packages/nvidia/<lib>/include (CUDA 12 layout).
    """
    try:
        import nvidia  # namespace package from the nvidia-* wheels
    except ImportError:
        return []
    major = (torch.version.cuda or "").split(".")[0]
    dirs = []
    for base in list(getattr(nvidia, "__path__", [])):
        combined = os.path.join(base, f"cu{major}", "include")
        if major and os.path.isdir(combined):
            dirs.append(combined)
        else:
            dirs.extend(sorted(glob.glob(os.path.join(base, "*", "include"))))
    return dirs


def _make_extension(plan, with_cuda):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp_sources = _sources("*.cpp")
    headers = _sources("*.h") + _sources("*.cuh")
    is_msvc = os.name == "nt"
    # No contraction into fused multiply-adds: the C++ twins must round like the CUDA kernels
    # (csrc/numerics.h), also where GCC contracts by default (aarch64, -march=native).
    cxx_flags = ["/O2", "/fp:precise"] if is_msvc else ["-O3", "-ffp-contract=off"]
    kwargs = dict(
        name=EXT_NAME,
        include_dirs=[os.path.join(ROOT, CSRC)],
        depends=headers,
    )
    if plan.openmp:
        cxx_flags.append("-fopenmp")
        kwargs["extra_link_args"] = _openmp_link_args(plan.torch)
    if not with_cuda:
        return CppExtension(sources=cpp_sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)

    # Note: torch drops its -gencode flags if any nvcc flag contains "arch".
    nvcc_flags = ["-O3", f"--threads={_env_int('EPG_NVCC_THREADS', DEFAULT_NVCC_THREADS)}"]
    if _env_flag("EPG_CUDA_LINEINFO"):
        nvcc_flags.append("-lineinfo")
    ext = CUDAExtension(
        sources=cpp_sources + _sources("*.cu"),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        define_macros=[("EPG_WITH_CUDA", "1")],
        **kwargs,
    )
    # Appended after the toolkit's own include dir so that the toolkit headers win and
    # the wheels only fill in what is missing (see _nvidia_wheel_include_dirs).
    for d in _nvidia_wheel_include_dirs(plan.torch):
        if d not in ext.include_dirs:
            ext.include_dirs.append(d)
    return ext


def _make_build_ext(plan):
    from torch.utils.cpp_extension import BuildExtension

    _missing = object()

    class EpgBuildExt(BuildExtension):
        """torch's BuildExtension plus: CUDA -> CPU-only fallback, optional extension."""

        def _compiler_state(self):
            # BuildExtension monkey-patches the compiler's compile methods on every call
            # of build_extensions(); restore them before a retry so they are not wrapped twice.
            keys = ("compile", "_compile", "spawn")
            return {k: self.compiler.__dict__.get(k, _missing) for k in keys}

        def _restore_compiler(self, state):
            for key, value in state.items():
                if value is _missing:
                    self.compiler.__dict__.pop(key, None)
                else:
                    self.compiler.__dict__[key] = value

        def _index(self):
            for i, ext in enumerate(self.extensions):
                if ext.name == EXT_NAME:
                    return i
            return None

        def build_extensions(self):
            state = self._compiler_state()
            try:
                super().build_extensions()
                return
            except Exception as exc:  # CompileError, LinkError, RuntimeError from ninja, ...
                error = exc
            idx = self._index()
            if idx is None:
                raise error
            if plan.cuda and plan.cuda_request is None:
                _warn(
                    "building the CUDA kernels of epg._C failed "
                    f"({type(error).__name__}: {error}); retrying with the CPU kernels only. "
                    "On CUDA tensors epg will use its PyTorch reference paths. Set "
                    "EPG_BUILD_CUDA=1 to make this an error, or EPG_BUILD_CUDA=0 to skip the "
                    "CUDA attempt."
                )
                self._restore_compiler(state)
                # Update in place: setuptools' finalize_options() put private attributes
                # (_full_name, _needs_stub, ...) on the original object.
                vars(self.extensions[idx]).update(vars(_make_extension(plan, with_cuda=False)))
                try:
                    super().build_extensions()
                    _info("built epg._C with the CPU kernels only (CUDA build failed, see above)")
                    return
                except Exception as exc:
                    error = exc
            openmp_hint = (" A compiler without OpenMP support fails on -fopenmp: EPG_OPENMP=0 "
                           "builds the CPU kernels single-threaded." if plan.openmp else "")
            if plan.require:
                if openmp_hint:
                    error.add_note(f"epg setup.py:{openmp_hint}")
                raise error
            _warn(
                f"building the native extension epg._C failed ({type(error).__name__}: {error}); "
                "installing without it. epg will use its PyTorch reference paths. Set "
                "EPG_REQUIRE_EXT=1 to make this an error." + openmp_hint
            )
            # Also removes it from distribution.ext_modules (same list), so that
            # install / editable_wheel do not look for the missing library.
            del self.extensions[idx]

    return EpgBuildExt


def _extension_config():
    plan = _Plan()
    if not plan.decide():
        return {}
    return {
        "ext_modules": [_make_extension(plan, with_cuda=plan.cuda)],
        "cmdclass": {"build_ext": _make_build_ext(plan)},
    }


setup(**_extension_config())
