#!/usr/bin/env bash
# The CUDA kernels on the CPU under the sanitizers (tests/native/cuda_on_cpu_driver):
#  1. AddressSanitizer + UndefinedBehaviorSanitizer (alignment checks included),
#  2. ThreadSanitizer.
# Each build runs the driver's checks (the ASan one through pytest: tests/test_cuda_on_cpu.py's
# native_driver tests, which also compare its conversions with torch's), which must pass with
# no report, then the planted bugs, each of which its sanitizer must report:
#   overrun     a segment one element longer than its state (index off by one)  ASan
#   misaligned  the 16-byte vector path on a misaligned pointer                  UBSan
#   no-sync     __syncthreads() removed                                           TSan
#   .ci/cuda_on_cpu_sanitize.sh [WORKDIR]
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if ! command -v "${CXX:-g++}" >/dev/null; then
  echo "cuda_on_cpu_sanitize: skipped: no C++ compiler (${CXX:-g++})"
  exit 0
fi
if [ $# -ge 1 ]; then
  work=$1
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
status=0
fail() { echo "cuda_on_cpu_sanitize: FAIL: $*"; status=1; }

# clean_run NAME CMD...: must pass with no sanitizer report.
# planted_run NAME PATTERN CMD...: must fail with a report matching PATTERN.
clean_run() {
  local name=$1; shift
  local log="$work/$name.log" t=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  echo "  $name: rc=$rc, $((SECONDS - t)) s"
  if [ $rc -ne 0 ] || grep -q "Sanitizer\|runtime error" "$log"; then
    tail -40 "$log"
    fail "$name: the driver failed or a sanitizer reported"
  fi
}
planted_run() {
  local name=$1 pattern=$2; shift 2
  local log="$work/$name.log" t=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  echo "  $name: rc=$rc, $((SECONDS - t)) s"
  if [ $rc -eq 0 ] || ! grep -q "$pattern" "$log"; then
    tail -40 "$log"
    fail "$name: the sanitizer did not report the planted bug ($pattern)"
  fi
}

TIMEFORMAT="  build: %0R s (CPU %0U s user, %0S s sys)"
# -O0: the sanitizers see the same accesses, and the 16 kernel files (one per storage
# combination) compile 3.3x faster than at -O1 (14.1 s -> 4.3 s for a bf16-state file).
echo "ASan + UBSan:"
time "$root/tests/native/build_driver.sh" "$work/asan" -O0 -fno-omit-frame-pointer \
  -fsanitize=address,undefined -fno-sanitize-recover=all || fail "ASan/UBSan build"
drv="$work/asan/cuda_on_cpu_driver"
if [ -x "$drv" ]; then
  export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1
  # The driver's checks, and its conversions against torch's: tests/test_cuda_on_cpu.py's
  # native_driver tests on this build (scripts/test.sh's test suite leaves them to this job).
  clean_run asan env MADA_CUDA_ON_CPU_DRIVER="$drv" "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider \
    -m native_driver "$root/tests/test_cuda_on_cpu.py"
  planted_run asan-overrun "AddressSanitizer: heap-buffer-overflow" "$drv" --plant overrun
  planted_run ubsan-misaligned "misaligned address [^ ]* for type '[a-z ]*uint4'" "$drv" --plant misaligned
fi

echo "TSan:"
time "$root/tests/native/build_driver.sh" "$work/tsan" -O0 -fsanitize=thread || fail "TSan build"
drv="$work/tsan/cuda_on_cpu_driver"
if [ -x "$drv" ]; then
  TSAN_OPTIONS=halt_on_error=1 clean_run tsan "$drv"
  TSAN_OPTIONS=halt_on_error=1 planted_run tsan-no-sync "ThreadSanitizer: data race" "$drv" --plant no-sync
fi
exit $status
