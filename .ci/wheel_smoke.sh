#!/usr/bin/env bash
# Issue #8's wheel job. Builds a wheel (CPU extension + CUDA extension for one
# arch, in pip's isolated build env, which has no torch), checks what is in it,
# installs it into a FRESH venv with torch==2.13.0 (the CPU wheel that pip's
# configured find-links provide: a looser pin would pull GBs of CUDA packages;
# when $PYTHON's environment has that torch, the venv sees it instead of
# installing it again) and runs a smoke test plus the extensions' tests there,
# against the installed wheel, not the source tree.
#
#   MADA_WHEEL_ARCH   CUDA arch to build (default 80: one arch keeps it fast)
#   MADA_BUILD_CUDA   1 (default): fail without nvcc; auto: CPU-only if none
#   MADA_WHEEL_TORCH  torch requirement for the venv, installed there (default: torch==2.13.0, or $PYTHON's if it has that)
#   MAX_JOBS          parallel compile jobs (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
ARCH=${MADA_WHEEL_ARCH:-80}
export MADA_BUILD_CUDA=${MADA_BUILD_CUDA:-1}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mada-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
step() { echo "== [$((SECONDS - START))s] $*"; }

step "pip wheel . (MADA_CUDA_ARCHS=$ARCH, MADA_BUILD_CUDA=$MADA_BUILD_CUDA)"
# The CPU kernel objects scripts/setup_env.sh compiled (build/objects) are linked as they are:
# their command lines are the same in pip's isolated env (build_support.py, MADA_OBJECTS).
if ! MADA_OBJECTS=${MADA_OBJECTS:-$ROOT/build/objects} MADA_CUDA_ARCHS=$ARCH "$PY" -m pip wheel . --no-deps -w "$WORK/dist" -v >"$WORK/build.log" 2>&1; then
    tail -n 60 "$WORK/build.log"
    echo "wheel build FAILED" >&2
    exit 1
fi
grep "mada-fused:" "$WORK/build.log" | sort -u
echo "compiled: $(grep -oE '\[[0-9]+/[0-9]+\] (CXX|NVCC)[^ ]* [^ ]+' "$WORK/build.log" | awk '{print $3}' | xargs -r -n1 basename | xargs)"
WHEEL=$(ls "$WORK"/dist/mada_fused-*.whl)
echo "built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"

step "wheel contents"
"$PY" - "$WHEEL" "$MADA_BUILD_CUDA" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
def has(prefix, suffix=""):
    return any(n.startswith(prefix) and n.endswith(suffix) for n in names)
need = [("mada_fused/_C_cpu", ".so"), ("mada_fused/triton_kernels/__init__.py", ""),
        ("mada_fused/backends/reference.py", ""), ("mada_fused/backends/abi.py", ""), ("mada_fused/info.py", "")]
if sys.argv[2] == "1":
    need.append(("mada_fused/_C_cuda", ".so"))
missing = [p + s for p, s in need if not has(p, s)]
stray = [n for n in names if n.split("/")[0] in ("triton_kernels", "bench", "tests", "csrc", "build_support.py")]
meta = next(zipfile.ZipFile(sys.argv[1]).read(n).decode() for n in names if n.endswith("METADATA"))
torch_reqs = [l for l in meta.splitlines() if l.startswith("Requires-Dist: torch")]
assert not missing, f"missing from the wheel: {missing}"
assert not stray, f"stray top-level entries: {stray[:5]}"
assert torch_reqs == ["Requires-Dist: torch>=2.4"], torch_reqs
print(f"ok: {len(names)} files; requires {torch_reqs[0].split(': ')[1]}")
EOF

# (grep: pip's configured extra index lists names it has no folder for, one warning each)
quiet_pip() { "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }
if [ -z "${MADA_WHEEL_TORCH:-}" ] && "$PY" -c 'import numpy, pytest, torch; assert torch.__version__.split("+")[0] == "2.13.0"' 2>/dev/null; then
    # $PY's environment has them (CI: .venv): the fresh venv sees its site-packages through a
    # .pth line, after its own, without running that folder's .pth files, so .venv's editable
    # install of this checkout stays invisible; pip still checks the wheel's torch requirement.
    step "fresh venv seeing $PY's torch $("$PY" -c 'import torch; print(torch.__version__)'), numpy and pytest + the wheel"
    "$PY" -m venv --without-pip "$WORK/venv"
    VPY="$WORK/venv/bin/python"
    "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/outer.pth"
    quiet_pip "$PY" -m pip --python "$VPY" install -q "$WHEEL"
else
    step "fresh venv with ${MADA_WHEEL_TORCH:-torch==2.13.0} + the wheel"
    "$PY" -m venv "$WORK/venv"
    VPY="$WORK/venv/bin/python"
    quiet_pip "$VPY" -m pip install -q "${MADA_WHEEL_TORCH:-torch==2.13.0}" numpy pytest "$WHEEL"
fi

step "smoke test in the venv"
cd "$WORK"  # nothing from the source tree is importable from here
"$VPY" - "$MADA_BUILD_CUDA" "$ARCH" <<'EOF'
import importlib.util, subprocess, sys
import torch
import mada_fused
from mada_fused import MADA, AdaMod

info = mada_fused.build_info()
assert mada_fused.__file__.startswith(sys.prefix), mada_fused.__file__
assert info["cpu_ext"], info
if sys.argv[1] == "1":
    assert info["cuda_ext"] and info["cuda_archs"] == [f"sm_{sys.argv[2]}"], info
assert importlib.util.find_spec("triton_kernels") is None  # never a top-level package
for name in ("_C_cpu", "_C_cuda"):
    spec = importlib.util.find_spec(f"mada_fused.{name}")
    if spec is None:
        continue
    deps = subprocess.run(["ldd", spec.origin], capture_output=True, text=True).stdout
    bad = [lib for lib in ("libtorch", "libc10", "libcudart.so") if lib in deps]
    assert not bad, f"{name} links {bad}:\n{deps}"
for cls, kw in ((MADA, dict(learn=("beta1", "gamma"), gamma=0.9, hyper_warmup=0)), (AdaMod, {})):
    runs = []
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(1000, 3))
        opt = cls([p], lr=1e-2, backend=backend, **kw)
        torch.manual_seed(1)
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
        runs.append(p.detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-7)
print(f"ok: torch {torch.__version__}, cpu_ext, cuda_ext={info['cuda_ext']} {info['cuda_archs']}, "
      f"auto on cpu = {info['auto']['cpu']}, no libtorch/libc10/libcudart.so in ldd")
EOF
"$VPY" -m mada_fused.info

# CI builds the CUDA extension only here, so its import and host-side tests run here too,
# and the check that both built extensions speak the call interface of the Python mirror.
step "CPU-backend, CUDA-extension and call-interface tests against the installed wheel"
mkdir -p "$WORK/tests"
cp "$ROOT"/tests/conftest.py "$ROOT"/tests/spec_model.py "$ROOT"/tests/conformance_cases.py "$ROOT"/tests/test_conformance.py \
   "$ROOT"/tests/test_cpu_backend.py \
   "$ROOT"/tests/test_cuda_backend.py "$ROOT"/tests/test_abi.py "$WORK/tests/"
"$VPY" -m pytest -q -p no:cacheprovider "$WORK/tests/test_cpu_backend.py" "$WORK/tests/test_cuda_backend.py" \
    "$WORK/tests/test_abi.py"

step "wheel job passed"
