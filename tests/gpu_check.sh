#!/usr/bin/env bash
# One-shot check of the CUDA backend on a GPU machine with no internet access:
# build, register report, the whole test suite, compute-sanitizer on a small
# step, and the step benchmark. Run from the repository root:
#
#     OUT=/some/dir tests/gpu_check.sh          # logs land in $OUT (default ./gpu_check_out)
#
# Every stage runs even when an earlier one fails (a failing test should not
# hide the benchmark); the exit status is non-zero if any stage failed.
# MADA_CUDA_ARCHS defaults to this GPU's arch only, to keep the build short.
set -u -o pipefail

OUT=${OUT:-$PWD/gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
failed=()

stage() {  # stage NAME CMD...: run CMD, log to $OUT/NAME.log, report
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*"
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
  else
    echo "   FAILED (exit $?, $((SECONDS - start)) s); last lines of $OUT/$name.log:"
    tail -n 25 "$OUT/$name.log" | sed 's/^/   | /'
    failed+=("$name")
  fi
}

arch=$($PY -c 'import torch; p = torch.cuda.get_device_capability(); print(f"{p[0]}{p[1]}")' 2>/dev/null || echo 90)
export MADA_CUDA_ARCHS=${MADA_CUDA_ARCHS:-$arch} MADA_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}

stage env bash -c "nvidia-smi; nvcc --version; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
stage build $PY -m pip install --no-build-isolation --no-deps -v -e .
stage import $PY -c 'import mada_fused, mada_fused._C_cuda as c; print(mada_fused.build_info()); print("archs", c.built_archs(), "device_ok", c.device_ok(0))'

# Registers, spills and stack of every kernel for sm_90 (the report quoted in csrc/cuda/).
ptxas() {
  local inc
  inc=$($PY -c 'import pybind11; print(pybind11.get_include())')
  for f in csrc/cuda/kernels_f32.cu csrc/cuda/kernels_bf16.cu csrc/cuda/launch.cu; do
    echo "## $f"
    # One line per kernel: mangled name, then registers / stack / spills.
    nvcc -c -O3 -std=c++17 -arch=sm_90 -Icsrc -I"$inc" -Xptxas -v ${MADA_NVCC_FLAGS:-} "$f" -o /dev/null 2>&1 |
      awk '/Compiling entry/ {name = $7; gsub(/\047/, "", name)} /stack frame/ {st = $0} /Used [0-9]+ registers/ {
             sub(/.*Used /, "", $0); sub(/.*ptxas info *: */, "", st); print name, "|", $0, "|", st }'
  done
}
stage ptxas ptxas

stage pytest $PY -m pytest tests -q -rs -p no:cacheprovider --junitxml="$OUT/junit.xml"

# A small step that reaches every kind of pass: MADA with all tangents (lagged: a
# step with the dot, exact: the dot-only pass), bf16 with AMP scaling, AdaMod
# and DiffMod, odd sizes (scalar path) and aligned ones (vector path).
cat >"$OUT/small_step.py" <<'EOF'
import torch, mada_fused
ALL = ("beta1", "beta2", "beta3", "rho", "c", "gamma")
torch.manual_seed(0)
for cls, kw, dtype in [
    (mada_fused.MADA, dict(beta3=0.5, rho=0.5, c=0.5, gamma=0.5, mod_beta=0.9, learn=ALL, hyper_warmup=0), torch.float32),
    (mada_fused.MADA, dict(beta3=0.5, rho=0.5, c=0.5, gamma=0.5, learn=ALL, hyper_order="exact"), torch.bfloat16),
    (mada_fused.AdaMod, {}, torch.float16),
    (mada_fused.DiffMod, {}, torch.float32),
]:
    ps = [torch.randn(s, device="cuda").to(dtype).requires_grad_() for s in [(4099,), (7,), (64, 32), (3000,)]]
    opt = cls(ps, backend="cuda", **kw)
    for i in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.grad_scale = torch.full((), 2.0, device="cuda")
        opt.found_inf = torch.full((), float(i == 1), device="cuda")
        opt.step()
torch.cuda.synchronize()
print("ok")
EOF
# Without torch's caching allocator every tensor is its own allocation, so memcheck
# also sees an overrun that would stay inside a cached block.
san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck synccheck; do
  stage "$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" --error-exitcode 1 --print-limit 20 \
    $PY "$OUT/small_step.py"
done

stage bench $PY -m bench --device cuda --out "$OUT/bench"
stage bench_bf16 $PY -m bench --device cuda --dtype bfloat16 --out "$OUT/bench_bf16"

if ((${#failed[@]})); then
  echo "FAILED stages: ${failed[*]} (logs in $OUT)"
  exit 1
fi
echo "all stages passed (logs in $OUT)"
