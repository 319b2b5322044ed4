"""The build (setup.py, build_support.py, pyproject.toml) and what it reports (build_info, info).

No test here compiles anything: .ci/wheel_smoke.sh builds and installs a wheel.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

import mada_fused
from mada_fused.backends.cuda import archs_run_on, driver_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests that read setup.py / build_support.py / pyproject.toml need the source tree; the rest
# also run against an installed wheel (.ci/wheel_smoke.sh can copy this file).
needs_source = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "setup.py")),
                                  reason="needs the source tree")


def _no_torch(code: str, *args: str) -> str:
    """Runs ``code`` in the source tree with torch made unimportable (the build must never
    need it); returns its stdout."""
    prelude = "import sys; sys.modules['torch'] = None; sys.path.insert(0, '.')\n"
    out = subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env={**os.environ, "MADA_BUILD_CUDA": "0"})
    assert out.returncode == 0, out.stderr
    return out.stdout


@needs_source
def test_build_never_imports_torch_and_maps_triton_kernels():
    import json

    code = (
        "import importlib.util, json, build_support as b\n"
        "spec = importlib.util.spec_from_file_location('mada_setup', 'setup.py')\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(json.dumps([b.arch_names(b.parse_archs(b.DEFAULT_CUDA_ARCHS)), m.packages(), b.headers()]))"
    )
    archs, (packages, package_dir), headers = json.loads(_no_torch(code))
    assert archs == ["sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]  # issue #8's default
    assert "mada_fused.triton_kernels" in packages and "triton_kernels" not in packages
    assert package_dir == {"mada_fused.triton_kernels": "triton_kernels"}
    # Every header is a dependency of both extensions (ninja's depfiles track the includes too).
    assert {"csrc/abi.h", "csrc/abi_check.h", "csrc/mada_math.h", "csrc/cpu/cpu_calls.h",
            "csrc/cuda/launch.h"} <= set(headers)


@needs_source
def test_sdist_holds_what_the_build_needs(tmp_path):
    """setup.py imports build_support.py: an sdist without it (or without a header) cannot build."""
    import tarfile

    _no_torch("import runpy; sys.argv = ['setup.py', '-q', 'sdist', '-d', sys.argv[1]]; "
              "runpy.run_path('setup.py', run_name='__main__')", str(tmp_path))
    (sdist,) = tmp_path.glob("*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert {"setup.py", "build_support.py", "pyproject.toml", "csrc/abi.h", "csrc/cpu/kernels.cpp",
            "csrc/cuda/launch.h", "triton_kernels/kernels.py"} <= names


@needs_source
def test_parse_archs(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    m = importlib.import_module("build_support")
    assert m.parse_archs("80;86 , 8.9;90+PTX") == [("80", False), ("86", False), ("89", False), ("90", True)]
    assert m.arch_names(m.parse_archs("sm_90a,120+ptx")) == ["sm_90a", "sm_120", "compute_120"]
    with pytest.raises(SystemExit):
        m.parse_archs("volta")
    with pytest.raises(SystemExit):
        m.parse_archs(" ; ")


@pytest.fixture
def build_support(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    return importlib.import_module("build_support")


NVCC_13 = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"


@needs_source
def test_nvcc_version_and_targets_are_read(build_support):
    b = build_support
    assert b.parse_nvcc_version(NVCC_13) == (13, 0)
    assert b.parse_nvcc_version("Cuda compilation tools, release 12.1, V12.1.105") == (12, 1)
    assert b.parse_nvcc_version("gcc (GCC) 13.2.0") is None
    assert b.parse_gpu_targets("sm_75\nsm_80\nsm_90\nsm_100\n") == {75, 80, 90, 100}
    assert b.parse_gpu_targets("compute_75 compute_90a lto_100f") == {75, 90, 100}
    assert b.parse_gpu_targets("nvcc fatal   : Unknown option '--list-gpu-code'") == set()


@needs_source
@pytest.mark.parametrize("version, archs, targets, refused", [
    ((12, 1), "80;90+PTX", None, None),
    ((12, 0), "80", None, "needs CUDA 12.1 or newer"),
    ((11, 8), "80", {35, 80}, "over 4 KB"),
    (None, "80", None, "cannot read the CUDA version"),
    ((12, 8), "50;90a", None, None),
    ((12, 8), "37", None, "sm_37, which CUDA 12.8 cannot compile for (it has sm_50 and newer)"),
    ((13, 0), "75;90", None, None),
    ((13, 0), "70", None, "sm_70, which CUDA 13.0"),  # Volta: dropped by CUDA 13 (table)
    ((14, 2), "6.1", None, "sm_61, which CUDA 14.2"),  # a newer toolkit: the newest table row
    # What nvcc lists wins over the table, either way.
    ((13, 0), "90;100f", {75, 90, 100}, None),
    ((13, 0), "90;120", {75, 90, 100}, "sm_120, which CUDA 13.0 cannot compile for (it has sm_75, sm_90, sm_100)"),
    ((12, 4), "52", {60, 90}, "sm_52"),
])
def test_toolkit_refusal(build_support, version, archs, targets, refused):
    why = build_support.toolkit_refusal(version, build_support.parse_archs(archs), targets)
    assert (why == "") if refused is None else (refused in why), why


def _fake_nvcc(tmp_path, release, codes):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\ncase \"$1\" in\n"
                    f"  --version) echo 'Cuda compilation tools, release {release}, V{release}.1';;\n"
                    f"  --list-gpu-code) printf '%s\\n' {' '.join('sm_' + c for c in codes)};;\n"
                    f"  --list-gpu-arch) printf '%s\\n' {' '.join('compute_' + c for c in codes)};;\n"
                    "  *) exit 1;;\nesac\n")
    nvcc.chmod(0o755)
    return str(nvcc)


@needs_source
@pytest.mark.parametrize("release, codes, archs, refused", [
    ("12.0", ["50", "80"], "80", "needs CUDA 12.1"),
    ("13.0", ["75", "80", "90"], "60;90", "sm_60, which CUDA 13.0 cannot compile for"),
    ("12.4", ["50", "60", "90"], "60;90", None),
])
def test_cuda_plan_skips_or_stops_on_a_refused_toolkit(build_support, monkeypatch, tmp_path, release, codes, archs,
                                                      refused):
    """MADA_BUILD_CUDA=auto builds without _C_cuda and says why; MADA_BUILD_CUDA=1 stops with that reason."""
    b = build_support
    toolkit = {"nvcc": _fake_nvcc(tmp_path, release, codes), "home": str(tmp_path),
               "cudart_dir": str(tmp_path)}
    monkeypatch.setattr(b, "find_cuda", lambda: (toolkit, ""))
    monkeypatch.setenv("MADA_CUDA_ARCHS", archs)
    monkeypatch.setenv("MADA_BUILD_CUDA", "auto")
    plan = b.cuda_plan()
    if refused is None:
        assert plan.toolkit == toolkit and [n for n, _ in plan.archs] == archs.split(";")
        return
    assert plan.toolkit is None and plan.archs == [] and refused in plan.reason
    assert plan.status() == f"not built: {plan.reason}"
    monkeypatch.setenv("MADA_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match=f"MADA_BUILD_CUDA=1 but .*{refused[:12]}"):
        b.cuda_plan()


@needs_source
def test_real_nvcc_is_accepted(build_support, monkeypatch):
    """The toolkit on this machine: its version is read, sm_90 builds; CUDA 13 refuses Pascal."""
    monkeypatch.delenv("MADA_BUILD_CUDA", raising=False)  # find it even where this install skipped it
    found, why = build_support.find_cuda()
    if found is None:
        pytest.skip(f"no CUDA toolkit here ({why})")
    b = build_support
    out = subprocess.run([found["nvcc"], "--version"], capture_output=True, text=True, timeout=60).stdout
    version = b.parse_nvcc_version(out)
    assert version is not None and version >= b.MIN_CUDA, out
    assert b.check_toolkit(found["nvcc"], b.parse_archs("90+PTX")) == ""
    assert b.check_toolkit(found["nvcc"], b.parse_archs(b.DEFAULT_CUDA_ARCHS)) == ""
    if version >= (13, 0):
        assert "sm_60, which CUDA 13" in b.check_toolkit(found["nvcc"], b.parse_archs("60;90"))


@needs_source
def test_pyproject_has_no_torch_build_requirement():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)
    assert not any(r.startswith("torch") for r in cfg["build-system"]["requires"])
    assert {"setuptools", "wheel", "ninja"} <= {r.split(">")[0].split("=")[0] for r in cfg["build-system"]["requires"]}
    assert cfg["project"]["dependencies"] == ["torch>=2.4"]
    assert {"triton", "bench", "test"} <= set(cfg["project"]["optional-dependencies"])


@pytest.mark.parametrize(
    "archs, cap, ok",
    [
        (["sm_80"], (8, 0), True),
        (["sm_80"], (8, 6), True),  # same major, newer minor: the cubin runs
        (["sm_86"], (8, 0), False),
        (["sm_80"], (9, 0), False),  # SASS never crosses a major version
        (["sm_80", "compute_90"], (10, 0), True),  # PTX is JIT-compiled forward
        (["compute_90"], (8, 9), False),
        (["sm_90a"], (9, 0), True),
        (["sm_90a"], (10, 0), False),
        ([], (8, 0), False),
    ],
)
def test_archs_run_on(archs, cap, ok):
    assert archs_run_on(archs, cap) is ok


def test_build_info_keys_and_types():
    info = mada_fused.build_info()
    for key, typ in [("cpu_ext", bool), ("cuda_ext", bool), ("cuda_archs", list), ("cuda_runtime", int),
                     ("cuda_driver", int), ("triton", bool),
                     ("backends_available", list), ("auto", dict), ("gpus", list)]:
        assert isinstance(info[key], typ), key
    assert info["version"] == mada_fused.__version__ and info["torch"] == torch.__version__
    assert "reference" in info["backends_available"]
    assert info["cpu_ext"] == ("cpu" in info["backends_available"])
    assert info["auto"]["cpu"] == ("cpu" if info["cpu_ext"] else "reference")
    if info["cuda_ext"]:
        assert info["cuda_archs"] and all(a.startswith(("sm_", "compute_")) for a in info["cuda_archs"])
        assert info["cuda_runtime"] >= 12010
        assert info["cuda_driver_problem"] == driver_problem(info["cuda_driver"], info["cuda_runtime"])
    else:
        assert info["cuda_archs"] == [] and info["cuda_runtime"] == info["cuda_driver"] == 0


@pytest.mark.parametrize("driver, runtime, says", [
    (13000, 13000, None),
    (13010, 13000, None),
    (0, 13000, None),  # no driver: no GPU to run on, nothing to warn about
    (13020, 0, None),  # the CPU build of the kernels: no CUDA runtime
    (12080, 13000, "supports CUDA 12.8, but the CUDA extension was built with CUDA 13.0 (static runtime) and "
                   "needs an NVIDIA driver of the 580 series or newer"),
    (11080, 12010, "needs an NVIDIA driver of the 525 series or newer"),
    (13000, 14000, "needs a driver for CUDA 14.0"),
    (12020, 12080, "supports CUDA 12.2, older than the CUDA 12.8 the CUDA extension was built with: its SASS runs"),
])
def test_driver_problem(driver, runtime, says):
    why = driver_problem(driver, runtime)
    assert why is None if says is None else says in why, why


def test_info_warns_about_an_old_driver():
    from mada_fused.info import _lines

    info = mada_fused.build_info()
    info.update(cuda_ext=True, cuda_archs=["sm_90"], cuda_runtime=13000, cuda_driver=12080,
                cuda_driver_problem=driver_problem(12080, 13000))
    text = "\n".join(_lines(info))
    assert "built with CUDA 13.0 (static runtime); driver: CUDA 12.8" in text
    assert "  WARNING: the NVIDIA driver supports CUDA 12.8" in text and "580 series" in text
    info.update(cuda_driver=13000, cuda_driver_problem=None)
    assert "WARNING" not in "\n".join(_lines(info))


def test_info_command_prints_a_report():
    out = subprocess.run([sys.executable, "-m", "mada_fused.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for line in ("mada-fused ", "CPU extension:", "CUDA extension:", "Triton:", "backend='auto' on cpu:"):
        assert line in out.stdout


def _ext_path(name):
    spec = importlib.util.find_spec(f"mada_fused.{name}")
    return None if spec is None else spec.origin


@pytest.mark.parametrize("name", ["_C_cpu", "_C_cuda"])
def test_extensions_do_not_link_torch(name):
    path = _ext_path(name)
    if path is None:
        pytest.skip(f"mada_fused.{name} is not built")
    if shutil.which("ldd"):
        deps = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        for lib in ("libtorch", "libc10", "libcudart.so", "libpython"):
            assert lib not in deps, f"{name} links {lib}"
    # It loads in a process that never imports torch (raw addresses only).
    code = (
        "import importlib.machinery, importlib.util, sys\n"
        f"loader = importlib.machinery.ExtensionFileLoader('mada_fused.{name}', {path!r})\n"
        "spec = importlib.util.spec_from_loader(loader.name, loader)\n"
        "mod = importlib.util.module_from_spec(spec); loader.exec_module(mod)\n"
        "assert 'torch' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_triton_kernels_install_under_mada_fused():
    spec = importlib.util.find_spec("mada_fused.triton_kernels")
    assert spec is not None and spec.origin is not None
    assert os.path.dirname(spec.origin).endswith("triton_kernels")
    if not os.path.exists(os.path.join(ROOT, "triton_kernels")):  # installed: never top-level
        assert importlib.util.find_spec("triton_kernels") is None
