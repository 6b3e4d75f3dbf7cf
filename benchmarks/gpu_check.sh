#!/usr/bin/env bash
# The GPU check of epg in one command, sized for one H100/H200 and at most 8 minutes:
#
#   1. build epg._C in place for this GPU's architecture only (setup.py build_ext --inplace,
#      EPG_BUILD_CUDA=1, TORCH_CUDA_ARCH_LIST from the device's compute capability)
#   2. the GPU-marked tests: pytest -m "cuda or triton" tests/ (kernel parity on the GPU)
#   3. the quick benchmark subset: pytest benchmarks -m "quick and gpu" -> benchmarks.json
#   4. benchmarks/report.py -> summary.md and summary.json; a compact table is printed last
#
# Without a GPU (or with EPG_CHECK_CPU_ONLY=1) steps 1 and 2 and the GPU benchmarks are skipped,
# and say so; the CPU cases of the quick subset run instead (with one thread unless
# OMP_NUM_THREADS is set), so CI can run the script end to end in a minute or two.
#
# usage: benchmarks/gpu_check.sh [OUT_DIR]
#   results go to $OUT when set, else OUT_DIR, else ./bench-out: at most 8 files (what the lent
#   GPU machine sends back): steps.tsv, check.log (probe, venv, report), build.log, gpu-tests.log,
#   benchmarks.log, benchmarks.json, summary.md, summary.json
# environment:
#   PYTHON              interpreter (default: .venv/bin/python when present, else python3)
#   EPG_CHECK_BUDGET_S  total seconds to plan for (default 470); later steps shrink to fit
#   EPG_CHECK_CPU_ONLY  1: behave as on a machine without a GPU
#   MAX_JOBS, EPG_NVCC_THREADS   build parallelism (default MAX_JOBS = number of CPUs)
#   EPG_CHECK_TEST_WORKERS  pytest-xdist workers for the GPU tests when xdist is installed (default 8)
#   EPG_GIT_REV         revision to record when the tree has no .git
#   EPG_WHEELS          folder of wheels to install missing test tools or epg dependencies from
#                       (offline, into a venv over the interpreter; default: .whl/ in the repo)
# exit status: 0 when no step failed (skipped steps are not failures), 1 otherwise.

set -uo pipefail

START=$(date +%s)
BUDGET=${EPG_CHECK_BUDGET_S:-470}
DEADLINE=$((START + BUDGET))
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

