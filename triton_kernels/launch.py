"""Host side of the Triton backend: chunk tables, launch configs, the fixed-order reduction.

A bucket's active parameters are arbitrary tensors (one grad each), so the
kernel never sees them as arguments: it reads a chunk table, one int64 row
(param address, grad address, state offset, element count, group, param index)
per CHUNK elements of one parameter, so one launch covers any number of
parameters (two when some rows are not 16-byte aligned: those run without
alignment hints). The table is a pure function of those addresses and offsets,
so it is cached under them and built again only when the layout moves (a new
grad allocation); on CUDA it reaches the device by a non-blocking copy from
pinned memory, so a step never waits for the host and a captured graph replays
the same table.

Hyper-gradient dots: each program writes one fp64 partial per learned row into
a scratch buffer, and torch sums those in table order, so a layout and launch
config always give the same bits. The config (BLOCK, num_warps) is fixed, not
timed: timing ran real steps on the live buckets (cloning every mutated buffer
to undo them, ~14x a full MADA bucket), could time a found_inf no-op, synced the
host inside step(), and let ranks that timed differently sum in different orders
and so learn different coefficients. MADA_TRITON_CONFIG overrides it (set the
same value on every rank).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections import OrderedDict

import torch
import triton

from ..backends.abi import ADAMOD_STATE, MADA_STATE, PARAM_ROUNDS
from ..backends.segments import pack

_MADA, _ADAMOD = 0, 1
# The interpreter costs ~0.1 s per block whatever its size, so blocks are big;
# two per chunk still let tests reach multi-row tables, full blocks and tails.
_INTERP_CHUNK, _INTERP_BLOCK = 1024, 512
_CHUNK = 8192  # native: 64M params -> 8192 programs, tails of small tensors stay cheap
# (BLOCK, num_warps) worth trying with MADA_TRITON_CONFIG; every BLOCK divides _CHUNK.
# The first is the default.
CONFIGS = ((1024, 8), (512, 4), (2048, 16), (2048, 8), (256, 4))
CONFIG_ENV = "MADA_TRITON_CONFIG"  # "BLOCK,WARPS"

_modules: dict[bool, object] = {}
_layouts: OrderedDict = OrderedDict()
_MAX_LAYOUTS = 64
_captured: list = []  # layouts and constants a CUDA graph reads: never freed, the graph replays their addresses
_consts: OrderedDict = OrderedDict()
_MAX_CONSTS = 64


def kernels(interpret: bool):
    """kernels.py, compiled (CUDA) or interpreted (CPU tensors).

    Triton picks the mode when a function is decorated, from TRITON_INTERPRET.
    Loading the module once per mode, each under a pinned knob, lets the
    interpreted copy serve CPU tensors while CUDA tensors stay compiled,
    whatever the environment said when mada_fused was imported. One load
    cannot serve both: the compiler resolves the kernel's helpers through the
    module's globals and needs jit functions there, the interpreter needs plain
    Python there (kernels.py), so each mode has its own globals. Both copies
    come from this one file, through this one function.
    """
    if interpret not in _modules:
        name = f"{__package__}._kernels_{'interpreted' if interpret else 'compiled'}"
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.py")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = interpret
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        _modules[interpret] = mod
    return _modules[interpret]


class _Layout:
    """Chunk table of one layout, with its reduction scratch (one fp64 partial per row and chunk)."""

    def __init__(self, seg, bucket, chunk: int):
        pes = seg.params[0].element_size()
        # The narrowest stream sets the 16-byte vector (the bucket aligns offsets to it: flat_state.ALIGN).
        ses = min(bucket.state_dtype.itemsize, bucket.tangent_dtype.itemsize)
        if any(o < 0 or o + n > bucket.numel for o, n in zip(seg.offsets, seg.numels)):
            raise ValueError(f"triton backend: a segment lies outside the bucket's {bucket.numel} state elements")
        # One row per parameter (the shared SegRow layout, contiguity checked), then one per
        # chunk of it: addresses and state offset advance by the chunk's start, the count is what is left.
        rows = torch.frombuffer(pack(seg), dtype=torch.int64).view(-1, 6).clone()
        per = (rows[:, 3] + chunk - 1) // chunk
        host = rows.repeat_interleave(per, dim=0)
        first = torch.repeat_interleave(torch.cumsum(per, 0) - per, per)
        local = (torch.arange(host.shape[0]) - first) * chunk
        host[:, :2] += (local * pes).unsqueeze(1)
        host[:, 2] += local
        host[:, 3] = (host[:, 3] - local).clamp(max=chunk)
        # Rows whose param, grad and state all start on 16-byte boundaries go first and get
        # their own launch with alignment hints, so one odd-sized view in a flat buffer does
        # not cost the whole bucket its vector accesses. Row order is the reduction order.
        vec = 16 // ses
        ok = (host[:, 0] % 16 == 0) & (host[:, 1] % 16 == 0) & (host[:, 2] % vec == 0)
        host = torch.cat([host[ok], host[~ok]])
        self.n_chunks = host.shape[0]
        n_ok = int(ok.sum())
        self.parts = [(lo, hi, aligned) for lo, hi, aligned in ((0, n_ok, True), (n_ok, self.n_chunks, False))
                      if hi > lo]
        self.s_vec = vec
        self.t_aligned = bucket.tangent_stride % vec == 0
        dev = bucket.device
        if dev.type == "cuda":
            self._host = host.pin_memory()  # must outlive the async copy (and any graph replay)
            self.table = self._host.to(dev, non_blocking=True)
        else:
            self.table = host
        self.partial = torch.zeros(6, max(self.n_chunks, 1), dtype=torch.float64, device=dev)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _refuse_in_capture(what: str) -> None:
    # Raised before any launch of the step: a capture only records, so nothing has changed.
    raise RuntimeError(f"triton backend: {what} inside CUDA-graph capture, which needs a host upload; "
                       "run an eager step with the same tensors before capturing (warm-up)")


def _layout(seg, bucket, chunk: int) -> _Layout:
    # Everything _Layout reads: the tangent stride sets the T_ALIGNED promise, the bucket size the bound check.
    key = (bucket.device, bucket.state_dtype, bucket.tangent_dtype, chunk, bucket.numel, bucket.tangent_stride,
           tuple(p.data_ptr() for p in seg.params), tuple(g.data_ptr() for g in seg.grads), tuple(seg.offsets),
           tuple(seg.numels), tuple(seg.groups), tuple(seg.param_index))
    capturing = _capturing(bucket.device)
    lay = _layouts.get(key)
    if lay is None and capturing:
        # A new table means pinned host memory and an upload, neither of which a graph may record.
        _refuse_in_capture("a new parameter/grad layout")
    if lay is None:
        lay = _layouts[key] = _Layout(seg, bucket, chunk)
        while len(_layouts) > _MAX_LAYOUTS:  # grads reallocated every step must not grow it forever
            _layouts.popitem(last=False)
    else:
        _layouts.move_to_end(key)
    if capturing and not any(c is lay for c in _captured):
        _captured.append(lay)
    return lay


def _const(values: tuple[float, ...], device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    # Host constants travel as fp64 device data: a Python float argument would be
    # rounded to fp32, which fp64 state must not see. (int64: addresses.)
    key = (values, device, dtype)
    const = _consts.get(key)
    if const is None:
        if _capturing(device):
            _refuse_in_capture("a new set of optimizer constants")
        const = _consts[key] = torch.tensor(values, dtype=dtype, device=device)
        while len(_consts) > _MAX_CONSTS:  # a scheduler cycling betas makes a set per step
            _consts.popitem(last=False)
    else:
        _consts.move_to_end(key)
    if _capturing(device) and not any(c is const for c in _captured):
        _captured.append(const)  # a graph replays its address: never freed
    return const


def _config() -> tuple[int, int]:
    """(BLOCK, num_warps): the default, or MADA_TRITON_CONFIG's."""
    pinned = os.environ.get(CONFIG_ENV)
    if not pinned:
        return CONFIGS[0]
    try:
        block, warps = (int(x) for x in pinned.split(","))
    except ValueError:
        raise ValueError(f"{CONFIG_ENV}={pinned!r}: expected 'BLOCK,WARPS', e.g. '1024,8'") from None
    if block <= 0 or _CHUNK % block or block & (block - 1) or warps <= 0 or warps & (warps - 1):
        raise ValueError(f"{CONFIG_ENV}={pinned!r}: BLOCK must be a power of two dividing {_CHUNK}, "
                         "WARPS a power of two")
    return block, warps


