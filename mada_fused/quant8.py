"""8-bit blockwise optimizer state (``state_dtype="8bit"``, docs/spec.md section 5.4) and
tangent rows (``tangent_dtype="8bit"``, section 5.5: signed codes, row by row).

Each state buffer is stored as one uint8 code per element and one fp32 scale per block
of :data:`BLOCK` elements. The scale is a power of two (the block's largest magnitude
with its mantissa cleared), so dividing by it only moves an exponent, and a code is an
8-bit float read off the fp32 bit pattern with integer operations: no table, no search,
and every backend (csrc/mada_math.h, triton_kernels/kernels.py) gets the same bits.

- signed buffers (``m, n, g', l``): sign bit + E4M3 (exponent bias 15, subnormals);
  magnitudes up to 1.875 scales, down to 2^-17 scales;
- non-negative buffers (``v, vb, s``): E5M3 (bias 31, subnormals), no sign, so twice the
  range (down to 2^-34 scales) for second moments, whose spread is the square of the
  gradients'.

Rounding is to the nearest code, ties to even, saturating at the largest code (the
spec says why not stochastically). Every value is a uint32 held in an int64, as in
backends/reference.py's hash.
"""
from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 256  # elements per scale; every parameter's state starts on a block boundary
MIN_NUMEL = 4096  # parameters with fewer elements keep fp32 state (as bitsandbytes)
MANTISSA = 3
CODE_DTYPE = torch.uint8
# Buffers that are never negative take the unsigned map (docs/spec.md 5.4).
UNSIGNED = frozenset(("v", "vb", "s"))
_EXP_MASK = 0x7F800000
_MIN_NORMAL_BITS = 1 << 23  # 2^-126: the least scale; smaller magnitudes store code 0


def exponent_bias(signed: bool) -> int:
    """E4 (bias 15) for signed codes, E5 (bias 31) for unsigned: the top binade is [1, 2)."""
    return 15 if signed else 31


def max_magnitude(signed: bool) -> int:
    return 0x7F if signed else 0xFF


def is_signed(name: str) -> bool:
    return name not in UNSIGNED


def _bits(x: Tensor) -> Tensor:
    return x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _float(bits: Tensor) -> Tensor:
    return (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)


def _blocks(x: Tensor) -> Tensor:
    """``x`` (1-D) as (blocks, BLOCK), the last block padded with zeros."""
    pad = -x.numel() % BLOCK
    return torch.nn.functional.pad(x, (0, pad)).view(-1, BLOCK)


def q8_scale(x: Tensor) -> Tensor:
    """Each block's scale (mada_math.h: q8_scale): 2^floor(log2(max |x|)), at least 2^-126;
    NaN when the block holds a NaN or an inf (the block is lost, not silently clipped)."""
    b = _blocks(x)
    top = _bits(b.abs().amax(dim=1)).clamp(min=_MIN_NORMAL_BITS) & _EXP_MASK
    return torch.where(b.isfinite().all(dim=1), _float(top), float("nan"))


def q8_encode(x: Tensor, scale: Tensor, signed: bool) -> Tensor:
    """The code of each fp32 ``x`` under its block's ``scale`` (per element), as int64
    (mada_math.h: q8_encode)."""
    u = _bits(x)
    ex = (u >> 23) & 0xFF
    mant = u & 0x7FFFFF
    ef = ex - ((_bits(scale) >> 23) & 0xFF) + exponent_bias(signed)  # the code's exponent field
    normal = ef >= 1
    n = torch.where(normal, (ef << 23) | mant, (1 << 23) | mant)
    s = torch.where(normal, 23 - MANTISSA, (24 - MANTISSA - ef).clamp(max=31))
    half = torch.bitwise_left_shift(torch.ones_like(s), s - 1)
    mag = (n + half - 1 + ((n >> s) & 1)) >> s  # round to nearest, ties to even
    # Zero and fp32 subnormals store 0, and so does every element of a lost (NaN) block.
    mag = torch.where((ex == 0) | scale.isnan(), 0, mag.clamp(max=max_magnitude(signed)))
    if signed:
        return torch.where(mag > 0, mag | ((u >> 31) << 7), 0)
    return torch.where(u >> 31 == 0, mag, 0)  # a negative value stores 0


def q8_decode(code: Tensor, scale: Tensor, signed: bool) -> Tensor:
    """The fp32 value of each code under its block's ``scale`` (mada_math.h: q8_decode)."""
    code = code.to(torch.int64)
    mag = code & max_magnitude(signed)
    ef = mag >> MANTISSA
    frac = mag & ((1 << MANTISSA) - 1)
    whole = torch.where(ef == 0, frac, frac + (1 << MANTISSA)).to(torch.float32)
    unit = _float((ef.clamp(min=1) - exponent_bias(signed) - MANTISSA + 127) << 23)
    value = whole * unit * scale
    return torch.where(code >> 7 == 1, -value, value) if signed else value


def quantize(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """(uint8 codes, fp32 scales) of a parameter's flat fp32 state ``x``."""
    scale = q8_scale(x)
    each = scale.repeat_interleave(BLOCK)[: x.numel()]
    return q8_encode(x, each, signed).to(torch.uint8), scale


def dequantize(codes: Tensor, scale: Tensor, signed: bool) -> Tensor:
    """The fp32 values of a parameter's flat codes and their blocks' scales."""
    each = scale.repeat_interleave(BLOCK)[: codes.numel()]
    return q8_decode(codes.reshape(-1), each, signed)


def quantize_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(uint8 codes, fp32 scales) of tangent rows ``rows`` (L, n) fp32: each row blockwise, with
    the signed map (docs/spec.md 5.5); scales have shape (L, num_blocks(n))."""
    codes, scales = zip(*(quantize(r, True) for r in rows))
    return torch.stack(codes), torch.stack(scales)


def dequantize_rows(codes: Tensor, scales: Tensor) -> Tensor:
    """The fp32 values (L, n) of 8-bit tangent rows ``codes`` (L, n) and their ``scales``."""
    return torch.stack([dequantize(c, s, True) for c, s in zip(codes, scales)]).view(codes.shape)


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def blocks_of(lo: int, hi: int) -> slice:
    """The scales of flat elements ``[lo, hi)``, ``lo`` on a block boundary (a parameter's)."""
    return slice(lo // BLOCK, lo // BLOCK + num_blocks(hi - lo))


def decode_entry(name: str, codes: Tensor, scale: Tensor) -> Tensor:
    """The fp32 values of a saved 8-bit state buffer ``name`` or of 8-bit tangent rows
    (``"tangents"``, as (L, n))."""
    if name == "tangents":
        return dequantize_rows(codes.reshape(len(codes), -1), scale)
    return dequantize(codes, scale, is_signed(name))


def encode_entry(name: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """(codes, scales) of a state buffer's or the tangent rows' fp32 values, as a step stores them."""
    if name == "tangents":
        return quantize_rows(x.reshape(len(x), -1))
    return quantize(x.reshape(-1), is_signed(name))
