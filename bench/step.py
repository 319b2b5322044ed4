"""Timing core of the step benchmark: configs, byte counts, copy bandwidth, one case.

Everything is table-driven: a case is (config, backend). A config names an
optimizer class and its kwargs; the backend is a mada_fused backend or one of
the torch anchors (AdamW fused / foreach), which only run the "adamw" config.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .floor import stream_mix, sweep_fn
from .models import LAYOUTS, make_params, numel_of

ALL_COEFS = ("beta1", "beta2", "beta3", "rho", "c", "gamma")


@dataclass(frozen=True)
class Config:
    name: str
    cls: str  # class name in mada_fused, or "AdamW" for the torch anchors
    kwargs: dict = field(default_factory=dict, hash=False)
    about: str = ""


_FULL = dict(beta3=0.5, rho=0.5, c=0.5, gamma=0.5, learn=ALL_COEFS, hyper_warmup=0)
CONFIGS: dict[str, Config] = {
    c.name: c
    for c in [
        Config("adamw", "AdamW", {}, "torch.optim.AdamW (anchor)"),
        Config("adam_corner", "MADA", dict(beta3=0.0, rho=1.0, c=1.0, gamma=1.0, learn=()),
               "MADA at Adam's corner, nothing learned"),
        Config("mada_full", "MADA", _FULL, "MADA, all six coefficients learned, interior start"),
        Config("mada_mod", "MADA", dict(_FULL, mod_beta=0.999), "mada_full + AdaMod clip (mod_beta=0.999)"),
        Config("adamod", "AdaMod", {}, "AdaMod defaults"),
        Config("avgrad", "AVGrad", {}, "AVGrad defaults"),
        Config("diffmod", "DiffMod", {}, "DiffMod defaults"),
    ]
}
DEFAULT_CONFIGS = ("adam_corner", "mada_full", "mada_mod", "adamod")
ANCHORS: dict[str, dict] = {"torch_fused": dict(fused=True), "torch_foreach": dict(foreach=True)}
BACKEND_DEVICE = {"reference": None, "cpu": "cpu", "cuda": "cuda", "triton": "cuda"}  # None: any


def state_buffers(cfg: Config) -> int:
    """State buffers a config allocates (tangents count one per learned coefficient).

    Mirrors docs/spec.md section 1.4, "state that a configuration never reads is never allocated".
    """
    fixed = {"AdamW": 2, "AdaMod": 3, "AVGrad": 3, "DiffMod": 4}  # m,v | +s | +vb | +s,g_prev
    if cfg.cls in fixed:
        return fixed[cfg.cls]
    kw, learn = cfg.kwargs, set(cfg.kwargs.get("learn", ALL_COEFS))

    def can_move(name: str, idle: float) -> bool:  # learned, or starts away from its idle value
        return name in learn or kw.get(name, idle) != idle

    n = 2  # m, v
    n += 2 * can_move("beta3", 0.0)  # n, g_prev
    n += can_move("rho", 1.0)  # vb
    n += can_move("gamma", 1.0)  # l (Lion momentum)
    n += kw.get("mod_beta", 0.0) > 0  # s
    return n + len(learn)


def bytes_moved(numel: int, param_bytes: int, n_state: int, state_bytes: int = 4) -> int:
    """Minimum DRAM traffic of one step: read param+grad, write param, read+write each state buffer."""
    return numel * (3 * param_bytes + 2 * state_bytes * n_state)


def available_backends(device: str, wanted: list[str] | None) -> tuple[list[str], list[str]]:
    """(usable mada_fused backends on this device, notes on the ones left out)."""
    try:
        import mada_fused

        built = list(mada_fused.build_info().get("backends_available", []))
    except Exception as exc:
        return [], [f"mada_fused not importable ({exc.__class__.__name__}: {exc}); only torch anchors timed"]
    dev = torch.device(device).type
    names = wanted if wanted is not None else list(BACKEND_DEVICE)
    use, notes = [], []
    for b in names:
        if b not in BACKEND_DEVICE:
            notes.append(f"unknown backend {b!r} skipped")
        elif b not in built:
            notes.append(f"backend {b!r} not available in this build (built: {built}); skipped")
        elif BACKEND_DEVICE[b] not in (None, dev):
            notes.append(f"backend {b!r} runs on {BACKEND_DEVICE[b]} tensors, not {dev}; skipped")
        else:
            use.append(b)
    return use, notes


def make_optimizer(cfg: Config, backend: str, params: list[torch.Tensor], lr: float = 1e-3):
    if backend in ANCHORS:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **ANCHORS[backend])
    import mada_fused

    return getattr(mada_fused, cfg.cls)(params, lr=lr, backend=backend, **cfg.kwargs)


def one_param_optimizer(cfg: Config, backend: str, init: torch.Tensor, grad: torch.Tensor):
    """An optimizer over one parameter: a copy of ``init``, with a copy of ``grad`` as its gradient."""
    p = torch.nn.Parameter(init.clone())
    p.grad = grad.clone()
    return make_optimizer(cfg, backend, [p])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


SLOW_S = 1.0  # a first call slower than this shortens warm-up and repetitions


def time_fn(fn: Callable[[], object], device: str, warmup: int, min_reps: int, max_reps: int,
            budget_s: float) -> list[float]:
    """Seconds per call: CUDA events on GPU, perf_counter on CPU; rep count fitted to budget_s."""
    t0 = time.perf_counter()
    fn()  # the first call allocates state and (GPU) compiles the kernels
    sync(device)
    first = time.perf_counter() - t0
    if first > SLOW_S:  # multi-second steps (the reference at 64M): fewer, still-median-able samples
        warmup, min_reps = 1, min(min_reps, 3)
    t0 = time.perf_counter()
    for _ in range(warmup - 1):
        fn()
    sync(device)
    per_call = (time.perf_counter() - t0) / (warmup - 1) if warmup > 1 else first
    reps = int(min(max_reps, max(min_reps, budget_s / max(per_call, 1e-6))))
    if device.startswith("cuda"):
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in ev:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in ev]
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # unknown: assume a modest machine


def copy_bandwidth(device: str, numel: int, quick: bool) -> dict:
    """Device copy bandwidth from dst.copy_(src): bytes = 2 * size (one read, one write)."""
    numel = min(numel, free_bytes(device) // 4 // 8)  # keep the probe well inside memory
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), device, warmup=2, min_reps=5, max_reps=50,
                    budget_s=0.5 if quick else 2.0)
    del src, dst
    nbytes = 2 * numel * 4
    return {"numel": numel, "bytes": nbytes, "time_ms": statistics.median(times) * 1e3,
            "time_min_ms": min(times) * 1e3, "gbps": nbytes / statistics.median(times) / 1e9,
            "gbps_min_time": nbytes / min(times) / 1e9}


# Extra fp32 temporaries per element of the largest tensor, so a case that would
# swap or OOM is skipped instead. The reference backend materialises every
# intermediate: peak RSS at 16M flat was 16.5 extra floats/element at Adam's
# corner, 32 for mada_full, 35 for mada_mod (about 16 + 1.6 per state buffer).
def temporaries(backend: str, n_state: int) -> float:
    if backend == "reference":
        return 16 + 1.6 * n_state
    return 4 if backend == "torch_foreach" else 1


def fits(numel: int, largest: int, param_bytes: int, n_state: int, backend: str, device: str,
         params_allocated: bool) -> bool:
    state_bytes = param_bytes if backend in ANCHORS else 4
    need = numel * ((0 if params_allocated else 2 * param_bytes) + state_bytes * n_state)
    need += largest * 4 * temporaries(backend, n_state)
    return need < 0.8 * free_bytes(device)


def run_case(cfg: Config, backend: str, params: list[torch.Tensor], device: str, quick: bool) -> list[float]:
    """Seconds per step of one (config, backend) on prepared params, fresh optimizer state."""
    with fresh_pages(device):
        opt = make_optimizer(cfg, backend, params)
        opt.step()  # allocates the state
    try:
        return time_fn(opt.step, device, warmup=2 if quick else 3, min_reps=3 if quick else 5,
                       max_reps=20 if quick else 100, budget_s=0.3 if quick else 2.0)
    finally:
        del opt
        gc.collect()


def run_floor(numel: int, n_state: int, quick: bool) -> list[float] | None:
    """Seconds per pass of the memory floor for a step's stream mix (bench/floor.py), fresh
    buffers; None where it cannot run (no compiler, or the buffers would not fit)."""
    rw, ro = stream_mix(n_state)
    if numel * 4 * (rw + ro) > 0.8 * free_bytes("cpu"):
        return None
    with fresh_pages("cpu"):
        sweep = sweep_fn(numel, rw, ro)
    if sweep is None:
        return None
    try:
        return time_fn(sweep, "cpu", warmup=2 if quick else 3, min_reps=3 if quick else 5,
                       max_reps=20 if quick else 100, budget_s=0.3 if quick else 2.0)
    finally:
        del sweep
        gc.collect()


def x_floor(times: list[list[float]], when: list[int], floors: dict[tuple[int, int], list[float]],
            n_state: int) -> dict:
    """A row's "x floor": the median over rounds of (its round median / that round's floor
    median for its stream mix), and the floor's own median of round medians.
    ``when[i]`` is the round ``times[i]`` ran in; ``floors`` is keyed by (round, n_state)."""
    ratios = [statistics.median(t) / statistics.median(floors[(r, n_state)])
              for r, t in zip(when, times) if (r, n_state) in floors]
    own = [statistics.median(f) * 1e3 for (_, n), f in floors.items() if n == n_state]
    return {"x_floor": statistics.median(ratios) if ratios else None,
            "floor_ms": statistics.median(own) if own else None}


def summarize(rounds: list[list[float]]) -> dict:
    """A row's times from its rounds: the median of the round medians, so no single
    placement of the state buffers in memory decides a ratio, and their spread."""
    medians = [statistics.median(t) for t in rounds]
    return {"time_ms": statistics.median(medians) * 1e3, "time_min_ms": min(map(min, rounds)) * 1e3,
            "reps": sum(map(len, rounds)), "round_ms": [m * 1e3 for m in medians]}


def cases(configs: list[str], backends: list[str]) -> list[tuple[Config, str]]:
    out = [(CONFIGS["adamw"], a) for a in ANCHORS]
    out += [(CONFIGS[c], b) for c in configs if c != "adamw" for b in backends]
    return out


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_FRESH, _MMAP_HEAP = 128 << 10, 32 << 20  # glibc's default, and the most its dynamic mode grows to


@functools.lru_cache(maxsize=1)
def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt, looked up once (find_library runs ldconfig); None elsewhere."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallopt", None)
    except OSError:
        return None


def _mmap_threshold(nbytes: int) -> None:
    mallopt = _mallopt()
    if mallopt is not None:  # not glibc: nothing to steady
        mallopt(_M_MMAP_THRESHOLD, nbytes)
        # As glibc's dynamic mode does: without it, each freed temporary at the top of the
        # heap would go back to the OS and be faulted in again on the next step.
        mallopt(_M_TRIM_THRESHOLD, 2 * nbytes)


@contextlib.contextmanager
def fresh_pages(device: str):
    """Long-lived host buffers (params, optimizer state) allocated inside come from fresh mmap'd pages.

    glibc raises its mmap threshold whenever a large block is freed, so once the
    reference backend has freed its temporaries, the next optimizer's state came
    from a fragmented heap at odd offsets, and a case timed right after the
    reference ran up to 30 % slower than the same case alone. Per-step
    temporaries (foreach, reference) still come from the heap, as they would in
    glibc's dynamic mode.
    """
    if device.startswith("cuda"):
        yield
        return
    _mmap_threshold(_MMAP_FRESH)
    try:
        yield
    finally:
        _mmap_threshold(_MMAP_HEAP)


def run_benchmark(device: str, sizes: list[int], layouts: list[str], configs: list[str],
                  backends: list[str], dtype: torch.dtype, quick: bool, stat: str = "median",
                  progress: Callable[[int], Callable[[str | None], None]] | None = None,
                  rounds: int = 1) -> tuple[list[dict], dict]:
    """All rows for sizes x layouts x cases, plus the copy-bandwidth probe.

    With ``rounds > 1`` every case is timed that many times, interleaved with the
    others and each time with freshly allocated state: step time depends on where
    the allocator put the buffers (at 1M on a CPU, +-20 % between processes), and
    a ratio of two single runs would mostly measure that. The reference backend
    and cases slower than SLOW_S per step run once. On the CPU in fp32, each round
    also times the memory floor of every stream mix it runs (bench/floor.py), just
    before the first case with that mix: rows get ``x_floor`` and ``floor_ms``.
    """
    bw = copy_bandwidth(device, (256 << 20) if device.startswith("cuda") else (64 << 20), quick)
    with_floor = torch.device(device).type == "cpu" and dtype == torch.float32  # the floor moves fp32
    pbytes = torch.empty((), dtype=dtype).element_size()
    todo = cases(configs, backends)
    tick = progress(len(sizes) * len(layouts) * len(todo) * rounds) if progress else (lambda _msg: None)
    rows: list[dict] = []
    for layout in layouts:
        for size in sizes:
            shapes = LAYOUTS[layout](size)
            numel, largest = numel_of(shapes), max(numel_of([s]) for s in shapes)
            params = None
            block = []
            for cfg, backend in todo:
                n_state = state_buffers(cfg)
                row = {"layout": layout, "numel": numel, "n_tensors": len(shapes), "config": cfg.name,
                       "backend": backend, "dtype": str(dtype).replace("torch.", ""), "n_state": n_state,
                       "bytes": bytes_moved(numel, pbytes, n_state, pbytes if backend in ANCHORS else 4)}
                if not fits(numel, largest, pbytes, n_state, backend, device, params is not None):
                    row["skipped"] = "does not fit in free memory"
                elif params is None:
                    with fresh_pages(device):
                        params = make_params(shapes, device, dtype)
                block.append((cfg, backend, row, [], []))
            # The reference runs once, in the last round and last in it: whatever ran right
            # after it came out 5-20 % slower, so no fused case or anchor may follow it.
            block.sort(key=lambda case: case[1] == "reference")
            floors: dict[tuple[int, int], list[float]] = {}  # (round, n_state) -> floor pass times
            for r in range(rounds):
                for cfg, backend, row, times, when in block:
                    tick(f"{layout} {numel / 1e6:.0f}M {cfg.name}@{backend}" + (f" round {r + 1}" if rounds > 1 else ""))
                    slow = times and statistics.median(times[0]) > SLOW_S  # timed once is enough
                    if "skipped" in row or slow or (backend == "reference" and r < rounds - 1):
                        continue
                    # Before the case, not after: nothing may follow the reference in a round.
                    if with_floor and (r, row["n_state"]) not in floors:
                        floor = run_floor(numel, row["n_state"], quick)
                        if floor:
                            floors[(r, row["n_state"])] = floor
                    try:
                        times.append(run_case(cfg, backend, params, device, quick))
                        when.append(r)
                    except Exception as exc:  # one broken backend must not sink the table
                        row["skipped"] = f"error: {exc.__class__.__name__}: {str(exc)[:160]}"
            for _, _, row, times, when in block:
                if "skipped" not in row:
                    row.update(summarize(times), **x_floor(times, when, floors, row["n_state"]))
                rows.append(row)
            del params
            gc.collect()
    tick(None)
    derive(rows, bw, stat)
    return rows, bw


def derive(rows: list[dict], bw: dict, stat: str = "median") -> None:
    """GB/s, fraction of copy bandwidth and time ratio to torch fused AdamW of the same shape,
    from the median step time, or with stat="min" from the fastest one (a shared, busy machine
    only ever adds time, so the minimum is the steadier estimate there)."""
    key = "time_ms" if stat == "median" else "time_min_ms"
    copy_gbps = bw["gbps"] if stat == "median" else bw["gbps_min_time"]
    anchor = {(r["layout"], r["numel"]): r[key] for r in rows if r["backend"] == "torch_fused" and key in r}
    for r in rows:
        if key not in r:
            continue
        r["stat"] = stat
        r["gbps"] = r["bytes"] / (r[key] / 1e3) / 1e9
        r["frac_copy"] = r["gbps"] / copy_gbps
        ref = anchor.get((r["layout"], r["numel"]))
        r["ratio_torch_fused"] = r[key] / ref if ref else None
