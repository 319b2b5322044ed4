"""What this installation was built with (placeholder until the native build lands)."""
from __future__ import annotations

from typing import Any


def build_info() -> dict[str, Any]:
    from . import backends

    return {
        "cpu_ext": False,
        "cuda_ext": False,
        "cuda_archs": [],
        "triton": False,
        "backends_available": backends.available(),
    }
