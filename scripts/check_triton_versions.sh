#!/usr/bin/env bash
# Runs the Triton kernel tests under the interpreter with each Triton release the project supports
# (3.6 is the GPU image's, 3.8 the dev venv's, 3.9 the newest), each installed into a folder of its
# own under ${EPG_TRITON_CACHE:-/tmp/epg-triton-versions} and put first on PYTHONPATH. Needs PyPI.
# Triton 3.6's interpreter converts 1-element arrays with int(), which NumPy 2.4 refuses, so it runs
# beside NumPy 2.2 (the interpreter only; compiled GPU kernels do not use NumPy).
#
#   bash scripts/check_triton_versions.sh [PYTHON]      (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
CACHE=${EPG_TRITON_CACHE:-/tmp/epg-triton-versions}
mkdir -p "$CACHE"

install() {  # install NAME==VERSION into $CACHE/NAME-VERSION unless already there
    local dir="$CACHE/${1/==/-}"
    [ -d "$dir" ] || "$PY" -m pip install -q --no-deps --target "$dir" "$1" >&2
    echo "$dir"
}

status=0
for version in 3.6.0 3.8.0 3.9.0; do
    path=$(install "triton==$version")
    [ "$version" = 3.6.0 ] && path="$path:$(install numpy==2.2.6)"
    echo "== Triton $version"
    if ! PYTHONPATH="$path" TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_triton_*.py 2>&1 | tail -n 3; then
        status=1
    fi
done
exit $status
