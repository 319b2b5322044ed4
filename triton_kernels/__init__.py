"""Triton kernels of mada-fused, installed as ``mada_fused.triton_kernels``.

The folder lives at the top of the repository and is mapped into the package
by setuptools ``package_dir``: importing it as a top-level ``triton_kernels``
would collide with the unrelated package of that name that ships with Triton.
Importing this package imports Triton; mada_fused.backends.triton turns an
ImportError into BackendUnavailable.
"""
from .launch import CONFIG_ENV, CONFIGS, adamod, kernels, mada

__all__ = ["CONFIG_ENV", "CONFIGS", "adamod", "kernels", "mada"]
