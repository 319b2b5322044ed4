"""What the two native backends (``cpu``, ``cuda``) share: one call, built once.

Both extensions take the same ``run(call, alloc)`` (csrc/abi.h, mirrored by
:mod:`.abi`). :class:`NativeBackend` checks the tensors an extension will read
by address (a wrong dtype, device or size there would be a wild memory
access), packs the part of the call that is fixed for a (bucket,
configuration, pass) once, and per step adds only the segment table and the
per-step addresses. A subclass says what differs between devices: which
devices it runs on, the stream, the thread count, the scratch allocator.
"""
from __future__ import annotations

import operator
import weakref
from typing import Callable

import torch

from .. import quant8
from ..flat_state import PARAM_ROUNDS, STATE_8BIT, Bucket
from . import abi, segments
from .base import AdamodKernelConfig, DeviceScalars, MadaKernelConfig, Segments

DTYPE_CODES: dict[torch.dtype, int] = {getattr(torch, name): code for name, code in abi.DTYPES.items()}
# Call.state_dtype (and Call.tangent_dtype) of each bucket state (tangent) dtype: a parameter
# dtype's code, or 8-bit codes.
STATE_CODES: dict[torch.dtype, int] = {**DTYPE_CODES, STATE_8BIT: abi.STATE_8BIT}
_F32, _F64 = torch.float32, torch.float64
_MAX_FIXED = 64  # packed fixed parts kept per bucket (one per pass and group configuration)


def mada_variant(cfg: MadaKernelConfig) -> int:
    """abi.h's MadaBits of a MADA step in this configuration."""
    bits = abi.MADA_BITS
    return ((bits["beta3"] if cfg.has_beta3 else 0) | (bits["vbar"] if cfg.has_vbar else 0)
            | (bits["lion"] if cfg.has_lion else 0) | (bits["mod"] if cfg.has_mod else 0)
            | (bits["tangents"] if cfg.learn else 0))


