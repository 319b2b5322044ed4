"""Triton kernels of the fused step: csrc/mada_math.h transcribed, one source for every variant.

One program owns one CHUNK of one parameter (a row of the chunk table, see
launch.py): it reads the row's pointers and scalars once, then walks the chunk
BLOCK elements at a time. Blocks that lie wholly inside the parameter run
unmasked, because Triton only vectorises a masked access when it can prove the
mask is constant over a vector, and a bound loaded from a table proves nothing.

Every optional term is a constexpr flag, so compiled-out state is never
touched and each configuration costs exactly the bytes it owns.

This module is loaded twice by launch.py, once compiled and once under the
interpreter (CPU tensors), so nothing here may hold state. The interpreted copy
may run in a process that imported Triton without TRITON_INTERPRET, where
Triton's own jit library functions (tl.zeros, tl.sum, ...) cannot be called:
only builtins are used, and sums go through tl.reduce with Triton's
_sum_combine, which the interpreter recognises and hands to numpy.
"""
import triton
import triton.language as tl

MADA = tl.constexpr(0)
ADAMOD = tl.constexpr(1)
# Canonical coefficient order, as csrc/mada_math.h's enum Coef.
B1, B2, B3, RHO, C, GAMMA = (tl.constexpr(i) for i in range(6))
NO_ROW = tl.constexpr(7)  # 3-bit field in ROWS: coefficient not learned


def _device(fn):
    # The interpreter re-patches triton.language on every call of a jit function
    # (~3 ms each, hundreds per block). Interpreted, the helpers are plain Python
    # running inside the kernel's already-patched scope; compiled, they are jit functions.
    return fn if triton.knobs.runtime.interpret else triton.jit(fn)


@triton.constexpr_function
def _row(rows, k):
    """Tangent row of coefficient k (ROWS packs one 3-bit row index per coefficient)."""
    return (rows >> (3 * k)) & 7


@_device
def _pow(b, e):
    # float64 b^e without libdevice (the interpreter has none). log2(0) is kept
    # out of the arithmetic so 0^0 = 1 as in C's pow (d_1 = t * beta^(t - 1) at t = 1).
    pos = b > 0
    safe = tl.where(pos, b, 1.0)
    return tl.where(pos, tl.exp2(e * tl.log2(safe)), tl.where(e == 0, 1.0, 0.0))


@_device
def _sign(x):
    # sign(0) = 0, as torch.sign: Adam's corner must not see a spurious +1.
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@_device
def _yogi_sign(x):
    # As _sign, but the undefined inf - inf counts as +1 (mada_math.h: yogi_sign).
    return ((x > 0) | (x != x)).to(x.dtype) - (x < 0).to(x.dtype)


@_device
def _blend(a, x, y):
    # a * x + (1 - a) * y where a weight at an end of [0, 1] contributes exactly
    # nothing, even against an overflowed x or y (mada_math.h: blend).
    return tl.where(a == 0, 0.0, a * x) + tl.where(a == 1, 0.0, (1.0 - a) * y)


@_device
def _div(a, b):
    # IEEE division and square root, as the C++ backends and torch do; Triton's
    # plain fp32 `/` and sqrt are approximate. fp64 has only the exact forms.
    if a.dtype == tl.float64:
        r = a / b
    else:
        a, b = tl.broadcast(a, b)  # div_rn wants equal shapes; `/` broadcasts by itself
        r = tl.div_rn(a, b)
    return r


@_device
def _sqrt(x):
    if x.dtype == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@_device
def _ld(ptr, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        return tl.load(ptr + offs)


@_device
def _st(ptr, offs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty))


@_device
def _tangent(tan, tstride, so, x, mask, ROWS: tl.constexpr, K: tl.constexpr, MASKED: tl.constexpr):
    if _row(ROWS, K) != NO_ROW:
        _st(tan + _row(ROWS, K) * tstride, so, x, mask, MASKED)


