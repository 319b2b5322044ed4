"""The pure-PyTorch backend: the fallback on any device and the test oracle.

It is SPEC.md written in tensor ops, one parameter at a time, and follows
csrc/mada_math.h term by term (coefficients are rounded to the state dtype
first, powers are taken in float64), so fused backends can be held to it at
rounding level; the header multiplies by reciprocals of the bias corrections
where this divides, a one-ulp difference. It never reads a device value on
the host.
"""
from __future__ import annotations

import torch

from ..flat_state import Bucket
from .base import (
    COEFFICIENTS,
    AdamodKernelConfig,
    DeviceScalars,
    MadaKernelConfig,
    Segments,
)

B1, B2, B3, RHO, C, GAMMA = range(len(COEFFICIENTS))


class _Slot:
    """One active parameter: its flat data, processed grad and state views."""

    def __init__(self, bucket: Bucket, seg: Segments, i: int, sc: DeviceScalars, maximize: bool):
        self.param = seg.params[i].view(-1)
        lo = seg.offsets[i]
        hi = lo + seg.numels[i]
        self.state = {name: buf[lo:hi] for name, buf in bucket.buffers.items()}
        self.tangents = None if bucket.tangents is None else bucket.tangents[:, lo:hi]
        sd = bucket.state_dtype
        g = seg.grads[i].view(-1).to(sd)
        if sc.grad_scale is not None:
            g = g / sc.grad_scale.reshape(()).to(sd)
        self.grad = -g if maximize else g
        self.theta = self.param.to(sd)
        self.t = bucket.steps[seg.param_index[i]]
        self.lr = sc.lr[seg.groups[i]]
        self.decay = (1.0 - self.lr * sc.weight_decay[seg.groups[i]]).to(sd)
        self.skip = None if sc.found_inf is None else sc.found_inf.reshape(()) != 0

    def write(self, dst: torch.Tensor, new: torch.Tensor) -> None:
        """Store ``new`` unless GradScaler found an inf this step."""
        dst.copy_(new if self.skip is None else torch.where(self.skip, dst, new.to(dst.dtype)))


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
    part = (slot.grad.unsqueeze(0) * slot.tangents).sum(dim=1, dtype=torch.float64)
    dot_out.add_(part if slot.skip is None else torch.where(slot.skip, 0.0, part))


