#!/usr/bin/env bash
# Creates .venv (once) with torch 2.13 and mada-fused installed in editable mode.
# torch is pinned to one version, not one build: pip takes whichever 2.13.0 build its
# index offers (a torch already in .venv at that version is kept, so install the build you
# want first). The extensions never link torch: the same build works with any torch >= 2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
# The CUDA extension is compiled whenever nvcc exists; one arch keeps this fast.
# CI compiles it once, in the wheel job (.ci/wheel_smoke.sh), and tests it there.
if [ "${CI:-}" = "true" ]; then export MADA_BUILD_CUDA=${MADA_BUILD_CUDA:-0}; fi
# The CUDA sources built by the host compiler (backend="cuda_on_cpu"): how CI tests the CUDA kernels.
export MADA_BUILD_CUDA_ON_CPU=${MADA_BUILD_CUDA_ON_CPU:-1}
# Objects kept in build/objects: a rerun recompiles what changed, and the wheel job reuses them.
export MADA_OBJECTS=${MADA_OBJECTS:-$PWD/build/objects}
MADA_CUDA_ARCHS=${MADA_CUDA_ARCHS:-90} python -m pip install -q -e ".[test,triton,bench]"
python -m mada_fused.info
