"""Build script of mada-fused: the packages and the two extensions.

How the extensions are compiled (flags, ninja, finding the CUDA toolkit, the
environment variables that steer it) is build_support.py. This script never
imports torch.
"""
from __future__ import annotations

import os
import sys

from setuptools import Extension, find_packages, setup

# setuptools' build backend runs this file without its directory on sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_support  # noqa: E402


def packages() -> tuple[list[str], dict[str, str]]:
    """mada_fused and its subpackages; triton_kernels/ installs as mada_fused.triton_kernels
    (a top-level ``triton_kernels`` would shadow Triton's own package)."""
    pkgs = find_packages(include=["mada_fused", "mada_fused.*"])
    tk = ["mada_fused.triton_kernels"] + [f"mada_fused.triton_kernels.{p}" for p in find_packages("triton_kernels")]
    return pkgs + tk, {"mada_fused.triton_kernels": "triton_kernels"}


def main() -> None:
    build_support.BuildExt.cuda = cuda = build_support.cuda_plan()
    headers = build_support.headers()
    ext_modules = [Extension("mada_fused._C_cpu", sources=["csrc/cpu/binding.cpp", "csrc/cpu/kernels.cpp"],
                             depends=headers)]
    if cuda.toolkit:
        ext_modules.append(Extension("mada_fused._C_cuda", sources=cuda.sources, depends=headers))
    if build_support.cuda_on_cpu_wanted():
        ext_modules.append(Extension("mada_fused._C_cuda_on_cpu", sources=build_support.cuda_sources(),
                                     depends=headers))
    pkgs, package_dir = packages()
    setup(packages=pkgs, package_dir=package_dir, ext_modules=ext_modules,
          cmdclass={"build_ext": build_support.BuildExt})


# setuptools' build backend and `python setup.py` both run this file as
# __main__; tests import it for packages().
if __name__ == "__main__":
    main()