@_device
def _mada_block(pp, gp_, st, tan, tstride, po, so, mask, acc, k, scale,
                STEP: tl.constexpr, DOT: tl.constexpr, ROWS: tl.constexpr, NL: tl.constexpr,
                NLP: tl.constexpr, HAS_BETA3: tl.constexpr, HAS_VBAR: tl.constexpr,
                HAS_LION: tl.constexpr, HAS_MOD: tl.constexpr, MAXIMIZE: tl.constexpr,
                HAS_SCALE: tl.constexpr, MASKED: tl.constexpr):
    m_p, v_p, n_p, gprev_p, l_p, vb_p, s_p = st
    b1, b2, b3, rho, c, gam, lr, decay, t, rt, rbc1, rbc2, rbc1sq, rbc2sq, dbc1, dbc2, w, eps, modb, lb1, lb2 = k
    one = 1.0
    g = _ld(gp_, po, mask, MASKED).to(m_p.dtype.element_ty)
    if HAS_SCALE:
        g = _div(g, scale)
    if MAXIMIZE:
        g = -g
    if DOT:
        # sum(g * T) with the previous step's tangents, before they are overwritten.
        # Products of two fp32 values are exact in fp64; the sums stay in fp64.
        rows = tl.arange(0, NLP)
        for r in tl.static_range(NL):
            prod = g.to(tl.float64) * _ld(tan + r * tstride, so, mask, MASKED).to(tl.float64)
            acc += tl.where(rows == r, tl.reduce(prod, 0, tl.standard._sum_combine), 0.0)
    if STEP:
        theta = _ld(pp, po, mask, MASKED).to(g.dtype)
        m0 = _ld(m_p, so, mask, MASKED)
        v0 = _ld(v_p, so, mask, MASKED)
        d = tl.full(g.shape, 0.0, g.dtype)
        gh = g
        if HAS_BETA3:
            d = tl.where(t > one, g - _ld(gprev_p, so, mask, MASKED), 0.0)
            gh = g + b3 * d
        gh2 = gh * gh
        sg = _yogi_sign(gh2 - v0)
        G = _blend(c, gh2, v0 + sg * gh2)
        m = b1 * m0 + (one - b1) * g
        v = b2 * v0 + (one - b2) * G
        _st(m_p, so, m, mask, MASKED)
        _st(v_p, so, v, mask, MASKED)
        A = m * rbc1
        if HAS_BETA3:
            n0 = _ld(n_p, so, mask, MASKED)
            n = b3 * n0 + (one - b3) * d
            _st(n_p, so, n, mask, MASKED)
            _st(gprev_p, so, g, mask, MASKED)
            A = A + b3 * n
        uL = tl.full(g.shape, 0.0, g.dtype)
        if HAS_LION:
            l0 = _ld(l_p, so, mask, MASKED)
            uL = lb1 * l0 + (one - lb1) * g
            _st(l_p, so, lb2 * l0 + (one - lb2) * g, mask, MASKED)
        N = v
        vb = v
        if HAS_VBAR:
            vb = ((t - one) * _ld(vb_p, so, mask, MASKED) + v) * rt
            _st(vb_p, so, vb, mask, MASKED)
            N = _blend(rho, v, vb)
        sq = _sqrt(N * rbc2)
        D = sq + eps
        eta = _div(lr, D)
        etah = eta
        clipped = eta < 0  # all False: no clip
        if HAS_MOD:
            s = modb * _ld(s_p, so, mask, MASKED) + (one - modb) * eta
            _st(s_p, so, s, mask, MASKED)
            clipped = eta > s
            etah = tl.where(clipped, s, eta)
        u = gam * etah * A
        if HAS_LION:
            u += (one - gam) * lr * _sign(uL)
        _st(pp, po, theta * decay - u, mask, MASKED)
        if NL > 0:
            om = tl.where(clipped, one - modb, one)
            # d eta / d vh is unbounded where vh = 0 (an element that never saw a
            # gradient, A = 0 too): its tangent is 0, not NaN (mada_math.h).
            deta = tl.where(sq > 0, _div(-lr, tl.where(sq > 0, 2.0 * sq * D * D, 1.0)), 0.0)
            F = gam * om * deta * A
            b2w = w * (one - b2)
            _tangent(tan, tstride, so, gam * etah * ((m0 - g) * rbc1 + dbc1 * m * rbc1sq),
                     mask, ROWS, B1, MASKED)
            _tangent(tan, tstride, so, F * (w * (v0 - G) * rbc2 + dbc2 * N * rbc2sq),
                     mask, ROWS, B2, MASKED)
            _tangent(tan, tstride, so, F * (b2w * (gh2 - v0 - sg * gh2) * rbc2), mask, ROWS, C, MASKED)
            if HAS_BETA3:
                dvh = b2w * (c + (one - c) * sg) * 2.0 * gh * d * rbc2
                _tangent(tan, tstride, so, F * dvh + gam * etah * (n + b3 * (n0 - d)), mask, ROWS, B3, MASKED)
            if HAS_VBAR:
                _tangent(tan, tstride, so, F * ((v - vb) * rbc2), mask, ROWS, RHO, MASKED)
            if HAS_LION:
                _tangent(tan, tstride, so, etah * A - lr * _sign(uL), mask, ROWS, GAMMA, MASKED)
    return acc