OUT_DIR=${OUT:-${1:-./bench-out}}
mkdir -p "$OUT_DIR" || { echo "gpu_check: cannot create $OUT_DIR" >&2; exit 1; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$ROOT" || exit 1

STEPS="$OUT_DIR/steps.tsv"
: > "$STEPS"
FAILED=0

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }
left() { echo $((DEADLINE - $(date +%s))); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
step() {  # step NAME STATUS DETAIL (one TSV line: tabs in DETAIL become spaces)
    printf '%s\t%s\t%s\n' "$1" "$2" "${3//$'\t'/ }" >> "$STEPS"
    say "$1: $2${3:+ ($3)}"
    if [ "$2" = "failed" ]; then FAILED=1; fi
}
pytest_summary() {  # the last "N passed, M skipped ..." line of a pytest log
    grep -E '[0-9]+ (passed|failed|skipped|error|errors|deselected)' "$1" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//'
}
run_limited() {  # run_limited SECONDS LOG CMD...: SIGINT at the limit (pytest still writes its
    local limit=$1 log=$2  # results), SIGKILL 10 s later
    shift 2
    timeout -s INT -k 10 "$limit" "$@" > "$log" 2>&1
}

# --- interpreter and environment -------------------------------------------------------------------
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=$(command -v python3 || command -v python); fi
if [ "${EPG_CHECK_CPU_ONLY:-0}" = "1" ]; then
    export CUDA_VISIBLE_DEVICES=""
fi
export PYTHONDONTWRITEBYTECODE=1

CHECK_LOG="$OUT_DIR/check.log"  # the small logs: interpreter probe, venv, report
PROBE=$("$PY" - <<'EOF' 2>"$CHECK_LOG"
import torch
gpu = torch.cuda.is_available()
arch = ""
if gpu:
    major, minor = torch.cuda.get_device_capability(0)
    arch = f"{major}.{minor}" + ("a" if major >= 9 else "")  # sm_90a etc.: the full feature set
print(f"{int(gpu)} {arch or '-'} {torch.__version__} {torch.version.cuda or '-'}")
print(torch.cuda.get_device_name(0) if gpu else "no GPU")
EOF
)
if [ -z "$PROBE" ]; then
    step "environment" "failed" "$PY cannot import torch (see check.log)"
    exit 1
fi
read -r HAVE_GPU ARCH TORCH_V CUDA_V <<< "$(echo "$PROBE" | head -n 1)"
GPU_NAME=$(echo "$PROBE" | sed -n 2p)

# epg_kernels is the installed name of kernels/; an uninstalled tree gets it through a link.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import epg_kernels" 2>/dev/null; then
    SHIM=$(mktemp -d)
    ln -s "$ROOT/kernels" "$SHIM/epg_kernels"
    export PYTHONPATH="$PYTHONPATH:$SHIM"
fi

# What the tests and benchmarks import: from the interpreter, else from local wheels (offline).
missing_modules() {  # pip names of the missing modules; $1 = required | optional
    "$PY" - "$1" <<'EOF'
import importlib.util, sys
required = {"pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "numpy": "numpy",
            "PIL": "pillow", "safetensors": "safetensors", "tqdm": "tqdm", "scipy": "scipy",
            "sklearn": "scikit-learn", "yaml": "pyyaml"}
optional = {"pytest_timeout": "pytest-timeout"}
names = required if sys.argv[1] == "required" else optional
print(" ".join(pip for mod, pip in names.items() if importlib.util.find_spec(mod) is None))
EOF
}
MISSING="$(missing_modules required) $(missing_modules optional)"
WHEELS=${EPG_WHEELS:-$ROOT/.whl}
if [ -n "${MISSING// /}" ] && [ -d "$WHEELS" ]; then
    VENV=$(mktemp -d)/venv
    if "$PY" -m venv --system-site-packages "$VENV" >> "$CHECK_LOG" 2>&1 &&
        "$VENV/bin/python" -m pip install --no-index --find-links "$WHEELS" $MISSING \
            >> "$CHECK_LOG" 2>&1; then
        PY="$VENV/bin/python"
        say "installed $MISSING from $WHEELS into $VENV"
    fi
fi
NOT_INSTALLED=$(missing_modules required)
if [ "$HAVE_GPU" = "1" ]; then
    step "environment" "ok" "$GPU_NAME, torch $TORCH_V, CUDA $CUDA_V, arch $ARCH, python $PY"
else
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    step "environment" "ok" "no GPU: GPU steps skipped; torch $TORCH_V, CPU cases with OMP_NUM_THREADS=$OMP_NUM_THREADS"
fi
if [ -n "$NOT_INSTALLED" ]; then
    step "environment" "failed" "missing $NOT_INSTALLED (no network here: put wheels in EPG_WHEELS)"
fi

# --- 1. the extension for this GPU ------------------------------------------------------------------
if [ "$HAVE_GPU" != "1" ]; then
    if "$PY" -c "from epg import _C" 2>/dev/null; then DETAIL="the existing epg._C imports"; else DETAIL="no epg._C: reference paths"; fi
    step "build CUDA extension" "skipped" "no GPU; $DETAIL"
else
    LIMIT=$(min 240 $(( $(left) - 200 )))
    say "building epg._C for sm_${ARCH//./} (limit ${LIMIT}s, log build.log)"
    T0=$(date +%s)
    if [ "$LIMIT" -gt 30 ] && run_limited "$LIMIT" "$OUT_DIR/build.log" env EPG_BUILD_CUDA=1 \
        TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace &&
        "$PY" -c "from epg import _C; assert _C.WITH_CUDA, 'built without CUDA'" >> "$OUT_DIR/build.log" 2>&1; then
        step "build CUDA extension" "ok" "TORCH_CUDA_ARCH_LIST=$ARCH in $(( $(date +%s) - T0 ))s"
    else
        step "build CUDA extension" "failed" "see build.log (last line: $(tail -n 1 "$OUT_DIR/build.log" 2>/dev/null | cut -c1-160))"
    fi
fi

# --- 2. GPU-marked tests -----------------------------------------------------------------------------
if [ "$HAVE_GPU" != "1" ]; then
    step "GPU tests (cuda, triton)" "skipped" "no GPU"
elif [ -n "$NOT_INSTALLED" ]; then
    step "GPU tests (cuda, triton)" "failed" "missing $NOT_INSTALLED"
elif [ $(( $(left) - 170 )) -lt 30 ]; then
    step "GPU tests (cuda, triton)" "skipped" "time budget: $(left)s left, kept for the benchmarks"
else
    LIMIT=$(min 200 $(( $(left) - 170 )))
    # On a fresh machine every Triton test compiles its kernels' specialisations on first use, one
    # after another in one process; pytest-xdist (in the GPU image) spreads them over workers.
    WORKERS=()
    if "$PY" -c "import xdist" 2>/dev/null; then WORKERS=(-n "${EPG_CHECK_TEST_WORKERS:-8}"); fi
    say "GPU tests: pytest -m 'cuda or triton' tests ${WORKERS[*]} (limit ${LIMIT}s, log gpu-tests.log)"
    run_limited "$LIMIT" "$OUT_DIR/gpu-tests.log" "$PY" -m pytest tests -m "cuda or triton" -q \
        -p no:cacheprovider "${WORKERS[@]}"
    RC=$?
    SUMMARY=$(pytest_summary "$OUT_DIR/gpu-tests.log")
    case $RC in
        0) step "GPU tests (cuda, triton)" "ok" "$SUMMARY" ;;
        5) step "GPU tests (cuda, triton)" "failed" "no test collected" ;;
        124|130|137) step "GPU tests (cuda, triton)" "failed" "stopped at the ${LIMIT}s limit: $SUMMARY" ;;
        *) step "GPU tests (cuda, triton)" "failed" "$SUMMARY (see gpu-tests.log)" ;;
    esac
