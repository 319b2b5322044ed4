#!/usr/bin/env bash
# Issue #18: the CPU extension's tests under AddressSanitizer + UndefinedBehaviorSanitizer.
# Builds mada_fused (CPU extension only) with MADA_SANITIZE=address,undefined into a
# temporary build tree, then runs the CPU-backend and call-interface tests against that
# build (from outside the source tree, so the build is what imports) with the sanitizer
# runtimes preloaded (python itself is not instrumented). Any report fails the job:
# UBSan halts on its first finding, ASan always does.
#
#   PYTHON      interpreter with torch and pytest (default: python3)
#   MAX_JOBS    parallel compile jobs (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
CXX=${CXX:-g++}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mada-sanitize.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
step() { echo "== [$((SECONDS - START))s] $*"; }

step "build with MADA_SANITIZE=address,undefined (CPU extension only)"
if ! MADA_SANITIZE=address,undefined MADA_BUILD_CUDA=0 "$PY" setup.py -q build --build-base "$WORK/build" \
        >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log"
    echo "sanitized build FAILED" >&2
    exit 1
fi
LIB=$(ls -d "$WORK"/build/lib.*)

step "tests/test_cpu_backend.py tests/test_abi.py under ASan + UBSan"
PY=$("$PY" -c 'import sys; print(sys.executable)')  # absolute: the tests run from $WORK
RUNTIME="$("$CXX" -print-file-name=libasan.so) $("$CXX" -print-file-name=libubsan.so)"
(
    cd "$WORK"  # not the source tree: `python -m` puts the working directory first on sys.path
    # Python and torch leak by design at exit; every UBSan finding is fatal; the
    # interpreter is not instrumented, so ASan must not insist on being first.
    export LD_PRELOAD="$RUNTIME" PYTHONPATH="$LIB"
    export ASAN_OPTIONS=detect_leaks=0:verify_asan_link_order=0:abort_on_error=1
    export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
    # Only _C_cpu is built here: a _C_cuda found elsewhere (an editable install) is not this build's.
    exec "$PY" -m pytest -q -p no:cacheprovider -k "not _C_cuda" \
        "$ROOT/tests/test_cpu_backend.py" "$ROOT/tests/test_abi.py"
)
step "sanitizer job passed"