def _launch(kind: int, bucket, seg, scalars, coef, consts, *, states, flags: dict,
            dot_out: torch.Tensor | None, nl: int) -> None:
    interp = bucket.device.type != "cuda"
    chunk = _INTERP_CHUNK if interp else _CHUNK
    lay = _layout(seg, bucket, chunk)
    if lay.n_chunks == 0:
        return
    dummy = bucket.steps  # stands in for pointers a variant never dereferences
    ptrs = [bucket.buffers.get(n, dummy) if n else dummy for n in states]
    # 8-bit state: the addresses of each slot's scales, in the kernel's state order (MADA's, or
    # AdaMod's m, v, s, g_prev), padded to the kernel's seven slots, then (8-bit tangent rows,
    # spec 5.5) the address of the rows' scales and their row stride, as one int64 table.
    q8 = bool(bucket.scales)
    tq8 = bucket.tangent_scales is not None and nl > 0
    qsc = dummy
    if q8:
        names = MADA_STATE if kind == _MADA else ADAMOD_STATE
        table = [bucket.scales[n].data_ptr() if n in bucket.scales else 0 for n in names]
        table += [0] * (len(MADA_STATE) - len(table))
        if tq8:
            table += [bucket.tangent_scales.data_ptr(), bucket.tangent_scales.stride(0)]
        qsc = _const(tuple(table), bucket.device, torch.int64)
    tan = bucket.tangents if bucket.tangents is not None else dummy
    comp = bucket.comp if bucket.comp is not None else dummy
    scale, found = scalars.grad_scale, scalars.found_inf
    args = (lay.table, seg.params[0], *ptrs, comp, tan, bucket.tangent_stride, coef, scalars.lr, scalars.weight_decay,
            bucket.steps, consts, dummy if scale is None else scale, dummy if found is None else found,
            lay.partial, lay.n_chunks)
    meta = dict(KIND=kind, NL=nl, NLP=triton.next_power_of_2(max(nl, 1)), HAS_SCALE=scale is not None,
                HAS_INF=found is not None, SR=bucket.state_dtype == torch.bfloat16,
                TSR=bucket.tangent_dtype == torch.bfloat16, PROUND=PARAM_ROUNDS[bucket.param_round],
                T_ALIGNED=lay.t_aligned, S_VEC=lay.s_vec, CHUNK=chunk,
                Q8=q8, TQ8=tq8, **flags)
    fn = kernels(interp).fused_step
    block, warps = (_INTERP_BLOCK, 1) if interp else _config()
    # Triton launches on the current device.
    with contextlib.nullcontext() if interp else torch.cuda.device(bucket.device):
        for lo, hi, aligned in lay.parts:  # the aligned rows, then the rest: at most two launches
            # No FMA contraction: the reference and the C++ backends round after every op.
            fn[(hi - lo,)](*args, lo, scalars.sr_seed, qsc, **meta, ALIGNED=aligned, BLOCK=block, num_warps=warps,
                           enable_fp_fusion=False)
    if dot_out is not None:
        # Fixed-order fp64 reduction over chunks: the same layout and config give the same bits.
        dot_out.add_(lay.partial[:nl, :lay.n_chunks].sum(dim=1).to(dot_out.dtype))