@_device
def _adamod_block(pp, gp_, st, po, so, mask, k, scale, DIFF: tl.constexpr,
                  HAS_SCALE: tl.constexpr, MASKED: tl.constexpr):
    m_p, v_p, s_p, gprev_p = st
    b1, b2, b3, step_size, decay, eps = k
    one = 1.0
    g = _ld(gp_, po, mask, MASKED).to(m_p.dtype.element_ty)
    if HAS_SCALE:
        g = _div(g, scale)
    theta = _ld(pp, po, mask, MASKED).to(g.dtype)
    m = b1 * _ld(m_p, so, mask, MASKED) + (one - b1) * g
    v = b2 * _ld(v_p, so, mask, MASKED) + (one - b2) * g * g
    eta = _div(step_size, _sqrt(v) + eps)
    s = b3 * _ld(s_p, so, mask, MASKED) + (one - b3) * eta
    _st(m_p, so, m, mask, MASKED)
    _st(v_p, so, v, mask, MASKED)
    _st(s_p, so, s, mask, MASKED)
    mh = m
    if DIFF:
        # diffGrad friction on the applied step only; g_prev starts at 0.
        mh = _div(m, one + tl.exp(-tl.abs(_ld(gprev_p, so, mask, MASKED) - g)))
        _st(gprev_p, so, g, mask, MASKED)
    _st(pp, po, theta * decay - tl.where(eta > s, s, eta) * mh, mask, MASKED)


