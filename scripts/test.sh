#!/usr/bin/env bash
# The test command: set up the environment, run the test suite, the CPU extension's tests
# under ASan + UBSan, then the wheel smoke job.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || exit 1
. .venv/bin/activate
python -m pytest tests -q -ra
rc=$?
# pytest exits 5 when it collected nothing; that is a broken suite here, not a pass.
[ $rc -eq 0 ] || exit $rc
bash .ci/sanitize_cpu.sh || exit 1
if [ -f .ci/wheel_smoke.sh ]; then
  bash .ci/wheel_smoke.sh || exit 1
fi
bash .ci/cuda_on_cpu_sanitize.sh || exit 1
