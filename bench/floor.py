"""The memory floor of a step's stream mix on the CPU: the "x floor" column of `python -m bench`.

A fused CPU step that updates ``rw`` fp32 streams in place and reads ``ro``
cannot beat a loop that only moves those bytes in the same schedule
(bench/stream_floor.cpp, built here on first use with the host compiler).
torch's copy bandwidth is no such floor: on the 2-core Zen 3 VM the 3+1 mix of
Adam and the 13+1 mix of full MADA both move 1.5-1.6x the GB/s of a copy_ (one
read and one write stream), so "% copy BW" says little about how much of a CPU
step is left to win. The floor is timed in the same rounds as the steps, on
buffers placed as the optimizer places its state, and each row's ratio is the
median of its per-round ratios: the machine's bandwidth wanders by +-20 % over
minutes, and both sides of a ratio taken seconds apart wander together.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
from pathlib import Path

import torch

SRC = Path(__file__).with_name("stream_floor.cpp")
BLOCK = 64  # elements of one stream at a time, as the CPU backend's blocks


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mada_fused_bench"


@functools.lru_cache(maxsize=1)
def library() -> tuple[ctypes.CDLL | None, str]:
    """(the built sweep library, "") or (None, why not); built once per source and compiler."""
    cxx = os.environ.get("CXX", "g++")
    flags = ["-O3", "-fopenmp", "-shared", "-fPIC", "-DSTREAM_FLOOR_NO_MAIN"]
    # The floor should use the widest vectors this CPU has, as the backend's AVX2 objects do.
    tries = [flags + ["-march=native"], flags] if platform.machine().lower() in ("x86_64", "amd64") else [flags]
    src = SRC.read_bytes()
    errors = []
    for argv in tries:
        tag = hashlib.sha256(src + " ".join([cxx, *argv]).encode()).hexdigest()[:16]
        out = _cache_dir() / f"stream_floor-{tag}.so"
        try:
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(f".{os.getpid()}.tmp")
                subprocess.run([cxx, *argv, str(SRC), "-o", str(tmp)], check=True, capture_output=True,
                               text=True, timeout=120)
                os.replace(tmp, out)  # atomic: a concurrent run never loads a half-written file
            lib = ctypes.CDLL(str(out))
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(argv)}: {getattr(exc, 'stderr', '') or exc}".strip()[:200])
            continue
        lib.stream_floor_sweep.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int,
                                           ctypes.c_long, ctypes.c_int, ctypes.c_int]
        lib.stream_floor_sweep.restype = None
        return lib, ""
    return None, f"could not build {SRC.name} with {cxx}: " + "; ".join(errors)


def stream_mix(n_state: int) -> tuple[int, int]:
    """(streams updated in place, streams only read) of a step: param + state, and the grad."""
    return 1 + n_state, 1


def sweep_fn(numel: int, rw: int, ro: int):
    """A no-argument callable doing one floor pass over freshly allocated, placed fp32
    streams (and keeping them alive), or None when the library could not be built or
    mada_fused is not importable."""
    lib, _ = library()
    if lib is None:
        return None
    try:  # the optimizer's placement of its state streams
        from mada_fused.flat_state import _placed
    except ImportError:  # a run with the torch anchors only: no package, no floor
        return None

    streams = [_placed(numel, k, dict(device="cpu", dtype=torch.float32)).fill_(1.0) for k in range(rw + ro)]
    ptrs = (ctypes.c_void_p * len(streams))(*[s.data_ptr() for s in streams])
    threads = torch.get_num_threads()

    def sweep() -> None:
        lib.stream_floor_sweep(ptrs, rw, ro, numel, BLOCK, threads)

    sweep.streams = streams  # the buffers live as long as the callable
    return sweep
