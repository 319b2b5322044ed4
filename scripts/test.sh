#!/usr/bin/env bash
# The test command: set up the environment, run the test suite, the CPU extension's tests
# under ASan + UBSan, the wheel smoke job, then the CUDA-on-CPU driver under the sanitizers.
# Each job prints how long it took (CI must stay under 15 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
job() {
  local t=$SECONDS
  "$@"
  local rc=$?
  echo "== job '$*' took $((SECONDS - t)) s (rc $rc)"
  return $rc
}
job bash scripts/setup_env.sh || exit 1
. .venv/bin/activate
job python -m pytest tests -q -ra
rc=$?
# pytest exits 5 when it collected nothing; that is a broken suite here, not a pass.
[ $rc -eq 0 ] || exit $rc
job bash .ci/sanitize_cpu.sh || exit 1
job bash .ci/wheel_smoke.sh || exit 1
job bash .ci/cuda_on_cpu_sanitize.sh || exit 1
echo "== all jobs passed in $SECONDS s"
