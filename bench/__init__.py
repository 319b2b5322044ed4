"""Benchmarks and the training comparison for mada_fused.

``python -m bench``        step-speed benchmark (bench/step.py, CLI in bench/__main__.py)
``python -m bench.train``  does MADA help? small real-data training runs (bench/train.py)
``pytest bench/ --benchmark-only``  the step cases through pytest-benchmark

Nothing here is imported by the package or collected by ``pytest tests``.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git_commit() -> str | None:
    """The checkout the numbers came from ('+dirty' when the tree has local edits)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def machine_info(device: str = "cpu") -> dict:
    """What the numbers came from; stored in every results.json."""
    info: dict = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "git_commit": _git_commit(),
        # other work on the machine skews CPU timings: keep the 1/5/15-min load with the numbers
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import mada_fused

        info["mada_fused"] = mada_fused.build_info()
    except Exception as exc:  # the package may be missing or half-built
        info["mada_fused"] = f"unavailable: {exc!r}"
    return info


def machine_line(info: dict) -> str:
    dev = info.get("gpu") or f"{info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads)"
    load = f"; load average {info['loadavg'][0]}" if info.get("loadavg") else ""
    commit = f"; commit {info['git_commit']}" if info.get("git_commit") else ""
    return f"{dev}; torch {info['torch']}; Python {info['python']}; {info['date']}{load}{commit}"
