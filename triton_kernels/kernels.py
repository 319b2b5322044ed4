"""Triton kernels of the fused step: csrc/mada_math.h transcribed, one source for every variant.

One program owns one CHUNK of one parameter (a row of the chunk table, see
launch.py): it reads the row's pointers and scalars once, then walks the chunk
BLOCK elements at a time. Blocks that lie wholly inside the parameter run
unmasked, because Triton only vectorises a masked access when it can prove the
mask is constant over a vector, and a bound loaded from a table proves nothing.

Every optional term is a constexpr flag, so compiled-out state is never
touched and each configuration costs exactly the bytes it owns. The element
math is split into the header's pieces under its names (make_mada_scalars,
mada_grad_terms, mada_state_terms, mada_moments, mada_apply, the tangents,
adamod_element), so the header, this file and backends/reference.py read side
by side; only loads and stores stay in the _*_block functions.

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
# The hash's buffer number of coefficient j's bf16 tangent row is BUF_TAN0 + j (mada_math.h: kBufTan0).
BUF_TAN0 = tl.constexpr(7)
# How a bf16 parameter's new value is stored (PROUND; csrc/abi.h ParamRound, docs/spec.md 5.2).
ROUND_NEAREST, ROUND_STOCHASTIC, ROUND_KAHAN = (tl.constexpr(i) for i in range(3))
K_BUF_PARAM = tl.constexpr(13)  # mada_math.h kBufParam: the hash's buffer number of the parameter


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
def _grad(gp_, po, mask, scale, m_p, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, SR: tl.constexpr,
          Q8: tl.constexpr, MASKED: tl.constexpr):
    """The processed gradient, in the arithmetic dtype (m_p's, fp32 for bf16 and 8-bit state):
    unscaled, negated for maximize."""
    ct = m_p.dtype.element_ty
    if SR:
        ct = tl.float32
    if Q8:
        ct = tl.float32
    g = _ld(gp_, po, mask, MASKED).to(ct)
    if HAS_SCALE:
        g = _div(g, scale)
    if MAXIMIZE:
        g = -g
    return g


@_device
def _tangent(tan, tq, so, x, tkeys, mask, ROWS: tl.constexpr, K: tl.constexpr, TSR: tl.constexpr,
             TQ8: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """Coefficient K's du/dk into its row, if learned; TSR: a bf16 row, rounded stochastically with
    tkeys[K] (spec 5.3: never read in this step, so rounded only here); TQ8: an 8-bit row, each
    256-element block encoded under its new scale (spec 5.5). tq: _tan_rows's row addressing."""
    if _row(ROWS, K) != NO_ROW:
        if TSR:
            x = _sr_bf16(x, _sr_bits(tkeys[K], so))
        row, scales = _tan_row(tan, tq, _row(ROWS, K))
        _put(row, scales, so, x, mask, True, TQ8, MASKED, BLOCK)


@_device
def _tan_row(tan, tq, r):
    """Tangent row r's codes or values, and (8-bit rows) its block scales."""
    tstride, tsc, tsstride = tq
    return tan + r * tstride, tsc + r * tsstride


@_device
def _exp(x):
    # fp32: mada_math.h's exp_t, Cephes' expf in plain arithmetic (the same bits as
    # the CPU backend): tl.exp lowers to an approximate ex2. fp64: tl.exp is exact.
    if x.dtype == tl.float64:
        r = tl.exp(x)
    else:
        x = tl.where(x < -88.3762626647949, -88.3762626647949, tl.where(x > 88.3762626647949, 88.3762626647949, x))
        n = tl.floor(x * 1.44269504088896341 + 0.5)
        x = x - n * 0.693359375 - n * -2.12194440e-4
        z = x * x
        y = x * 1.9875691500e-4 + 1.3981999507e-3
        y = y * x + 8.3334519073e-3
        y = y * x + 4.1665795894e-2
        y = y * x + 1.6666665459e-1
        y = y * x + 5.0000001201e-1
        y = y * z + x + 1.0
        r = y * ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return r


# bf16 state (docs/spec.md section 5.1): csrc/mada_math.h's hash and stochastic rounding,
# in uint32 arithmetic. keys[b] is sr_key of state buffer b (the st tuples' order).
@_device
def _mix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    return h ^ (h >> 16)


@_device
def _sr_key(seed, step, buffer):
    return _mix32(_mix32(_mix32(seed) ^ step) ^ buffer)


@_device
def _sr_bits(key, index):
    return _mix32((key + (index >> 32).to(tl.uint32)) ^ index.to(tl.uint32))


@_device
def _sr_bf16(x, bits):
    u = x.to(tl.uint32, bitcast=True)
    u = tl.where(x != x, u | 0x00400000, u + (bits & 0xFFFF)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@_device
def _round(x, keys, so, b: tl.constexpr, SR: tl.constexpr):
    """A new value of state buffer b as stored: mada_math.h's StoreBf16Sr, or as computed."""
    if SR:
        x = _sr_bf16(x, _sr_bits(keys[b], so))
    return x


# 8-bit state (docs/spec.md section 5.4): csrc/mada_math.h's q8_scale, q8_encode and
# q8_decode in uint32 arithmetic. A state pointer then holds uint8 codes and its scale
# pointer one fp32 scale per 256 elements; BLOCK is a whole number of those blocks, and every
# chunk starts on one (the bucket's offsets are multiples of 256).
Q8_BLOCK = tl.constexpr(256)


@_device
def _q8_decode(code, scale, SIGNED: tl.constexpr):
    c = code.to(tl.uint32)
    if SIGNED:
        mag = c & 0x7F
        bias = 15
    else:
        mag = c
        bias = 31
    e = (mag >> 3).to(tl.int32)
    f = mag & 7
    whole = tl.where(e == 0, f, f + 8).to(tl.float32)
    unit = ((tl.maximum(e, 1) - bias - 3 + 127) << 23).to(tl.uint32).to(tl.float32, bitcast=True)
    v = whole * unit * scale
    if SIGNED:
        v = tl.where((c >> 7) != 0, -v, v)
    return v


@_device
def _q8_encode(x, scale, SIGNED: tl.constexpr):
    if SIGNED:
        bias = 15
        top = 0x7F
    else:
        bias = 31
        top = 0xFF
    u = x.to(tl.uint32, bitcast=True)
    ex = ((u >> 23) & 0xFF).to(tl.int32)
    mant = u & 0x7FFFFF
    ef = ex - ((scale.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) + bias
    normal = ef >= 1
    n = tl.where(normal, (tl.maximum(ef, 1).to(tl.uint32) << 23) | mant, mant | 0x800000)
    sh = tl.where(normal, 20, tl.minimum(21 - ef, 31)).to(tl.uint32)
    half = tl.full(x.shape, 1, tl.uint32) << (sh - 1)
    mag = (n + half - 1 + ((n >> sh) & 1)) >> sh
    mag = tl.where((ex == 0) | (scale != scale), 0, tl.minimum(mag, top))
    if SIGNED:
        code = tl.where(mag > 0, mag | ((u >> 31) << 7), 0)
    else:
        code = tl.where((u >> 31) == 0, mag, 0)
    return code


@_device
def _q8_blocks(x, BLOCK: tl.constexpr):
    """x (BLOCK,) as (BLOCK // 256, 256): one row per 256-element block."""
    return tl.reshape(x, (BLOCK // Q8_BLOCK, Q8_BLOCK))


@_device
def _get(ptr, sc, so, mask, dtype: tl.constexpr, SIGNED: tl.constexpr, Q8: tl.constexpr, MASKED: tl.constexpr):
    """A state buffer's values in the compute dtype: widened, or decoded (8-bit)."""
    x = _ld(ptr, so, mask, MASKED)
    if Q8:
        return _q8_decode(x, _ld(sc, so // Q8_BLOCK, mask, MASKED), SIGNED)
    else:
        return x.to(dtype)


@_device
def _put(ptr, sc, so, x, mask, SIGNED: tl.constexpr, Q8: tl.constexpr, MASKED: tl.constexpr,
         BLOCK: tl.constexpr):
    """Store a state buffer's new values; 8-bit state encodes each 256-element block under its
    new scale (the largest magnitude of the block's elements, mask's only)."""
    if Q8:
        x = tl.where(mask, x, 0.0)
        a = _q8_blocks(tl.abs(x), BLOCK)
        amax = tl.reduce(a, 1, tl.standard._elementwise_max)
        bad = tl.reduce(tl.where(a <= 3.4028234663852886e38, 0, 1), 1, tl.standard._elementwise_max)
        top = amax.to(tl.uint32, bitcast=True)
        top = tl.where(top < 0x800000, 0x800000, top) & 0x7F800000
        scale = tl.where(bad == 0, top, 0x7FC00000).to(tl.uint32).to(tl.float32, bitcast=True)
        each = tl.reshape(tl.broadcast_to(tl.reshape(scale, (BLOCK // Q8_BLOCK, 1)), (BLOCK // Q8_BLOCK, Q8_BLOCK)),
                          (BLOCK,))
        _st(ptr, so, _q8_encode(x, each, SIGNED), mask, MASKED)
        first = tl.reduce(_q8_blocks(so // Q8_BLOCK, BLOCK), 1, tl.standard._elementwise_max)
        live = tl.reduce(_q8_blocks(mask.to(tl.int32), BLOCK), 1, tl.standard._elementwise_max)
        tl.store(sc + first, scale, mask=live > 0)
    else:
        _st(ptr, so, x, mask, MASKED)


# bf16 parameters without fp32 master weights (docs/spec.md section 5.2): mada_math.h's
# rne_bf16, kahan_weight, kahan_comp, and the load and store of a parameter under PROUND.
@_device
def _rne_bf16(x):
    u = x.to(tl.uint32, bitcast=True)
    u = tl.where(x != x, 0x7FC00000, (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000)
    return u.to(tl.float32, bitcast=True)


@_device
def _kahan_weight(theta, comp):
    return theta + comp


@_device
def _kahan_comp(x, stored):
    return tl.where(stored - stored == 0.0, _rne_bf16(x - stored), 0.0)


@_device
def _load_param(pp, po, comp_p, so, mask, ct: tl.constexpr, PROUND: tl.constexpr, MASKED: tl.constexpr):
    theta = _ld(pp, po, mask, MASKED).to(ct)
    if PROUND == ROUND_KAHAN:
        theta = _kahan_weight(theta, _ld(comp_p, so, mask, MASKED).to(ct))
    return theta


@_device
def _store_param(pp, po, theta, comp_p, pkey, so, mask, PROUND: tl.constexpr, MASKED: tl.constexpr):
    if PROUND == ROUND_STOCHASTIC:
        theta = _sr_bf16(theta, _sr_bits(pkey, so))
    if PROUND == ROUND_KAHAN:
        stored = _rne_bf16(theta)
        _st(comp_p, so, _kahan_comp(theta, stored), mask, MASKED)
        theta = stored
    _st(pp, po, theta, mask, MASKED)  # a bf16 value already, or rounded to nearest here


@_device
def _make_mada_scalars(coef, consts, lr, decay, t, ct: tl.constexpr, VBAR_DETACH: tl.constexpr):
    """mada_math.h's MadaScalars, in its order: read in float64 (powers especially), rounded once to ct.
    Reciprocals of the uniform divisors are taken in float64 and rounded once: the element
    math multiplies by them."""
    one = 1.0
    b1 = tl.load(coef)
    b2 = tl.load(coef + 1)
    rho = tl.load(coef + 3)
    w = rho
    if not VBAR_DETACH:
        w = rho + (one - rho) / t
    bc1 = one - _pow(b1, t)
    bc2 = one - _pow(b2, t)
    return (b1.to(ct), b2.to(ct), tl.load(coef + 2).to(ct), rho.to(ct), tl.load(coef + 4).to(ct),
            tl.load(coef + 5).to(ct), lr.to(ct), decay, t.to(ct), (one / t).to(ct), (one / bc1).to(ct),
            (one / bc2).to(ct), (one / (bc1 * bc1)).to(ct), (one / (bc2 * bc2)).to(ct),
            (t * _pow(b1, t - one)).to(ct), (t * _pow(b2, t - one)).to(ct), w.to(ct), tl.load(consts).to(ct),
            tl.load(consts + 1).to(ct), tl.load(consts + 2).to(ct), tl.load(consts + 3).to(ct))


@_device
def _make_adamod_scalars(consts, lr, decay, t, ct: tl.constexpr):
    """mada_math.h's AdamodScalars: beta1, beta2, beta3, step_size, decay, eps."""
    one = 1.0
    b1 = tl.load(consts)
    b2 = tl.load(consts + 1)
    step_size = lr * tl.sqrt(one - _pow(b2, t)) / (one - _pow(b1, t))
    return (b1.to(ct), b2.to(ct), tl.load(consts + 2).to(ct), step_size.to(ct), decay, tl.load(consts + 3).to(ct))


# The pieces of a step below carry csrc/mada_math.h's names and split it where the
# header does; values are one block's registers, loads and stores stay in _mada_block.
# k is the tuple make_mada_scalars builds (the header's MadaScalars, in its order).


@_device
def _mada_grad_terms(g, d, v0, b3, c, HAS_BETA3: tl.constexpr):
    """gh, gh2, sg, G."""
    gh = g
    if HAS_BETA3:
        gh = g + b3 * d
    gh2 = gh * gh
    sg = _yogi_sign(gh2 - v0)
    return gh, gh2, sg, _blend(c, gh2, v0 + sg * gh2)


@_device
def _mada_state_terms(m, n, v, vb, b3, rho, rbc1, rbc2, HAS_BETA3: tl.constexpr, HAS_VBAR: tl.constexpr):
    """N, vh, A from the updated state."""
    N = v
    if HAS_VBAR:
        N = _blend(rho, v, vb)
    A = m * rbc1
    if HAS_BETA3:
        A = A + b3 * n
    return N, N * rbc2, A


@_device
def _mada_moments(k, g, m0, v0, n0, gprev, l0, vb0, keys, so, HAS_BETA3: tl.constexpr, HAS_VBAR: tl.constexpr,
                  HAS_LION: tl.constexpr, SR: tl.constexpr):
    """First half of a step: the new state (m, v, n, l, vb) and the terms (d, gh, gh2, sg, G, uL, N, vh, A)."""
    b1, b2, b3, rho, c, gam, lr, decay, t, rt, rbc1, rbc2, rbc1sq, rbc2sq, dbc1, dbc2, w, eps, modb, lb1, lb2 = k
    one = 1.0
    d = tl.full(g.shape, 0.0, g.dtype)
    if HAS_BETA3:
        d = tl.where(t > one, g - gprev, 0.0)
    gh, gh2, sg, G = _mada_grad_terms(g, d, v0, b3, c, HAS_BETA3)
    m = _round(b1 * m0 + (one - b1) * g, keys, so, 0, SR)
    v = _round(b2 * v0 + (one - b2) * G, keys, so, 1, SR)
    n = n0
    if HAS_BETA3:
        n = _round(b3 * n0 + (one - b3) * d, keys, so, 2, SR)
    uL = tl.full(g.shape, 0.0, g.dtype)
    l = l0
    if HAS_LION:
        uL = lb1 * l0 + (one - lb1) * g
        l = _round(lb2 * l0 + (one - lb2) * g, keys, so, 4, SR)
    vb = v
    if HAS_VBAR:
        vb = _round(((t - one) * vb0 + v) * rt, keys, so, 5, SR)
    N, vh, A = _mada_state_terms(m, n, v, vb, b3, rho, rbc1, rbc2, HAS_BETA3, HAS_VBAR)
    return (m, v, n, l, vb), (d, gh, gh2, sg, G, uL, N, vh, A)


@_device
def _mada_apply(k, theta, s0, vh, A, uL, keys, so, HAS_LION: tl.constexpr, HAS_MOD: tl.constexpr, SR: tl.constexpr):
    """Second half: step size, AdaMod clip, update. Returns (theta, s, etah, clipped, sq, D)."""
    b1, b2, b3, rho, c, gam, lr, decay, t, rt, rbc1, rbc2, rbc1sq, rbc2sq, dbc1, dbc2, w, eps, modb, lb1, lb2 = k
    one = 1.0
    sq = _sqrt(vh)
    D = sq + eps
    eta = _div(lr, D)
    etah = eta
    s = s0
    clipped = eta < 0  # all False: no clip
    if HAS_MOD:
        s = _round(modb * s0 + (one - modb) * eta, keys, so, 6, SR)
        clipped = eta > s
        etah = tl.where(clipped, s, eta)
    u = gam * etah * A
    if HAS_LION:
        u += (one - gam) * lr * _sign(uL)
    return theta * decay - u, s, etah, clipped, sq, D


@_device
def _mada_tangents(k, g, m0, v0, n0, new, mid, etah, clipped, sq, D):
    """du/dk, canonical order (rows whose state a configuration lacks are never stored)."""
    b1, b2, b3, rho, c, gam, lr, decay, t, rt, rbc1, rbc2, rbc1sq, rbc2sq, dbc1, dbc2, w, eps, modb, lb1, lb2 = k
    m, v, n, l, vb = new
    d, gh, gh2, sg, G, uL, N, vh, A = mid
    one = 1.0
    om = tl.where(clipped, one - modb, one)
    # d eta / d vh is unbounded where vh = 0 (an element that never saw a
    # gradient, A = 0 too): its tangent is 0, not NaN (mada_math.h).
    deta = tl.where(sq > 0, _div(-lr, tl.where(sq > 0, 2.0 * sq * D * D, 1.0)), 0.0)
    F = gam * om * deta * A
    b2w = w * (one - b2)
    dvh = b2w * (c + (one - c) * sg) * 2.0 * gh * d * rbc2
    return (gam * etah * ((m0 - g) * rbc1 + dbc1 * m * rbc1sq),
            F * (w * (v0 - G) * rbc2 + dbc2 * N * rbc2sq),
            F * dvh + gam * etah * (n + b3 * (n0 - d)),
            F * ((v - vb) * rbc2),
            F * (b2w * (gh2 - v0 - sg * gh2) * rbc2),
            etah * A - lr * _sign(uL))


@_device
def _mada_block(pp, gp_, st, qs, keys, tkeys, pio, tan, tq, po, so, mask, acc, k, scale,
                STEP: tl.constexpr, DOT: tl.constexpr, ROWS: tl.constexpr, NL: tl.constexpr,
                NLP: tl.constexpr, HAS_BETA3: tl.constexpr, HAS_VBAR: tl.constexpr,
                HAS_LION: tl.constexpr, HAS_MOD: tl.constexpr, MAXIMIZE: tl.constexpr,
                HAS_SCALE: tl.constexpr, SR: tl.constexpr, TSR: tl.constexpr, PROUND: tl.constexpr,
                Q8: tl.constexpr, TQ8: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    m_p, v_p, n_p, gprev_p, l_p, vb_p, s_p = st
    comp_p, pkey = pio
    g = _grad(gp_, po, mask, scale, m_p, HAS_SCALE, MAXIMIZE, SR, Q8, MASKED)
    if DOT:
        # sum(g * T) with the previous step's tangents, before they are overwritten.
        # Products of two fp32 values are exact in fp64 (bf16 rows widen exactly); the sums stay in fp64.
        # 8-bit rows decode to fp32 values (spec 5.5).
        rows = tl.arange(0, NLP)
        for r in tl.static_range(NL):
            row, scales = _tan_row(tan, tq, r)
            prod = g.to(tl.float64) * _get(row, scales, so, mask, g.dtype, True, TQ8, MASKED).to(tl.float64)
            acc += tl.where(rows == r, tl.reduce(prod, 0, tl.standard._sum_combine), 0.0)
    if STEP:
        theta = _load_param(pp, po, comp_p, so, mask, g.dtype, PROUND, MASKED)
        m0 = _get(m_p, qs[0], so, mask, g.dtype, True, Q8, MASKED)  # bf16 state widens exactly
        v0 = _get(v_p, qs[1], so, mask, g.dtype, False, Q8, MASKED)
        zero = tl.full(g.shape, 0.0, g.dtype)  # state a configuration lacks
        n0, gprev, l0, vb0, s0 = zero, zero, zero, zero, zero
        if HAS_BETA3:
            n0 = _get(n_p, qs[2], so, mask, g.dtype, True, Q8, MASKED)
            gprev = _get(gprev_p, qs[3], so, mask, g.dtype, True, Q8, MASKED)
        if HAS_LION:
            l0 = _get(l_p, qs[4], so, mask, g.dtype, True, Q8, MASKED)
        if HAS_VBAR:
            vb0 = _get(vb_p, qs[5], so, mask, g.dtype, False, Q8, MASKED)
        if HAS_MOD:
            s0 = _get(s_p, qs[6], so, mask, g.dtype, False, Q8, MASKED)
        new, mid = _mada_moments(k, g, m0, v0, n0, gprev, l0, vb0, keys, so, HAS_BETA3, HAS_VBAR, HAS_LION, SR)
        m, v, n, l, vb = new
        d, gh, gh2, sg, G, uL, N, vh, A = mid
        theta, s, etah, clipped, sq, D = _mada_apply(k, theta, s0, vh, A, uL, keys, so, HAS_LION, HAS_MOD, SR)
        _put(m_p, qs[0], so, m, mask, True, Q8, MASKED, BLOCK)
        _put(v_p, qs[1], so, v, mask, False, Q8, MASKED, BLOCK)
        if HAS_BETA3:
            _put(n_p, qs[2], so, n, mask, True, Q8, MASKED, BLOCK)
            _put(gprev_p, qs[3], so, _round(g, keys, so, 3, SR), mask, True, Q8, MASKED, BLOCK)
        if HAS_LION:
            _put(l_p, qs[4], so, l, mask, True, Q8, MASKED, BLOCK)
        if HAS_VBAR:
            _put(vb_p, qs[5], so, vb, mask, False, Q8, MASKED, BLOCK)
        if HAS_MOD:
            _put(s_p, qs[6], so, s, mask, False, Q8, MASKED, BLOCK)
        _store_param(pp, po, theta, comp_p, pkey, so, mask, PROUND, MASKED)
        if NL > 0:
            tb1, tb2, tb3, trho, tc, tgam = _mada_tangents(k, g, m0, v0, n0, new, mid, etah, clipped, sq, D)
            _tangent(tan, tq, so, tb1, tkeys, mask, ROWS, B1, TSR, TQ8, MASKED, BLOCK)
            _tangent(tan, tq, so, tb2, tkeys, mask, ROWS, B2, TSR, TQ8, MASKED, BLOCK)
            _tangent(tan, tq, so, tc, tkeys, mask, ROWS, C, TSR, TQ8, MASKED, BLOCK)
            if HAS_BETA3:
                _tangent(tan, tq, so, tb3, tkeys, mask, ROWS, B3, TSR, TQ8, MASKED, BLOCK)
            if HAS_VBAR:
                _tangent(tan, tq, so, trho, tkeys, mask, ROWS, RHO, TSR, TQ8, MASKED, BLOCK)
            if HAS_LION:
                _tangent(tan, tq, so, tgam, tkeys, mask, ROWS, GAMMA, TSR, TQ8, MASKED, BLOCK)
    return acc


@_device
def _adamod_element(k, g, theta, m0, v0, s0, gprev, keys, so, DIFF: tl.constexpr, SR: tl.constexpr):
    """AdaMod; with DIFF, DiffMod: diffGrad's friction on the applied step only. Returns (theta, m, v, s)."""
    b1, b2, b3, step_size, decay, eps = k
    one = 1.0
    m = _round(b1 * m0 + (one - b1) * g, keys, so, 0, SR)
    v = _round(b2 * v0 + (one - b2) * g * g, keys, so, 1, SR)
    eta = _div(step_size, _sqrt(v) + eps)
    s = _round(b3 * s0 + (one - b3) * eta, keys, so, 2, SR)
    mh = m
    if DIFF:
        mh = _div(m, one + _exp(-tl.abs(gprev - g)))
    return theta * decay - tl.where(eta > s, s, eta) * mh, m, v, s


@_device
def _adamod_block(pp, gp_, st, qs, keys, pio, po, so, mask, k, scale, DIFF: tl.constexpr, MAXIMIZE: tl.constexpr,
                  HAS_SCALE: tl.constexpr, SR: tl.constexpr, PROUND: tl.constexpr, Q8: tl.constexpr,
                  MASKED: tl.constexpr, BLOCK: tl.constexpr):
    m_p, v_p, s_p, gprev_p = st
    comp_p, pkey = pio
    g = _grad(gp_, po, mask, scale, m_p, HAS_SCALE, MAXIMIZE, SR, Q8, MASKED)
    theta = _load_param(pp, po, comp_p, so, mask, g.dtype, PROUND, MASKED)
    gprev = g  # g_prev starts at 0 in the state; only DiffMod has it
    if DIFF:
        gprev = _get(gprev_p, qs[3], so, mask, g.dtype, True, Q8, MASKED)
    theta, m, v, s = _adamod_element(k, g, theta, _get(m_p, qs[0], so, mask, g.dtype, True, Q8, MASKED),
                                     _get(v_p, qs[1], so, mask, g.dtype, False, Q8, MASKED),
                                     _get(s_p, qs[2], so, mask, g.dtype, False, Q8, MASKED),
                                     gprev, keys, so, DIFF, SR)
    _put(m_p, qs[0], so, m, mask, True, Q8, MASKED, BLOCK)
    _put(v_p, qs[1], so, v, mask, False, Q8, MASKED, BLOCK)
    _put(s_p, qs[2], so, s, mask, False, Q8, MASKED, BLOCK)
    if DIFF:
        _put(gprev_p, qs[3], so, _round(g, keys, so, 3, SR), mask, True, Q8, MASKED, BLOCK)
    _store_param(pp, po, theta, comp_p, pkey, so, mask, PROUND, MASKED)


@triton.jit
def fused_step(table, ptype, m_p, v_p, n_p, gprev_p, l_p, vb_p, s_p, comp_p, tan, tstride,
               coef, lr_p, wd_p, steps, consts, scale_p, inf_p, partial, n_chunks, first, seed, qsc,
               KIND: tl.constexpr, STEP: tl.constexpr, DOT: tl.constexpr, ROWS: tl.constexpr,
               NL: tl.constexpr, NLP: tl.constexpr, HAS_BETA3: tl.constexpr, HAS_VBAR: tl.constexpr,
               HAS_LION: tl.constexpr, HAS_MOD: tl.constexpr, VBAR_DETACH: tl.constexpr,
               MAXIMIZE: tl.constexpr, DIFF: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_INF: tl.constexpr, SR: tl.constexpr, TSR: tl.constexpr, PROUND: tl.constexpr,
               ALIGNED: tl.constexpr, T_ALIGNED: tl.constexpr, S_VEC: tl.constexpr,
               CHUNK: tl.constexpr, BLOCK: tl.constexpr, Q8: tl.constexpr = False, TQ8: tl.constexpr = False):
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
    # Tangent row r starts at r * tstride: a 32-bit product wraps past 2^31 elements
    # (six learned rows of a bucket above ~430M), and Triton passes a small int as i32.
    tstride = tstride.to(tl.int64)
    if T_ALIGNED:  # tangent rows lie a whole number of 16-byte vectors apart
        tstride = tl.multiple_of(tstride, S_VEC)
    count = tl.load(row + 3)
    group = tl.load(row + 4)
    if HAS_INF:  # a skipped step touches nothing: every block falls outside the chunk
        count = tl.where(tl.load(inf_p) != 0, 0, count)
    ct = m_p.dtype.element_ty
    if SR:  # bf16 state: fp32 arithmetic
        ct = tl.float32
    if Q8:  # 8-bit state: fp32 arithmetic
        ct = tl.float32
    one = 1.0
    # Scalars in float64 (powers especially), rounded once to the compute type.
    t = tl.maximum(tl.load(steps + tl.load(row + 5)), one)  # t >= 1 except on a skipped step
    lr = tl.load(lr_p + group)
    decay = (one - lr * tl.load(wd_p + group)).to(ct)
    scale = tl.full([], 1.0, ct)
    if HAS_SCALE:
        scale = tl.load(scale_p).to(ct)
    acc = tl.full([NLP], 0.0, tl.float64)
    # The rounding keys of this parameter's step: (seed, t mod 2^32, buffer), spec 5.1.
    step32 = t.to(tl.uint64).to(tl.uint32)
    seed32 = seed.to(tl.uint32)
    keys = (_sr_key(seed32, step32, 0), _sr_key(seed32, step32, 1), _sr_key(seed32, step32, 2),
            _sr_key(seed32, step32, 3), _sr_key(seed32, step32, 4), _sr_key(seed32, step32, 5),
            _sr_key(seed32, step32, 6))
    # and of the tangent rows, by canonical coefficient index (spec 5.3).
    tkeys = (_sr_key(seed32, step32, BUF_TAN0 + 0), _sr_key(seed32, step32, BUF_TAN0 + 1),
             _sr_key(seed32, step32, BUF_TAN0 + 2), _sr_key(seed32, step32, BUF_TAN0 + 3),
             _sr_key(seed32, step32, BUF_TAN0 + 4), _sr_key(seed32, step32, BUF_TAN0 + 5))
    pio = (comp_p, _sr_key(seed32, step32, K_BUF_PARAM))  # how the parameter is read and stored
    # 8-bit state: qsc holds the addresses of each state slot's scales (launch.py), in st's order;
    # 8-bit tangent rows: then the address of their scales and the scales' row stride.
    fp = tl.pointer_type(tl.float32)
    qs = (qsc, qsc, qsc, qsc, qsc, qsc, qsc)
    if Q8:
        qs = (tl.load(qsc).to(fp), tl.load(qsc + 1).to(fp), tl.load(qsc + 2).to(fp), tl.load(qsc + 3).to(fp),
              tl.load(qsc + 4).to(fp), tl.load(qsc + 5).to(fp), tl.load(qsc + 6).to(fp))
    tq = (tstride, qsc, tstride)
    if TQ8:
        tq = (tstride, tl.load(qsc + 7).to(fp), tl.load(qsc + 8))
    if KIND == MADA:
        k = _make_mada_scalars(coef, consts, lr, decay, t, ct, VBAR_DETACH)
        st = (m_p, v_p, n_p, gprev_p, l_p, vb_p, s_p)
    else:
        k = _make_adamod_scalars(consts, lr, decay, t, ct)
        st = (m_p, v_p, s_p, gprev_p)
    for start in tl.range(0, CHUNK, BLOCK):
        po = start + tl.arange(0, BLOCK)
        so = soff + po
        mask = po < count
        if start + BLOCK <= count:
            if KIND == MADA:
                acc = _mada_block(pp, gp_, st, qs, keys, tkeys, pio, tan, tq, po, so, mask, acc, k, scale, STEP, DOT,
                                  ROWS, NL, NLP, HAS_BETA3, HAS_VBAR, HAS_LION, HAS_MOD, MAXIMIZE, HAS_SCALE, SR, TSR,
                                  PROUND, Q8, TQ8, False, BLOCK)
            else:
                _adamod_block(pp, gp_, st, qs, keys, pio, po, so, mask, k, scale, DIFF, MAXIMIZE, HAS_SCALE, SR, PROUND, Q8,
                              False, BLOCK)
        elif start < count:
            if KIND == MADA:
                acc = _mada_block(pp, gp_, st, qs, keys, tkeys, pio, tan, tq, po, so, mask, acc, k, scale, STEP, DOT,
                                  ROWS, NL, NLP, HAS_BETA3, HAS_VBAR, HAS_LION, HAS_MOD, MAXIMIZE, HAS_SCALE, SR, TSR,
                                  PROUND, Q8, TQ8, True, BLOCK)
            else:
                _adamod_block(pp, gp_, st, qs, keys, pio, po, so, mask, k, scale, DIFF, MAXIMIZE, HAS_SCALE, SR, PROUND, Q8,
                              True, BLOCK)
    if DOT:
        # One fp64 partial per (learned row, chunk); launch.py sums them in a fixed order.
        rows = tl.arange(0, NLP)
        tl.store(partial + rows * n_chunks + pid, acc, mask=rows < NL)
