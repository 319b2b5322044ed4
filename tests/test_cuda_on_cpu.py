"""The CUDA backend's planner, launcher and kernels, run on the CPU.

tests/native/build_driver.sh compiles csrc/cuda with the host C++ compiler
through csrc/cuda/cuda_on_cpu.h (each block's threads are real threads) into
tests/native/cuda_on_cpu_driver, which checks every buffer bit for bit against
a per-element loop over mada_math.h: four dtypes, vector and scalar paths,
chunks spanning segments, more than 600 segments, learn subsets, the dot
reduction, found_inf, grad scale, the caller's current device, and 8-bit state
and tangent rows (codes and block scales, blocks past a segment's end untouched). The same
driver runs under the sanitizers in .ci/cuda_on_cpu_sanitize.sh.

When the extension ``_C_cuda_on_cpu`` is built (MADA_BUILD_CUDA_ON_CPU=1),
backend="cuda_on_cpu" (the Python cuda call path, CPU tensors) runs every case
of the conformance suite (test_conformance.py, with the CUDA layouts of
conformance_cases.TARGETS) and every test of test_cuda_backend.py that needs no
real device; here only what is specific to it.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

try:
    from mada_fused import _C_cuda_on_cpu
except ImportError:  # built only with MADA_BUILD_CUDA_ON_CPU=1
    _C_cuda_on_cpu = None

ROOT = pathlib.Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX", "g++")

compiler = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no C++ compiler ({CXX}) to build the driver")
built = pytest.mark.skipif(_C_cuda_on_cpu is None, reason="_C_cuda_on_cpu not built (MADA_BUILD_CUDA_ON_CPU=1)")


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    # CI runs these tests on the ASan + UBSan build of .ci/cuda_on_cpu_sanitize.sh (one build fewer).
    if os.environ.get("MADA_CUDA_ON_CPU_DRIVER"):
        return pathlib.Path(os.environ["MADA_CUDA_ON_CPU_DRIVER"])
    out = tmp_path_factory.mktemp("cuda_on_cpu")
    build = subprocess.run(["bash", str(ROOT / "tests/native/build_driver.sh"), str(out), "-O1"],
                           capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout + build.stderr
    return out / "cuda_on_cpu_driver"


@compiler
def test_kernels_match_the_element_loop(driver: pathlib.Path) -> None:
    run = subprocess.run([str(driver)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "all checks passed" in run.stdout, run.stdout + run.stderr


@compiler
def test_conversions_match_torch(driver: pathlib.Path, tmp_path: pathlib.Path) -> None:
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (1 << 18,), dtype=torch.int64, generator=g)
    # Exact ties and their neighbours for both formats, over the whole exponent
    # range (fp16's subnormals included): the bits below each format's last
    # mantissa bit set to half an ulp, and to one less and one more than that.
    n = 1 << 14
    sign_mant = torch.randint(0, 2**23, (n,), dtype=torch.int64, generator=g) | (
        torch.randint(0, 2, (n,), dtype=torch.int64, generator=g) << 31)
    for low, exps in ((16, (1, 255)), (13, (98, 144))):  # fp16: its subnormals up to its overflow
        base = sign_mant | (torch.randint(*exps, (n,), dtype=torch.int64, generator=g) << 23)
        for d in (-1, 0, 1):
            bits = torch.cat([bits, (base >> low << low) | ((1 << (low - 1)) + d)])
    x = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    x = torch.cat([x, torch.tensor([65504.0, 65519.0, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, -0.0,
                                    float("inf"), float("-inf")])])
    src, dst = tmp_path / "x.f32", tmp_path / "y.u16"
    x.numpy().tofile(src)
    run = subprocess.run([str(driver), "--convert", str(src), str(dst)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = torch.from_numpy(np.fromfile(dst, dtype=np.int16)).view(2, -1)
    for row, dtype in zip(got, (torch.bfloat16, torch.float16)):
        want = x.to(dtype)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(row.view(dtype)), nan), dtype
        assert torch.equal(row[~nan], want.view(torch.int16)[~nan]), dtype


@built
def test_reports_no_cuda_runtime():
    """The CPU build's stubs: no archs, no runtime, no driver; build_info's driver check stays quiet."""
    from mada_fused.backends.cuda import driver_problem

    assert _C_cuda_on_cpu.built_archs() == []
    assert _C_cuda_on_cpu.runtime_version() == 0 and _C_cuda_on_cpu.driver_version() == 0
    assert driver_problem(_C_cuda_on_cpu.driver_version(), _C_cuda_on_cpu.runtime_version()) is None