fi

# --- 3. quick benchmark subset ---------------------------------------------------------------------
if [ -n "$NOT_INSTALLED" ]; then
    step "benchmarks (quick)" "failed" "missing $NOT_INSTALLED"
else
    if [ "$HAVE_GPU" = "1" ]; then MARK="quick and gpu"; else MARK="quick"; fi
    LIMIT=$(( $(left) - 20 ))
    if [ "$LIMIT" -lt 30 ]; then LIMIT=30; fi
    say "benchmarks: pytest benchmarks -m '$MARK' (limit ${LIMIT}s, log benchmarks.log)"
    rm -f "$OUT_DIR/benchmarks.json"
    run_limited "$LIMIT" "$OUT_DIR/benchmarks.log" env EPG_BENCH_QUICK=1 \
        EPG_BENCH_DEADLINE=$(( $(date +%s) + LIMIT - 15 )) "$PY" -m pytest benchmarks -m "$MARK" -q \
        -p no:cacheprovider -o addopts="" -rs --benchmark-json="$OUT_DIR/benchmarks.json" \
        --benchmark-columns=median,rounds,iterations
    RC=$?
    SUMMARY=$(pytest_summary "$OUT_DIR/benchmarks.log")
    NOTE=""
    if [ "$HAVE_GPU" != "1" ]; then NOTE="; GPU cases skipped: no GPU"; fi
    case $RC in
        0) step "benchmarks (quick)" "ok" "$SUMMARY$NOTE" ;;
        124|130|137) step "benchmarks (quick)" "failed" "stopped at the ${LIMIT}s limit: $SUMMARY" ;;
        *) step "benchmarks (quick)" "failed" "$SUMMARY (see benchmarks.log)" ;;
    esac
fi

# --- 4. report ---------------------------------------------------------------------------------------
say "report: summary.md, summary.json"
if ! "$PY" benchmarks/report.py "$OUT_DIR/benchmarks.json" --steps "$STEPS" \
    --markdown "$OUT_DIR/summary.md" --summary-json "$OUT_DIR/summary.json" 2>> "$CHECK_LOG"; then
    step "report" "failed" "see check.log"
fi
say "done in $(( $(date +%s) - START ))s; results in $OUT_DIR"
echo
"$PY" benchmarks/report.py "$OUT_DIR/benchmarks.json" --steps "$STEPS" --compact 2>/dev/null
exit $FAILED