@triton.jit
def fused_step(table, ptype, m_p, v_p, n_p, gprev_p, l_p, vb_p, s_p, tan, tstride,
               coef, lr_p, wd_p, steps, consts, scale_p, inf_p, partial, n_chunks, first,
               KIND: tl.constexpr, STEP: tl.constexpr, DOT: tl.constexpr, ROWS: tl.constexpr,
               NL: tl.constexpr, NLP: tl.constexpr, HAS_BETA3: tl.constexpr, HAS_VBAR: tl.constexpr,
               HAS_LION: tl.constexpr, HAS_MOD: tl.constexpr, VBAR_DETACH: tl.constexpr,
               MAXIMIZE: tl.constexpr, DIFF: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_INF: tl.constexpr, ALIGNED: tl.constexpr, T_ALIGNED: tl.constexpr, S_VEC: tl.constexpr,
               CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = first + tl.program_id(0)  # this launch covers table rows first, first + 1, ...
    row = table + pid * 6  # param addr, grad addr, state offset, count, group, param index
    pty = tl.pointer_type(ptype.dtype.element_ty)
    pp = tl.load(row).to(pty)
    gp_ = tl.load(row + 1).to(pty)
    soff = tl.load(row + 2)
    # Alignment hints are promises (launch.py checked them): they unlock 16-byte accesses.
    if ALIGNED:  # this launch's rows: param, grad and state all start on 16-byte boundaries
        pp = tl.multiple_of(pp, 16)
        gp_ = tl.multiple_of(gp_, 16)
        soff = tl.multiple_of(soff, S_VEC)
    if T_ALIGNED:  # tangent rows lie a whole number of 16-byte vectors apart
        tstride = tl.multiple_of(tstride, S_VEC)
    count = tl.load(row + 3)
    group = tl.load(row + 4)
    if HAS_INF:  # a skipped step touches nothing: every block falls outside the chunk
        count = tl.where(tl.load(inf_p) != 0, 0, count)
    ct = m_p.dtype.element_ty
    one = 1.0
    # Scalars in float64 (powers especially), rounded once to the compute type.
    t = tl.maximum(tl.load(steps + tl.load(row + 5)), one)  # t >= 1 except on a skipped step
    lr = tl.load(lr_p + group)
    decay = (one - lr * tl.load(wd_p + group)).to(ct)
    scale = tl.full([], 1.0, ct)
    if HAS_SCALE:
        scale = tl.load(scale_p).to(ct)
    acc = tl.full([NLP], 0.0, tl.float64)
    if KIND == MADA:
        b1 = tl.load(coef)
        b2 = tl.load(coef + 1)
        rho = tl.load(coef + 3)
        w = rho
        if not VBAR_DETACH:
            w = rho + (one - rho) / t
        # Reciprocals of the uniform divisors, taken in double and rounded once
        # (mada_math.h): the element math multiplies by them.
        bc1 = one - _pow(b1, t)
        bc2 = one - _pow(b2, t)
        k = (b1.to(ct), b2.to(ct), tl.load(coef + 2).to(ct), rho.to(ct), tl.load(coef + 4).to(ct),
             tl.load(coef + 5).to(ct), lr.to(ct), decay, t.to(ct), (one / t).to(ct), (one / bc1).to(ct),
             (one / bc2).to(ct), (one / (bc1 * bc1)).to(ct), (one / (bc2 * bc2)).to(ct),
             (t * _pow(b1, t - one)).to(ct), (t * _pow(b2, t - one)).to(ct), w.to(ct), tl.load(consts).to(ct),
             tl.load(consts + 1).to(ct), tl.load(consts + 2).to(ct), tl.load(consts + 3).to(ct))
        st = (m_p, v_p, n_p, gprev_p, l_p, vb_p, s_p)
    else:
        b1 = tl.load(consts)
        b2 = tl.load(consts + 1)
        step_size = lr * tl.sqrt(one - _pow(b2, t)) / (one - _pow(b1, t))
        k = (b1.to(ct), b2.to(ct), tl.load(consts + 2).to(ct), step_size.to(ct), decay,
             tl.load(consts + 3).to(ct))
        st = (m_p, v_p, s_p, gprev_p)
    for start in tl.range(0, CHUNK, BLOCK):
        po = start + tl.arange(0, BLOCK)
        so = soff + po
        mask = po < count
        if start + BLOCK <= count:
            if KIND == MADA:
                acc = _mada_block(pp, gp_, st, tan, tstride, po, so, mask, acc, k, scale, STEP, DOT, ROWS,
                                  NL, NLP, HAS_BETA3, HAS_VBAR, HAS_LION, HAS_MOD, MAXIMIZE, HAS_SCALE, False)
            else:
                _adamod_block(pp, gp_, st, po, so, mask, k, scale, DIFF, HAS_SCALE, False)
        elif start < count:
            if KIND == MADA:
                acc = _mada_block(pp, gp_, st, tan, tstride, po, so, mask, acc, k, scale, STEP, DOT, ROWS,
                                  NL, NLP, HAS_BETA3, HAS_VBAR, HAS_LION, HAS_MOD, MAXIMIZE, HAS_SCALE, True)
            else:
                _adamod_block(pp, gp_, st, po, so, mask, k, scale, DIFF, HAS_SCALE, True)
    if DOT:
        # One fp64 partial per (learned row, chunk); launch.py sums them in a fixed order.
        rows = tl.arange(0, NLP)
        tl.store(partial + rows * n_chunks + pid, acc, mask=rows < NL)
