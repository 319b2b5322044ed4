"""The pure-PyTorch backend: the fallback on any device and the test oracle.

It is docs/spec.md (sections 1, 3, 4, 5) in tensor ops, one parameter at a time, and follows
csrc/mada_math.h term by term (coefficients are rounded to the state dtype
first, powers are taken in float64), so fused backends can be held to it at
rounding level; the header multiplies by reciprocals of the bias corrections
where this divides, a one-ulp difference. It never reads a device value on
the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import quant8
from ..coefficients import COEFFICIENTS
from ..flat_state import KAHAN_COMP, PARAM_ROUNDS, STATE_8BIT, Bucket, compute_dtype_for
from . import abi
from .base import (
    AdamodKernelConfig,
    DeviceScalars,
    MadaKernelConfig,
    Segments,
)

B1, B2, B3, RHO, C, GAMMA = range(len(COEFFICIENTS))
# The hash's buffer number of coefficient j's bf16 tangent row is BUF_TAN0 + j, after the state
# buffers (mada_math.h: kBufTan0).
BUF_TAN0 = len(abi.MADA_STATE)


class _Slot:
    """One active parameter: its flat data, processed grad and state views; ``state``
    holds the stored values in the compute dtype, ``views`` the buffers to write."""

    def __init__(self, bucket: Bucket, seg: Segments, i: int, sc: DeviceScalars, maximize: bool,
                 buffers: tuple[str, ...], seed: int):
        self.param = seg.params[i].view(-1)
        lo = seg.offsets[i]
        hi = lo + seg.numels[i]
        sd = compute_dtype_for(bucket.state_dtype)  # bf16 and 8-bit state are only storage
        self.views = {name: buf[lo:hi] for name, buf in bucket.buffers.items()}
        # 8-bit state: each buffer's block scales (its offset is a whole number of blocks).
        self.scales = {name: buf[quant8.blocks_of(lo, hi)] for name, buf in bucket.scales.items()}
        self.state = {name: quant8.dequantize(v, self.scales[name], quant8.is_signed(name)) if self.scales
                      else v.to(sd) for name, v in self.views.items()}
        self.tangents = None if bucket.tangents is None else bucket.tangents[:, lo:hi]
        # 8-bit tangent rows: each row's block scales (docs/spec.md 5.5).
        self.tangent_scales = (None if bucket.tangent_scales is None
                               else bucket.tangent_scales[:, quant8.blocks_of(lo, hi)])
        g = seg.grads[i].view(-1).to(sd)
        if sc.grad_scale is not None:
            g = g / sc.grad_scale.reshape(()).to(sd)
        self.grad = -g if maximize else g
        self.param_round = bucket.param_round
        self.comp = None if bucket.comp is None else bucket.comp[lo:hi]
        self.theta = self.param.to(sd)
        if self.comp is not None:
            self.theta = kahan_weight(self.theta, self.comp.to(sd))
        self.t = bucket.steps[seg.param_index[i]]
        self.lr = sc.lr[seg.groups[i]]
        self.decay = (1.0 - self.lr * sc.weight_decay[seg.groups[i]]).to(sd)
        self.skip = None if sc.found_inf is None else sc.found_inf.reshape(()) != 0
        self.round = (StoreBf16Sr(seed, self.t, buffers, lo, hi) if bucket.state_dtype == torch.bfloat16
                      else store_exact)
        # Tangents are never read in the step that forms them: rounded only as they are stored.
        self.round_tangent = (StoreBf16Sr(seed, self.t, buffers, lo, hi).tangent
                              if bucket.tangent_dtype == torch.bfloat16 else store_exact)
        self.seed, self.lo, self.hi = seed, lo, hi

    def store_param(self, theta: Tensor) -> None:
        """Store the new parameter value as the bucket's param_round says (docs/spec.md 5.2);
        every other dtype, and "nearest", round to nearest even on the copy."""
        if self.param_round == "stochastic":
            key = sr_key(torch.tensor(self.seed, dtype=torch.int64, device=self.t.device),
                         self.t.to(torch.int64) & _U32, K_BUF_PARAM)
            index = torch.arange(self.lo, self.hi, dtype=torch.int64, device=self.t.device)
            theta = sr_bf16(theta, sr_bits(key, index))
        elif self.param_round == "kahan":
            stored = rne_bf16(theta)
            self.write(self.comp, kahan_comp(theta, stored))
            theta = stored
        self.write(self.param, theta)

    def write(self, dst: torch.Tensor, new: torch.Tensor) -> None:
        """Store ``new`` unless GradScaler found an inf this step."""
        dst.copy_(new if self.skip is None else torch.where(self.skip, dst, new.to(dst.dtype)))

    def read_tangents(self) -> Tensor:
        """Last step's tangent rows (L, n) in the compute dtype: bf16 rows widen exactly,
        8-bit rows decode (docs/spec.md 5.3, 5.5)."""
        if self.tangent_scales is not None:
            return quant8.dequantize_rows(self.tangents, self.tangent_scales)
        return self.tangents.to(self.grad.dtype)

    def write_tangent(self, row: int, j: int, new: Tensor) -> None:
        """Store the new du/dk of coefficient ``j`` (canonical index) in tangent row ``row``;
        8-bit rows encode it here, a block at a time (docs/spec.md 5.5)."""
        if self.tangent_scales is None:
            self.write(self.tangents[row], self.round_tangent(j, new))
            return
        codes, scale = quant8.quantize(new, True)
        self.write(self.tangents[row], codes)
        self.write(self.tangent_scales[row], scale)

    def write_state(self, name: str, new: torch.Tensor) -> None:
        """Store a state buffer's new values; 8-bit state quantizes them here, a block at a
        time (docs/spec.md 5.4: the step itself used them unquantized)."""
        if name not in self.scales:
            self.write(self.views[name], new)
            return
        codes, scale = quant8.quantize(new, quant8.is_signed(name))
        self.write(self.views[name], codes)
        self.write(self.scales[name], scale)


# -- bf16 state storage: csrc/mada_math.h's hash and rounding, in int64 tensor ops ---------
# Every value is a uint32 held in an int64; products are split so none leaves int64.
_U32 = 0xFFFFFFFF


def _mul32(h: Tensor, c: int) -> Tensor:
    """(h * c) mod 2^32 for h in [0, 2^32): h * c_low + ((h * c_high) mod 2^16) * 2^16."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _U32