def _mada_slot(slot: _Slot, coef: torch.Tensor, cfg: MadaKernelConfig, want_tangents: bool) -> None:
    sd = slot.theta.dtype
    t = slot.t
    k = coef.to(sd)
    b1, b2, b3, rho, c, gamma = (k[i] for i in range(len(COEFFICIENTS)))
    bc1 = (1.0 - coef[B1] ** t).to(sd)
    bc2 = (1.0 - coef[B2] ** t).to(sd)
    w64 = coef[RHO] if cfg.vbar_detach else coef[RHO] + (1.0 - coef[RHO]) / t
    w = w64.to(sd)
    lr = slot.lr.to(sd)
    eps = torch.tensor(cfg.eps, dtype=sd)
    st = slot.state
    g = slot.grad
    new: dict[str, torch.Tensor] = {}

    d = torch.where(t > 1, g - st["g_prev"], 0.0) if cfg.has_beta3 else torch.zeros_like(g)
    gh = g + b3 * d if cfg.has_beta3 else g
    gh2 = gh * gh
    v0, m0 = st["v"], st["m"]
    sg = _yogi_sign(gh2 - v0)
    G = _blend(c, gh2, v0 + sg * gh2)
    new["m"] = m = b1 * m0 + (1 - b1) * g
    new["v"] = v = b2 * v0 + (1 - b2) * G
    if cfg.has_beta3:
        n0 = st["n"]
        new["n"] = n = b3 * n0 + (1 - b3) * d
        new["g_prev"] = g
    if cfg.has_lion:
        lb1, lb2 = (torch.tensor(x, dtype=sd) for x in cfg.lion_betas)
        uL = lb1 * st["l"] + (1 - lb1) * g
        new["l"] = lb2 * st["l"] + (1 - lb2) * g
    N = v
    if cfg.has_vbar:
        tt = t.to(sd)
        new["vb"] = vb = ((tt - 1) * st["vb"] + v) / tt
        N = _blend(rho, v, vb)
    vh = N / bc2
    A = m / bc1 + b3 * n if cfg.has_beta3 else m / bc1
    sq = torch.sqrt(vh)
    D = sq + eps
    eta = lr / D
    etah = eta
    if cfg.has_mod:
        mb = torch.tensor(cfg.mod_beta, dtype=sd)
        new["s"] = s = mb * st["s"] + (1 - mb) * eta
        clipped = eta > s
        etah = torch.where(clipped, s, eta)
    u = gamma * etah * A
    if cfg.has_lion:
        u = u + (1 - gamma) * lr * _sign(uL)

    if want_tangents:
        om = torch.where(clipped, 1 - mb, 1.0).to(sd) if cfg.has_mod else 1.0
        # d eta / d vh is unbounded at vh = 0; the header defines the tangent as 0 there.
        deta = torch.where(sq > 0, -lr / (2 * sq * D * D), 0.0)
        F = gamma * om * deta * A
        b2w = w * (1 - b2)
        dbc1 = (t * coef[B1] ** (t - 1)).to(sd)
        dbc2 = (t * coef[B2] ** (t - 1)).to(sd)
        tan = {
            B1: gamma * etah * ((m0 - g) / bc1 + dbc1 * m / (bc1 * bc1)),
            B2: F * (w * (v0 - G) / bc2 + dbc2 * N / (bc2 * bc2)),
            C: F * (b2w * (gh2 - v0 - sg * gh2) / bc2),
        }
        if cfg.has_beta3:
            dvh = b2w * (c + (1 - c) * sg) * 2 * gh * d / bc2
            tan[B3] = F * dvh + gamma * etah * (n + b3 * (n0 - d))
        if cfg.has_vbar:
            tan[RHO] = F * ((v - vb) / bc2)
        if cfg.has_lion:
            tan[GAMMA] = etah * A - lr * _sign(uL)
        for row, j in enumerate(cfg.learn):
            slot.write(slot.tangents[row], tan[j])

    for name, value in new.items():
        slot.write(st[name], value)
    slot.write(slot.param, slot.theta * slot.decay - u)


class ReferenceBackend:
    name = "reference"

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    def _slots(self, bucket: Bucket, seg: Segments, sc: DeviceScalars, maximize: bool):
        return (_Slot(bucket, seg, i, sc, maximize) for i in range(len(seg.params)))

    def mada_dot(self, bucket, seg, scalars, cfg: MadaKernelConfig, dot_out) -> None:
        for slot in self._slots(bucket, seg, scalars, cfg.maximize):
            _accumulate_dot(slot, dot_out)

    def mada_step(self, bucket, seg, scalars, cfg: MadaKernelConfig, dot_out) -> None:
        for slot in self._slots(bucket, seg, scalars, cfg.maximize):
            if dot_out is not None:
                _accumulate_dot(slot, dot_out)
            _mada_slot(slot, scalars.coef, cfg, want_tangents=bool(cfg.learn))

    def adamod_step(self, bucket, seg, scalars, cfg: AdamodKernelConfig) -> None:
        for slot in self._slots(bucket, seg, scalars, maximize=False):
            sd = slot.theta.dtype
            st, g, t = slot.state, slot.grad, slot.t
            b1, b2, b3, eps = (torch.tensor(x, dtype=sd) for x in (cfg.beta1, cfg.beta2, cfg.beta3, cfg.eps))
            step_size = (slot.lr * torch.sqrt(1.0 - cfg.beta2**t) / (1.0 - cfg.beta1**t)).to(sd)
            m = b1 * st["m"] + (1 - b1) * g
            v = b2 * st["v"] + (1 - b2) * g * g
            eta = step_size / (torch.sqrt(v) + eps)
            s = b3 * st["s"] + (1 - b3) * eta
            mh = m
            if cfg.diff:
                mh = m * torch.sigmoid(torch.abs(st["g_prev"] - g))
                slot.write(st["g_prev"], g)
            for name, value in (("m", m), ("v", v), ("s", s)):
                slot.write(st[name], value)
            slot.write(slot.param, slot.theta * slot.decay - torch.minimum(eta, s) * mh)


def load() -> ReferenceBackend:
    return ReferenceBackend()