class NativeBackend:
    """A backend whose passes run in a native extension behind csrc/abi.h."""

    name: str
    # Every native extension stores bf16 state and tangent rows with the stochastic
    # rounding of docs/spec.md sections 5.1 and 5.3 (csrc/mada_math.h: StoreBf16Sr).
    state_dtypes: frozenset[torch.dtype] = frozenset((_F32, _F64, torch.bfloat16))
    tangent_dtypes: frozenset[torch.dtype] = state_dtypes
    # And bf16 parameters rounded to nearest, stochastically or with Kahan
    # summation (docs/spec.md section 5.2; abi.h Call::param_round).
    param_rounds: frozenset[str] = frozenset(PARAM_ROUNDS)

    def __init__(self, ext) -> None:
        self._ext = ext
        # Per bucket: facts checked once (its buffers and the optimizer's scalar
        # tables never change identity) and the fixed part of each call.
        self._known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # -- what a device backend provides -----------------------------------------------
    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        raise NotImplementedError

    def _device_index(self, device: torch.device) -> int:
        """Call.device: the index the extension runs on (the CPU ignores it)."""
        return 0

    def _per_step(self, device: torch.device) -> tuple[int, int]:
        """(Call.stream, Call.num_threads) for a pass starting now."""
        raise NotImplementedError

    def _alloc(self, device: torch.device) -> Callable[[int], torch.Tensor] | None:
        """The scratch allocator handed to ``run`` (None where the extension needs none)."""
        return None

    # -- the Backend protocol -----------------------------------------------------------
    def mada_step(self, bucket: Bucket, seg: Segments, scalars: DeviceScalars, cfg: MadaKernelConfig,
                  dot_out: torch.Tensor | None) -> None:
        self._mada(abi.MADA_STEP, bucket, seg, scalars, cfg, dot_out)

    def mada_dot(self, bucket: Bucket, seg: Segments, scalars: DeviceScalars, cfg: MadaKernelConfig,
                 dot_out: torch.Tensor) -> None:
        self._mada(abi.MADA_DOT, bucket, seg, scalars, cfg, dot_out)

    def adamod_step(self, bucket: Bucket, seg: Segments, scalars: DeviceScalars, cfg: AdamodKernelConfig) -> None:
        self._run(abi.ADAMOD_STEP, bucket, seg, scalars, cfg, None)

    def _mada(self, op: int, bucket, seg, sc: DeviceScalars, cfg: MadaKernelConfig, dot_out) -> None:
        if sc.coef is None:
            raise ValueError(f"{self.name} backend: a MADA pass needs the coefficients")
        self._check("dot_out", dot_out, bucket.device, _F64, len(cfg.learn))
        self._run(op, bucket, seg, sc, cfg, dot_out)

    # -- the call -----------------------------------------------------------------------
    def _check(self, name: str, t: torch.Tensor | None, device: torch.device, dtype: torch.dtype,
               numel: int | None = None) -> None:
        segments.check_tensor(self.name, name, t, device, dtype, numel)

    def _run(self, op: int, bucket: Bucket, seg: Segments, sc: DeviceScalars, cfg, dot_out) -> None:
        fixed = self._fixed_part(op, bucket, sc, cfg)
        dev = bucket.device
        self._check("grad_scale", sc.grad_scale, dev, _F32, 1)
        self._check("found_inf", sc.found_inf, dev, _F32, 1)
        table = segments.pack(seg)  # host memory, alive until run returns
        stream, threads = self._per_step(dev)
        step = abi.pack_step(
            rows=table.buffer_info()[0], n_rows=len(seg.params), coef=segments.address(sc.coef),
            grad_scale=segments.address(sc.grad_scale), found_inf=segments.address(sc.found_inf),
            dot_out=segments.address(dot_out), stream=stream, num_threads=threads,
        )
        self._ext.run(fixed + step, self._alloc(dev))

    def _fixed_part(self, op: int, bucket: Bucket, sc: DeviceScalars, cfg) -> bytes:
        """The fixed part of the call, packed once per (bucket, config, seed, pass) while the
        bucket's tensors and the optimizer's scalar tables keep their identity."""
        known = self._known_facts(bucket, sc)
        key = (op, cfg, sc.sr_seed)
        fixed = known["fixed"].get(key)
        if fixed is None:
            if len(known["fixed"]) >= _MAX_FIXED:  # a scheduler cycling betas makes a config per step
                known["fixed"].pop(next(iter(known["fixed"])))
            fixed = known["fixed"][key] = self._pack_fixed(op, bucket, sc, cfg)
        return fixed

    def _known_facts(self, bucket: Bucket, sc: DeviceScalars) -> dict:
        """Checks what the extension reads by address, once per tensor identity."""
        dev = bucket.device
        tensors = bucket.tensors()
        known = self._known.get(bucket)
        if known is None or known["tensors"] != list(map(id, tensors)):
            self._check("steps", bucket.steps, dev, _F64, len(bucket.params))
            for name, buf in bucket.buffers.items():
                self._check(f"state {name!r}", buf, dev, bucket.state_dtype, bucket.numel)
            for name, buf in bucket.scales.items():
                self._check(f"scales {name!r}", buf, dev, _F32, bucket.numel // quant8.BLOCK)
            if bucket.comp is not None:
                self._check("kahan_comp", bucket.comp, dev, torch.bfloat16, bucket.numel)
            if bucket.tangents is not None:
                segments.check_rows(self.name, "tangents", bucket.tangents, dev, bucket.tangent_dtype, bucket.numel)
            if bucket.tangent_scales is not None:
                segments.check_rows(self.name, "tangent scales", bucket.tangent_scales, dev, _F32,
                                    bucket.numel // quant8.BLOCK)
            known = self._known[bucket] = {"tensors": list(map(id, tensors)), "scalars": None, "coef": None,
                                           "fixed": {}}
        scalars = (sc.lr, sc.weight_decay)
        if known["scalars"] is None or any(map(operator.is_not, known["scalars"], scalars)):
            self._check("lr", sc.lr, dev, _F64)
            self._check("weight_decay", sc.weight_decay, dev, _F64, sc.lr.numel())
            known["scalars"] = scalars  # held, so no other tensor can take their ids
            known["fixed"] = {}
        if sc.coef is not None and sc.coef is not known["coef"]:
            self._check("coef", sc.coef, dev, _F64, 6)
            known["coef"] = sc.coef
        return known

    def _pack_fixed(self, op: int, bucket: Bucket, sc: DeviceScalars, cfg) -> bytes:
        if op == abi.ADAMOD_STEP:
            variant = abi.ADAMOD_BITS["diff"] if cfg.diff else 0
            learn, state_names, maximize, vbar_detach = (), abi.ADAMOD_STATE, cfg.maximize, False
            consts = (cfg.beta1, cfg.beta2, cfg.beta3, cfg.eps)
        else:
            variant = mada_variant(cfg) if op == abi.MADA_STEP else 0
            learn, state_names, maximize, vbar_detach = cfg.learn, abi.MADA_STATE, cfg.maximize, cfg.vbar_detach
            consts = (cfg.eps, cfg.mod_beta, *cfg.lion_betas)
        return abi.pack_fixed(
            op=op, variant=variant, dtype=DTYPE_CODES[bucket.dtype], state_dtype=STATE_CODES[bucket.state_dtype],
            sr_seed=sc.sr_seed, tangent_dtype=STATE_CODES[bucket.tangent_dtype], learn_mask=abi.mask_of(learn),
            maximize=maximize, vbar_detach=vbar_detach, device=self._device_index(bucket.device),
            state_numel=bucket.numel, num_groups=sc.lr.numel(), num_params=len(bucket.params),
            lr=sc.lr.data_ptr(), wd=sc.weight_decay.data_ptr(), steps=bucket.steps.data_ptr(),
            state=segments.addresses(bucket.buffers, state_names),
            scales=segments.addresses(bucket.scales, state_names),
            tangents=segments.address(bucket.tangents if learn else None), tan_stride=bucket.tangent_stride,
            tan_scales=segments.address(bucket.tangent_scales if learn else None),
            tan_scale_stride=0 if bucket.tangent_scales is None else bucket.tangent_scales.stride(0),
            consts=consts, param_round=abi.PARAM_ROUNDS[bucket.param_round], comp=segments.address(bucket.comp),
        )