def mix32(h: Tensor) -> Tensor:
    """murmur3's 32-bit finalizer (mada_math.h: mix32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def sr_key(seed: Tensor, step: Tensor, buffer: int) -> Tensor:
    """The key of one (seed, step, buffer) (mada_math.h: sr_key)."""
    return mix32(mix32(mix32(seed) ^ step) ^ buffer)


def sr_bits(key: Tensor, index: Tensor) -> Tensor:
    """32 random bits of each flat element index (mada_math.h: sr_bits)."""
    return mix32(((key + (index >> 32)) & _U32) ^ (index & _U32))


def sr_bf16(x: Tensor, bits: Tensor) -> Tensor:
    """fp32 ``x`` rounded stochastically to bf16 values, returned as fp32 (mada_math.h: sr_bf16)."""
    u = x.view(torch.int32).to(torch.int64) & _U32
    r = torch.where(x.isnan(), u | 0x00400000, u + (bits & 0xFFFF)) >> 16  # the bf16 pattern, < 2^16
    return (r - ((r >> 15) << 16)).to(torch.int16).view(torch.bfloat16).to(torch.float32)


# -- bf16 parameters without fp32 master weights (mada_math.h, docs/spec.md 5.2) -----------
K_BUF_PARAM = 13  # mada_math.h kBufParam: the hash's buffer number of a parameter's own rounding


def rne_bf16(x: Tensor) -> Tensor:
    """fp32 ``x`` rounded to the nearest bf16 value, ties to even, as fp32 (mada_math.h: rne_bf16)."""
    return x.to(torch.bfloat16).to(torch.float32)


def kahan_weight(theta: Tensor, comp: Tensor) -> Tensor:
    """The compensated weight a Kahan step updates (mada_math.h: kahan_weight)."""
    return theta + comp


def kahan_comp(x: Tensor, stored: Tensor) -> Tensor:
    """The new compensation: x's rounding error, rounded to nearest bf16; 0 where the stored
    value is not finite (mada_math.h: kahan_comp)."""
    return torch.where(stored.isfinite(), rne_bf16(x - stored), 0.0)


def store_exact(name: str, x: Tensor) -> Tensor:
    """fp32 or fp64 state: stored as computed (mada_math.h: StoreExact)."""
    return x


class StoreBf16Sr:
    """bf16 state: each new value of buffer ``name`` rounded stochastically (mada_math.h:
    StoreBf16Sr). ``buffers`` is the optimizer's state order, whose positions the hash reads."""

    def __init__(self, seed: int, t: Tensor, buffers: tuple[str, ...], lo: int, hi: int):
        i64 = dict(dtype=torch.int64, device=t.device)
        self.seed = torch.tensor(seed, **i64)
        self.step = t.to(torch.int64) & _U32
        self.buffers = buffers
        self.index = torch.arange(lo, hi, **i64)

    def __call__(self, name: str, x: Tensor) -> Tensor:
        return self._at(self.buffers.index(name), x)

    def tangent(self, j: int, x: Tensor) -> Tensor:
        """A new du/dk of coefficient ``j`` (canonical index) as a bf16 tangent row stores it."""
        return self._at(BUF_TAN0 + j, x)

    def _at(self, buffer: int, x: Tensor) -> Tensor:
        key = sr_key(self.seed, self.step, buffer)
        return sr_bf16(x, sr_bits(key, self.index))


