#!/usr/bin/env bash
# The test command: set up the environment, run the test suite, the CPU extension's tests
# under ASan + UBSan, the wheel smoke job, and the CUDA-on-CPU driver under the sanitizers.
# Each job prints how long it took (CI must stay under 15 minutes). The other jobs run
# beside the test suite, which keeps only about one of CI's two cores busy.
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
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
pids=()
for script in .ci/sanitize_cpu.sh .ci/cuda_on_cpu_sanitize.sh .ci/wheel_smoke.sh; do
  job bash "$script" >"$logs/$(basename "$script").log" 2>&1 &
  pids+=("$!:$script")
done
# The tests of the native CUDA-on-CPU driver run in .ci/cuda_on_cpu_sanitize.sh, on its ASan build.
job python -m pytest tests -q -ra -m "not native_driver"
rc=$?
status=0
for entry in "${pids[@]}"; do
  wait "${entry%%:*}" || status=1
  echo "---- ${entry#*:} (ran beside the test suite)"
  cat "$logs/$(basename "${entry#*:}").log"
done
# pytest exits 5 when it collected nothing; that is a broken suite here, not a pass.
[ $rc -eq 0 ] || exit $rc
[ $status -eq 0 ] || exit 1
echo "== all jobs passed in $SECONDS s"