# Flags a kernel kind never varies.
_MADA_FIXED = dict(DIFF=False)
_ADAMOD_FIXED = dict(STEP=True, DOT=False, ROWS=0, HAS_BETA3=False, HAS_VBAR=False, HAS_LION=False,
                  HAS_MOD=False, VBAR_DETACH=False)


def mada(bucket, seg, scalars, cfg, dot_out: torch.Tensor | None, step: bool) -> None:
    """One MADA pass: dot (if dot_out) then, when ``step``, the docs/spec.md section 1 update."""
    nl = len(cfg.learn)
    rows = 0
    for k in range(6):  # 3 bits per coefficient: its tangent row, 7 = not learned
        rows |= (cfg.learn.index(k) if k in cfg.learn else 7) << (3 * k)
    flags = dict(STEP=step, DOT=dot_out is not None and nl > 0, ROWS=rows, HAS_BETA3=cfg.has_beta3,
                 HAS_VBAR=cfg.has_vbar, HAS_LION=cfg.has_lion, HAS_MOD=cfg.has_mod,
                 VBAR_DETACH=cfg.vbar_detach, MAXIMIZE=cfg.maximize, **_MADA_FIXED)
    if not (flags["STEP"] or flags["DOT"]):
        return
    consts = _const((cfg.eps, cfg.mod_beta, *cfg.lion_betas), bucket.device)
    _launch(_MADA, bucket, seg, scalars, scalars.coef, consts,
            states=MADA_STATE, flags=flags,
            dot_out=dot_out if flags["DOT"] else None, nl=nl)


def adamod(bucket, seg, scalars, cfg) -> None:
    """One AdaMod / DiffMod pass (docs/spec.md sections 3 and 4)."""
    consts = _const((cfg.beta1, cfg.beta2, cfg.beta3, cfg.eps), bucket.device)
    # The kernel's state slots are MADA's (m, v, n, g_prev, l, vb, s); AdaMod fills four.
    _launch(_ADAMOD, bucket, seg, scalars, consts, consts,
            states=("m", "v", None, "g_prev" if cfg.diff else None, None, None, "s"),
            flags=dict(_ADAMOD_FIXED, DIFF=cfg.diff, MAXIMIZE=cfg.maximize), dot_out=None, nl=0)
