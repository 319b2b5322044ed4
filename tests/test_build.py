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
from mada_fused.backends.cuda import archs_run_on

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
    for key, typ in [("cpu_ext", bool), ("cuda_ext", bool), ("cuda_archs", list), ("triton", bool),
                     ("backends_available", list), ("auto", dict), ("gpus", list)]:
        assert isinstance(info[key], typ), key
    assert info["version"] == mada_fused.__version__ and info["torch"] == torch.__version__
    assert "reference" in info["backends_available"]
    assert info["cpu_ext"] == ("cpu" in info["backends_available"])
    assert info["auto"]["cpu"] == ("cpu" if info["cpu_ext"] else "reference")
    if info["cuda_ext"]:
        assert info["cuda_archs"] and all(a.startswith(("sm_", "compute_")) for a in info["cuda_archs"])
    else:
        assert info["cuda_archs"] == []


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