def _sign(x: torch.Tensor) -> torch.Tensor:
    # sign(0) = 0 and sign(NaN) = 0, as the header's sign_of (torch.sign(NaN) is NaN).
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


def _yogi_sign(x: torch.Tensor) -> torch.Tensor:
    # As _sign, but the undefined inf - inf counts as +1 (mada_math.h: yogi_sign).
    return ((x > 0) | x.isnan()).to(x.dtype) - (x < 0).to(x.dtype)


def _blend(a: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # a * x + (1 - a) * y where a weight at an end of [0, 1] contributes exactly
    # nothing, even against an overflowed x or y (mada_math.h: blend).
    return torch.where(a == 0, 0.0, a * x) + torch.where(a == 1, 0.0, (1 - a) * y)


def _accumulate_dot(slot: _Slot, dot_out: torch.Tensor) -> None:
    # Stored rows read as the compute dtype; each product is rounded in it, as the kernels do.
    part = (slot.grad.unsqueeze(0) * slot.read_tangents()).sum(dim=1, dtype=torch.float64)
    dot_out.add_(part if slot.skip is None else torch.where(slot.skip, 0.0, part))


# The pieces below carry csrc/mada_math.h's names and split the step where it
# does, so the two read side by side. Tensors are 0-d (scalars) or one slot's
# elements; a term a configuration does not allocate is never formed.


@dataclass
class MadaScalars:
    """Everything one (parameter, step) needs, in the state dtype (mada_math.h: MadaScalars)."""

    beta1: Tensor
    beta2: Tensor
    beta3: Tensor
    rho: Tensor
    c: Tensor
    gamma: Tensor
    lr: Tensor
    decay: Tensor  # 1 - lr * weight_decay
    t: Tensor  # this parameter's step count (float64), >= 1
    bc1: Tensor  # 1 - beta^t
    bc2: Tensor
    dbc1: Tensor  # t * beta^(t-1) = d(beta^t)/d(beta)
    dbc2: Tensor
    w: Tensor  # d N / d v
    eps: Tensor
    mod_beta: Tensor
    lion_beta1: Tensor
    lion_beta2: Tensor


def make_mada_scalars(coef: Tensor, slot: _Slot, cfg: MadaKernelConfig) -> MadaScalars:
    """Coefficients rounded to the state dtype; powers taken in float64, then rounded."""
    sd, t = slot.theta.dtype, slot.t
    k = coef.to(sd)
    w = coef[RHO] if cfg.vbar_detach else coef[RHO] + (1.0 - coef[RHO]) / t
    consts = (torch.tensor(x, dtype=sd) for x in (cfg.eps, cfg.mod_beta, *cfg.lion_betas))
    return MadaScalars(
        *(k[i] for i in range(len(COEFFICIENTS))), slot.lr.to(sd), slot.decay, t,
        (1.0 - coef[B1] ** t).to(sd), (1.0 - coef[B2] ** t).to(sd),
        (t * coef[B1] ** (t - 1)).to(sd), (t * coef[B2] ** (t - 1)).to(sd), w.to(sd), *consts)


@dataclass
class MadaMid:
    """What the second half of a step needs from the first (mada_math.h: MadaMid)."""

    g: Tensor
    m0: Tensor
    v0: Tensor
    d: Tensor | None = None
    gh: Tensor | None = None
    gh2: Tensor | None = None
    sg: Tensor | None = None
    G: Tensor | None = None
    n0: Tensor | None = None
    uL: Tensor | None = None
    N: Tensor | None = None
    vh: Tensor | None = None
    A: Tensor | None = None


def mada_grad_terms(k: MadaScalars, x: MadaMid, cfg: MadaKernelConfig) -> None:
    """gh, gh2, sg, G from x.g, x.d and x.v0."""
    x.gh = x.g + k.beta3 * x.d if cfg.has_beta3 else x.g
    x.gh2 = x.gh * x.gh
    x.sg = _yogi_sign(x.gh2 - x.v0)
    x.G = _blend(k.c, x.gh2, x.v0 + x.sg * x.gh2)


def mada_state_terms(k: MadaScalars, x: MadaMid, st: dict[str, Tensor], cfg: MadaKernelConfig) -> None:
    """N, vh, A from the updated state st (m, n, v, vb)."""
    x.N = _blend(k.rho, st["v"], st["vb"]) if cfg.has_vbar else st["v"]
    x.vh = x.N / k.bc2
    x.A = st["m"] / k.bc1 + k.beta3 * st["n"] if cfg.has_beta3 else st["m"] / k.bc1


def mada_moments(k: MadaScalars, g: Tensor, st: dict[str, Tensor], cfg: MadaKernelConfig,
                 round=store_exact) -> tuple[MadaMid, dict[str, Tensor]]:
    """First half of a step: every moment update, up to vh and A. Returns the terms and the new
    state, each value as ``round`` stores it."""
    x = MadaMid(g=g, m0=st["m"], v0=st["v"])
    x.d = torch.where(k.t > 1, g - st["g_prev"], 0.0) if cfg.has_beta3 else torch.zeros_like(g)
    mada_grad_terms(k, x, cfg)
    new = {"m": round("m", k.beta1 * x.m0 + (1 - k.beta1) * g),
           "v": round("v", k.beta2 * x.v0 + (1 - k.beta2) * x.G)}
    if cfg.has_beta3:
        x.n0 = st["n"]
        new["n"] = round("n", k.beta3 * x.n0 + (1 - k.beta3) * x.d)
        new["g_prev"] = round("g_prev", g)
    if cfg.has_lion:
        x.uL = k.lion_beta1 * st["l"] + (1 - k.lion_beta1) * g
        new["l"] = round("l", k.lion_beta2 * st["l"] + (1 - k.lion_beta2) * g)
    if cfg.has_vbar:
        tt = k.t.to(g.dtype)
        new["vb"] = round("vb", ((tt - 1) * st["vb"] + new["v"]) / tt)
    mada_state_terms(k, x, new, cfg)
    return x, new


def mada_apply(k: MadaScalars, theta: Tensor, x: MadaMid, st: dict[str, Tensor], new: dict[str, Tensor],
               cfg: MadaKernelConfig, want_tangents: bool,
               round=store_exact) -> tuple[Tensor, dict[int, Tensor] | None]:
    """Second half: step size, AdaMod clip (new["s"]), the update and, when asked, du/dk
    of the configuration's coefficients. Returns the new parameter and the tangents."""
    sq = torch.sqrt(x.vh)
    D = sq + k.eps
    eta = k.lr / D
    etah = eta
    clipped = None
    if cfg.has_mod:
        new["s"] = s = round("s", k.mod_beta * st["s"] + (1 - k.mod_beta) * eta)
        clipped = eta > s
        etah = torch.where(clipped, s, eta)
    u = k.gamma * etah * x.A
    if cfg.has_lion:
        u = u + (1 - k.gamma) * k.lr * _sign(x.uL)
    if not want_tangents:
        return theta * k.decay - u, None

    om = torch.where(clipped, 1 - k.mod_beta, 1.0).to(theta.dtype) if cfg.has_mod else 1.0
    # d eta / d vh is unbounded at vh = 0; the header defines the tangent as 0 there.
    deta = torch.where(sq > 0, -k.lr / (2 * sq * D * D), 0.0)
    F = k.gamma * om * deta * x.A
    b2w = k.w * (1 - k.beta2)
    m, N = new["m"], x.N
    tan = {
        B1: k.gamma * etah * ((x.m0 - x.g) / k.bc1 + k.dbc1 * m / (k.bc1 * k.bc1)),
        B2: F * (k.w * (x.v0 - x.G) / k.bc2 + k.dbc2 * N / (k.bc2 * k.bc2)),
        C: F * (b2w * (x.gh2 - x.v0 - x.sg * x.gh2) / k.bc2),
    }
    if cfg.has_beta3:
        dvh = b2w * (k.c + (1 - k.c) * x.sg) * 2 * x.gh * x.d / k.bc2
        tan[B3] = F * dvh + k.gamma * etah * (new["n"] + k.beta3 * (x.n0 - x.d))
    if cfg.has_vbar:
        tan[RHO] = F * ((new["v"] - new["vb"]) / k.bc2)
    if cfg.has_lion:
        tan[GAMMA] = etah * x.A - k.lr * _sign(x.uL)
    return theta * k.decay - u, tan


def _mada_slot(slot: _Slot, coef: Tensor, cfg: MadaKernelConfig, want_tangents: bool) -> None:
    k = make_mada_scalars(coef, slot, cfg)
    x, new = mada_moments(k, slot.grad, slot.state, cfg, slot.round)
    theta, tan = mada_apply(k, slot.theta, x, slot.state, new, cfg, want_tangents, slot.round)
    if tan is not None:
        for row, j in enumerate(cfg.learn):
            slot.write_tangent(row, j, tan[j])
    for name, value in new.items():
        slot.write_state(name, value)
    slot.store_param(theta)


@dataclass
class AdamodScalars:
    """mada_math.h: AdamodScalars."""

    beta1: Tensor
    beta2: Tensor
    beta3: Tensor
    step_size: Tensor  # lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    decay: Tensor
    eps: Tensor


def make_adamod_scalars(cfg: AdamodKernelConfig, slot: _Slot) -> AdamodScalars:
    sd, t = slot.theta.dtype, slot.t
    b1, b2, b3, eps = (torch.tensor(x, dtype=sd) for x in (cfg.beta1, cfg.beta2, cfg.beta3, cfg.eps))
    step_size = (slot.lr * torch.sqrt(1.0 - cfg.beta2**t) / (1.0 - cfg.beta1**t)).to(sd)
    return AdamodScalars(b1, b2, b3, step_size, slot.decay, eps)


def adamod_element(k: AdamodScalars, g: Tensor, theta: Tensor, st: dict[str, Tensor],
                   diff: bool, round=store_exact) -> tuple[Tensor, dict[str, Tensor]]:
    """AdaMod (SPEC 3); with ``diff``, DiffMod (SPEC 4): diffGrad's friction on the applied
    step only. Returns the new parameter and the new state, as ``round`` stores it."""
    new = {"m": round("m", k.beta1 * st["m"] + (1 - k.beta1) * g),
           "v": round("v", k.beta2 * st["v"] + (1 - k.beta2) * g * g)}
    eta = k.step_size / (torch.sqrt(new["v"]) + k.eps)
    new["s"] = round("s", k.beta3 * st["s"] + (1 - k.beta3) * eta)
    mh = new["m"]
    if diff:
        mh = mh * torch.sigmoid(torch.abs(st["g_prev"] - g))
        new["g_prev"] = round("g_prev", g)
    return theta * k.decay - torch.minimum(eta, new["s"]) * mh, new


class ReferenceBackend:
    name = "reference"

    tangent_dtypes = frozenset((torch.float32, torch.float64, torch.bfloat16, STATE_8BIT))
    state_dtypes = tangent_dtypes
    param_rounds = frozenset(PARAM_ROUNDS)

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    def _slots(self, bucket: Bucket, seg: Segments, sc: DeviceScalars, maximize: bool,
               buffers: tuple[str, ...], seed: int):
        return (_Slot(bucket, seg, i, sc, maximize, buffers, seed) for i in range(len(seg.params)))

    def mada_dot(self, bucket, seg, scalars, cfg: MadaKernelConfig, dot_out) -> None:
        for slot in self._slots(bucket, seg, scalars, cfg.maximize, abi.MADA_STATE, scalars.sr_seed):
            _accumulate_dot(slot, dot_out)

    def mada_step(self, bucket, seg, scalars, cfg: MadaKernelConfig, dot_out) -> None:
        for slot in self._slots(bucket, seg, scalars, cfg.maximize, abi.MADA_STATE, scalars.sr_seed):
            if dot_out is not None:
                _accumulate_dot(slot, dot_out)
            _mada_slot(slot, scalars.coef, cfg, want_tangents=bool(cfg.learn))

    def adamod_step(self, bucket, seg, scalars, cfg: AdamodKernelConfig) -> None:
        for slot in self._slots(bucket, seg, scalars, cfg.maximize, abi.ADAMOD_STATE, scalars.sr_seed):
            theta, new = adamod_element(make_adamod_scalars(cfg, slot), slot.grad, slot.theta, slot.state,
                                        cfg.diff, slot.round)
            for name, value in new.items():
                slot.write_state(name, value)
            slot.store_param(theta)


def load() -> ReferenceBackend:
    return ReferenceBackend()
