#!/usr/bin/env bash
# Builds cuda_on_cpu_driver: the planner, launcher and every kernel of csrc/cuda,
# compiled by the host C++ compiler through cuda_on_cpu.h, plus the driver.
#   tests/native/build_driver.sh OUTDIR [compiler flags, e.g. -fsanitize=thread]
# Objects build two at a time (JOBS) at low priority; CXX picks the compiler.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$1
shift
mkdir -p "$out"
cxx=${CXX:-g++}
flags=(-std=c++20 -g -Wall -Wno-unknown-pragmas -pthread -I"$root/csrc" "$@")
srcs=(csrc/cuda/plan.cpp csrc/cuda/launch.cu)
for k in "$root"/csrc/cuda/kernels_*.cu; do srcs+=("csrc/cuda/$(basename "$k")"); done
srcs+=(tests/native/cuda_on_cpu_driver.cpp)
objs=()
pids=()
for src in "${srcs[@]}"; do
  obj="$out/$(basename "${src%.*}").o"
  objs+=("$obj")
  nice -n 10 "$cxx" "${flags[@]}" -x c++ -c "$root/$src" -o "$obj" &
  pids+=($!)
  if [ "${#pids[@]}" -ge "${JOBS:-2}" ]; then
    wait "${pids[0]}"
    pids=("${pids[@]:1}")
  fi
done
for pid in "${pids[@]}"; do wait "$pid"; done
nice -n 10 "$cxx" "${flags[@]}" "${objs[@]}" -o "$out/cuda_on_cpu_driver"
