"""Triton kernels for W2A2 linears: a fused activation prologue and an FP8 tensor-core GEMM.

``y = Qa(x) @ dequant(W)^T (+ bias)`` with 2-bit ``int``-grid weights and activations in
groups of 16 along K, E4M3 group scales, an fp32 global scale per tensor (W) and per row (x):
the arithmetic of :mod:`lowbit.formats` and ``torch.ops.lowbit.qlinear``.

Prologue (``_act_quant_kernel``)
--------------------------------
One pass over the activation: each program holds whole rows in registers (the row's global
scale needs every group scale of the row). On the way in it can apply the site's prologue:
* ``hadamard=True``: the online Hadamard transform (``torch.ops.lowbit.hadamard``) for
  power-of-two widths. The butterflies of :func:`lowbit.codegen.triton.hadamard.fwht_tile` run
  in fp32, the result is multiplied by ``1/sqrt(n)`` and rounded to x's dtype, with bf16
  rounded on the bits;
* or split channels (``x[..., index] * scale``, ``torch.ops.lowbit.channel_split``), loaded
  by index. A site with both (rotated, then split: that order) runs the Hadamard op first
  and this kernel for the split: gathering from the butterflies' registers (``tl.gather``)
  is exact in the interpreter and Triton 3.9, but Triton 3.6 fails to compile it for sm_90.

It then computes, exactly as ``lowbit.formats.quantize(x, fmt, per_row=True)``:

* group scale ``s = max(max(x) / hi, min(x) / lo, 0)``;
* row global ``g = max_groups(s) / scale_max`` (1 where it is 0); these three divisions by
  constants follow PyTorch's own arithmetic on the device (``_fmt_constants``);
* stored scale ``e4m3(min(fp32(s / g) * 1.0625, scale_max))``: the rounding to E4M3 (nearest,
  ties to even) is done on the fp32 bits (``_e4m3_code``), identically on the GPU and in
  Triton's CPU interpreter (whose own float-to-fp8 cast is not exact);
* codes ``q = clamp(round_half_even(fl(x / e)))`` with ``e = fl(stored * g)`` and an IEEE
  division (``floor`` on the ``half`` grid), 0 in a group whose effective scale is 0. Other
  grids and widths divide (``div_rn``); the 2-bit ``int`` grid compares (below).

It writes either the int8 codes (``torch.ops.lowbit.quantize_act``'s output; any bits and
grid with E4M3 scales) or, for the GEMM, the E4M3 bytes of ``q * stored``: for the ``int``
grid at 2 bits that product is exact in E4M3 (formats caps 2-bit scales at 224), so the
activation becomes a plain FP8 operand whose codes are recoverable bit for bit. These bytes
come from the scale's code c without a float encoder: c and ``c | 0x80`` for q = 1 and -1,
``2c`` (c < 8: a subnormal doubles into the codes up to 0x0E, which are ``n * 2^-9`` too) or
``c + 8`` (the exponent field plus one; at most 0x7E = 448) with 0x80 for q = -2, and 0x00 for
q = 0 (never 0x80).

2-bit codes by thresholds (the kernel's invariant)
--------------------------------------------------
q is a monotone function of x, decided by three tests on ``r = fl(x / e)``, e > 0, with the
ties of round-half-even: q >= 1 iff r > 1/2, q >= 0 iff r >= -1/2, q >= -1 iff r > -3/2
(r = 1/2 and r = -1/2 round to 0, r = -3/2 to -2). fl is monotone, so each test is one on
the exact quotient: r > 1/2 iff x / e > 1/2 + 2^-25 (the midpoint between 1/2 and 1/2 + 2^-24
rounds to the even 1/2), r >= -1/2 iff x / e >= -1/2 - 2^-25, r > -3/2 iff
x / e > -3/2 + 2^-24 (the grid steps 2^-24 below 1 and 2^-23 from 1 to 2). Then, for fp32 x and
e >= 2^-100 (e = E 2^k, E a 24-bit integer):

* ``t1 = e / 2`` (exact): ``q >= 1 iff x > t1``. The fp32 number after e / 2 is e/2 + 2^(k-1),
  above (1/2 + 2^-25) e (2^-25 e = E 2^(k-25) < 2^(k-1)), so none lies in between;
* ``t2 = -e / 2 = -t1``: ``q >= 0 iff x >= t2``, by the same spacing on the negative side;
* ``t3 = -H``: ``q >= -1 iff x > t3``, H the smallest fp32 above y = (3/2 - 2^-24) e (y itself
  is never an fp32 number: E 2^(k-24) is not a multiple of 2^(k-1) unless E = 2^23, and then y
  is not one of 2^k). H is fl(3e/2) or one of its fp32 neighbours, and for those z the test
  ``z > y`` is decided exactly as ``(z - e) - e/2 > -2^-24 e``: both subtractions are exact
  (Sterbenz: z is within [e/2, 2e] and z - e within [e/4, e]; a fused multiply-add there is
  exact too) and 2^-24 e is exact (no underflow: e >= 2^-100). Where z is far from 3e/2 (its
  overflow to inf, the fp16 zeros below) the difference is far from -2^-24 e and its rounding,
  monotone, keeps the side.

Hence three comparisons per element and no division: ``_int2_thresholds`` (fp32 x, any e,
``e == 0`` giving t1 = inf, so t2 = -inf, and t3 = -inf; e = inf, only reachable from fp32 x near the
fp32 maximum, t3 = -inf). For bf16 / fp16 x, whose values are fp32 numbers, x > t iff
x > RD16(t) and x >= t iff x >= RU16(t) in the 16-bit format (``_int2_thresholds16``):
u1 = RZ16(e/2), u2 = -u1, and u3 = -U with U, the smallest 16-bit number above y,
``r = RZ16(fl(3e/2))`` or the next one (the 16-bit grid is coarser, so the number below r is
below y; when fl(3e/2) < y no fp32 number, a 16-bit one included, lies in (fl(3e/2), y]),
chosen by the same exact test on r. There a group with e == 0 writes zero bytes instead.

e >= 2^-100 holds wherever the row global g is at least 2^-90 (a nonzero stored scale is at
least 2^-9, and fl(stored g) >= 2^-99). A row below it (all its |x| below 2^-81) is handled
in fp32 with x and e times 2^64: exact, x / e unchanged, every nonzero e above 2^-85, no
overflow. That path is a branch taken by any program with such a row (its cost is paid
only there); with ``hadamard=True`` it is the one straight path (multiplications by 1 for the
other rows), where a branch would cost the butterflies' registers.

Packed 16-bit path (``ASM``, bf16 on sm_90, fp16 on sm_80+, plain loads only): the group max
and min are a tree of ``max.bf16x2`` / ``min.bf16x2`` over the halves of each thread's
16 values (ptxas merges pairs into three-input VHMNMX), and the codes come from
``set.gt.u32.bf16x2`` lane masks m1 (q >= 1), m2 (q >= 0), m3 (q >= -1), nested because
t1 >= t2 > t3, and three LOP3: ``b0 ^ (m3 & (b0 ^ b1)) ^ (m2 & b1) ^ (m1 & c)`` is b0, b1, 0
and c for q = -2, -1, 0 and 1: per two elements three compares and three logic ops. The
interpreter (whose bf16 compares are on the integer bits), the split and fp32 x compare in
fp32: 16-bit x with the same 16-bit thresholds as fp32 values (``_from16``, so the CPU tests
check the packed path's decisions), fp32 x with t1, -t1, t3; the butterflies use the fp32 path
(their layout spreads a group over threads). The split gathers x as [ROWS, 16, BLOCK_G]: a
gather has no contiguity, so the compiler spreads the last axis over the threads and each
thread holds whole groups (gathered [ROWS, BLOCK_G * 16], a thread held one element of 32
groups and computed 32 groups' scales and thresholds); packing the gathered halves for the
packed path costs more than it saves there.
bf16 is widened and rounded on its bits (``_f32``, ``_round_bf16``): the interpreter gets
bf16 subnormals wrong. For x = 4096 x 8192 bf16 (E4M3 values, 8 warps, one row per program)
Triton 3.6 (ptxas 12.8) for sm_90 gives 40 registers, no spills and about 10.7 SASS
instructions per element on the common path (41.6 before: IEEE division, rounding and an E4M3
encoder per element); about 4 of them are per element (compares, logic, max / min, byte
packing), the rest per group (scale, thresholds) and per row. fp32 x: 13.9 (40.4); the split
(8168 + 24 columns): 41 with 79 registers (108, 125); with the butterflies: 116 (127).

GEMM (``_w2a2_kernel``)
-----------------------
Swap-AB like the W2A16 kernel (:mod:`.w2a16`): the tile of W is dequantized in registers to
E4M3 values ``q * stored`` (exact, as above), is the A operand of an FP8 ``tl.dot`` and the
activation tile (E4M3 bytes from the prologue) the B operand; the accumulator ``acc[n, m]``
is fp32 and the epilogue multiplies by ``global_w * global_x[m]`` and adds the bias. Two
dequantizations: ``PAIRS`` (codes i and i+8 of a group at once through one f16x2 FMA, the
inline PTX of :mod:`.w2a16`, then one f16x2 -> e4m3x2 conversion; eight dots per K tile
against register permutations of the activation tile) or the natural column order built with
``tl.join`` (one dot). Every product is exact; only the fp32 accumulation rounds (with
``max_num_imprecise_acc`` the Hopper FP8 accumulator is promoted to fp32 every that many K).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .hadamard import MAX_P, fwht_tile
from .w2a16 import (_XOR_HIGH_BITS, _decode_e4m3, _dequant_field, _dequant_pair, _interpreting, _natural_tile,
                    _split_k_total, _store_tile, _tile_counters, _words, _x_pairs)

_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (r + M) - M rounds |r| < 2^22 to nearest even
_SUB_MAGIC = tl.constexpr(8388608.0)   # 2^23


@triton.jit
def _e4m3_code(v):
    """E4M3 bits (int32, 0..126; the sign of -0.0 kept as 0x80) of fp32 ``0 <= v <= 448``,
    rounded to nearest, ties to even. Normal range: the fp32 bits rounded at bit 20 (the carry
    runs into the exponent); subnormals (v < 2^-6): ``round(v * 2^9)`` (8 gives 2^-6, 0x08)."""
    bits = v.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - 960
    sub = ((tl.abs(v) * 512.0 + _SUB_MAGIC) - _SUB_MAGIC).to(tl.int32)
    code = tl.where(tl.abs(v) < 0.015625, sub, normal)
    return code | ((bits >> 24) & 0x80)


@triton.jit
def _f32(x):
    """x as fp32 (exact); bf16 through its bits (Triton's interpreter converts bf16 subnormals wrongly)."""
    if x.dtype == tl.bfloat16:
        return ((x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _round_bf16(x):
    """fp32 -> its bf16 rounding (nearest, ties to even; finite x), on the bits: Triton's
    interpreter truncates its own cast and gets subnormals wrong."""
    b = x.to(tl.uint32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


_TINY_GLOBAL = tl.constexpr(2.0 ** -90)  # rows with a global below it take the scaled fp32 path
_TWO_64 = tl.constexpr(2.0 ** 64)


@triton.jit
def _minmax16_asm(a, b, MAX: tl.constexpr, F16: tl.constexpr):
    """Elementwise max or min of bf16 / fp16 tensors, two lanes per instruction (max.bf16x2)."""
    if MAX:
        if F16:
            asm: tl.constexpr = "max.f16x2 $0, $1, $2;"
        else:
            asm: tl.constexpr = "max.bf16x2 $0, $1, $2;"
    else:
        if F16:
            asm: tl.constexpr = "min.f16x2 $0, $1, $2;"
        else:
            asm: tl.constexpr = "min.bf16x2 $0, $1, $2;"
    return tl.inline_asm_elementwise(asm, "=r,r,r", [a, b], dtype=a.dtype, is_pure=True, pack=2)


@triton.jit
def _halves(v, ROWS: tl.constexpr, BLOCK_G: tl.constexpr, N: tl.constexpr):
    """(v[..., :N/2], v[..., N/2:]) of v [ROWS, BLOCK_G, N] (in registers: no data movement)."""
    return tl.split(tl.permute(tl.reshape(v, [ROWS, BLOCK_G, 2, N // 2]), [0, 1, 3, 2]))


@triton.jit
def _group_max_min16(xr, ROWS: tl.constexpr, BLOCK_G: tl.constexpr, F16: tl.constexpr):
    """fp32 max and min of each group of 16 of a bf16 / fp16 tile [ROWS, BLOCK_G, 16]: a tree of
    packed max / min over the halves of the group (exact: the max of 16-bit values is one of them)."""
    a, b = _halves(xr, ROWS, BLOCK_G, 16)
    mx = _minmax16_asm(a, b, True, F16)
    mn = _minmax16_asm(a, b, False, F16)
    a, b = _halves(mx, ROWS, BLOCK_G, 8)
    mx = _minmax16_asm(a, b, True, F16)
    a, b = _halves(mn, ROWS, BLOCK_G, 8)
    mn = _minmax16_asm(a, b, False, F16)
    a, b = _halves(mx, ROWS, BLOCK_G, 4)
    mx = _minmax16_asm(a, b, True, F16)
    a, b = _halves(mn, ROWS, BLOCK_G, 4)
    mn = _minmax16_asm(a, b, False, F16)
    a, b = tl.split(mx)
    mx = tl.maximum(a.to(tl.float32), b.to(tl.float32))
    a, b = tl.split(mn)
    mn = tl.minimum(a.to(tl.float32), b.to(tl.float32))
    return mx, mn


@triton.jit
def _int2_h(e, half):
    """H, the smallest fp32 above y = (1.5 - 2^-24) e (``half`` = e / 2): fl(1.5 e) or one of its
    neighbours. For z within a few ulps of 1.5 e, ``(z - e) - e / 2`` is exact (Sterbenz, twice)
    and z > y iff it exceeds -2^-24 e (exact), so the choice is exact (module docstring)."""
    m = e + half
    mb = m.to(tl.int32, bitcast=True)
    below = (mb - 1).to(tl.float32, bitcast=True)
    above = (mb + 1).to(tl.float32, bitcast=True)
    tie = e * -5.9604644775390625e-08
    return tl.where((m - e) - half > tie, tl.where((below - e) - half > tie, below, m), above)


@triton.jit
def _int2_thresholds(e):
    """fp32 thresholds ``(t1, t3)`` of the 2-bit int grid for effective scales ``e``, 0 or in
    [2^-100, inf]: for every fp32 x, ``q >= 1`` iff ``x > t1``, ``q >= 0`` iff ``x >= -t1`` and
    ``q >= -1`` iff ``x > t3``, q being ``clamp(round_half_even(fl(x / e)), -2, 1)`` (0 where
    ``e == 0``: t1 = inf, t3 = -inf; t1 >= -t1 > t3 always). See the module docstring."""
    half = e * 0.5  # exact
    h = _int2_h(e, half)
    zero = e == 0.0
    t1 = tl.where(zero, float("inf"), half)
    t3 = tl.where(zero | (e == float("inf")), float("-inf"), -h)
    return t1, t3


@triton.jit
def _int2_thresholds16(e, F16: tl.constexpr):
    """The thresholds of :func:`_int2_thresholds` for bf16 / fp16 x, as 16-bit bits (int32):
    ``u1 = RD16(e / 2)``, ``u2 = RU16(-e / 2) = -u1`` and ``u3 = -U``, U the smallest 16-bit
    number above y = (1.5 - 2^-24) e: ``r = RZ16(fl(1.5 e))`` or the next one (the 16-bit grid is
    coarser than fp32's, so nothing below r lies above y), picked by the exact test of
    :func:`_int2_h` on r. For 16-bit x, x > t iff x > RD16(t) and x >= t iff x >= RU16(t).
    ``e`` finite (as it is for 16-bit x); a group with ``e == 0`` gets zero bytes instead."""
    half = e * 0.5
    m = e + half
    if F16:
        u1 = _to16(half, False, True)
        r = _to16(m, False, True)
        z = _from16(r, True)
    else:
        u1 = half.to(tl.int32, bitcast=True) >> 16
        r = m.to(tl.int32, bitcast=True) >> 16
        z = (r << 16).to(tl.float32, bitcast=True)
    above = ((z - e) - half > e * -5.9604644775390625e-08).to(tl.int32)
    return u1, u1 | 0x8000, (r + 1 - above) | 0x8000


@triton.jit
def _int2_group_bytes(code_s, FP8_OUT: tl.constexpr):
    """Output bytes (int32) of q = 1, -1, -2 of each group (q = 0 is byte 0): the int8 codes, or
    with ``FP8_OUT`` the E4M3 bytes of ``q * stored`` built from the scale's code c: c, c | 0x80
    and, for 2 * stored, 2c (c < 8: subnormal, or the normal 2^-6 + ... with the same bits) or
    c + 8 (exponent + 1), | 0x80. Exact: stored <= 224."""
    if FP8_OUT:
        return code_s, code_s | 0x80, tl.where(code_s < 8, code_s * 2, code_s + 8) | 0x80
    return (tl.full(code_s.shape, 1, tl.int32), tl.full(code_s.shape, 0xFF, tl.int32),
            tl.full(code_s.shape, 0xFE, tl.int32))


@triton.jit
def _to16(t, UP: tl.constexpr, F16: tl.constexpr):
    """Bits (int32, low 16) of the bf16 / fp16 number next to fp32 ``t`` (not NaN) toward zero,
    or away from zero with ``UP`` (saturating at the largest finite fp16 toward zero)."""
    b = t.to(tl.int32, bitcast=True)
    a = b & 0x7FFFFFFF
    if F16:
        m = tl.abs(t)
        r = tl.where(m < 6.103515625e-05, (tl.minimum(m, 1.0) * 16777216.0).to(tl.int32),
                     tl.minimum((a >> 13) - 0x1C000, 0x7BFF))
        r = tl.where(a >= 0x7F800000, 0x7C00, r)
        if UP:
            r += (_from16(r, True) < m).to(tl.int32)
    else:
        if UP:
            r = (a + 0xFFFF) >> 16
        else:
            r = a >> 16
    return r | ((b >> 16) & 0x8000)


@triton.jit
def _from16(u, F16: tl.constexpr):
    """fp32 value of bf16 / fp16 bits ``u`` (int32, low 16 bits)."""
    if F16:
        return u.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return (u << 16).to(tl.float32, bitcast=True)


_INT2_BYTES16_PTX = """{
        .reg .b32 m1, m2, m3, t;
        set.gt.u32.TYPE m1, $1, $2;
        set.ge.u32.TYPE m2, $1, $3;
        set.gt.u32.TYPE m3, $1, $4;
        lop3.b32 t, m3, $5, $6, 0x6A;
        lop3.b32 t, m2, $7, t, 0x6A;
        lop3.b32 $0, m1, $8, t, 0x6A;
        }"""
_INT2_BYTES16_F16 = tl.constexpr(_INT2_BYTES16_PTX.replace("TYPE", "f16x2"))
_INT2_BYTES16_BF16 = tl.constexpr(_INT2_BYTES16_PTX.replace("TYPE", "bf16x2"))


@triton.jit
def _int2_bytes16_asm(x, u1, u2, u3, k1, b0, b1, c, F16: tl.constexpr):
    """Output bytes (int16 lanes) of 16-bit x against 16-bit thresholds, two lanes per
    instruction: three compares to lane masks m1 (q >= 1), m2 (q >= 0), m3 (q >= -1), nested,
    then ``b0 ^ (m3 & k1) ^ (m2 & b1) ^ (m1 & c)`` (k1 = b0 ^ b1): b0, b1, 0, c for q = -2..1."""
    if F16:
        asm: tl.constexpr = _INT2_BYTES16_F16
    else:
        asm: tl.constexpr = _INT2_BYTES16_BF16
    return tl.inline_asm_elementwise(asm, "=r,r,r,r,r,r,r,r,r", [x, u1, u2, u3, k1, b0, b1, c], dtype=tl.int16,
                                     is_pure=True, pack=2)


@triton.jit
def _int2_bytes(xg, eff, c, b1, b0):
    """Output bytes (int32) of fp32 x [ROWS, BLOCK_G, 16]: c, b1, b0 per group for q = 1, -1,
    -2 and 0 for q = 0, from the fp32 thresholds (any e, 0 included)."""
    t1, t3 = _int2_thresholds(eff)
    return _int2_select(xg, t1, t3, c, b1, b0)


@triton.jit
def _int2_select(xg, t1, t3, c, b1, b0):
    """The bytes of q for fp32 x [ROWS, BLOCK_G, 16] and per-group thresholds (q >= 0 iff x >= -t1)."""
    t1 = t1[:, :, None]
    return tl.where(xg >= -t1, tl.where(xg > t1, c[:, :, None], 0),
                    tl.where(xg > t3[:, :, None], b1[:, :, None], b0[:, :, None]))


@triton.jit
def _act_quant_kernel(
    x_ptr, idx_ptr, sc_ptr, out_ptr, s_ptr, g_ptr,
    M, K, KP, stride_xm, stride_om, stride_sm,
    QMIN: tl.constexpr, QMAX: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, SCALE_MAX: tl.constexpr,
    HALF: tl.constexpr, SPLIT: tl.constexpr, FP8_OUT: tl.constexpr, RECIP: tl.constexpr,
    INV_LO: tl.constexpr, INV_HI: tl.constexpr, INV_SCALE_MAX: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_G: tl.constexpr,
    HADAMARD: tl.constexpr = False, HP: tl.constexpr = 1, HSCALE: tl.constexpr = 1.0,
    IN_BF16: tl.constexpr = False, ASM: tl.constexpr = False, EVEN: tl.constexpr = False,
    CLIP: tl.constexpr = 1.0,
):
    """Rows [pid*ROWS, +ROWS): BLOCK_G (a power of two >= KP/16) groups of 16 per row.
    ``HADAMARD``: the input rows (HP wide, a power of two) go through ``torch.ops.lowbit.hadamard``
    first (butterflies in fp32, times HSCALE, rounded to x's dtype); not together with SPLIT.
    ``ASM`` (bf16 / fp16 x, compiled): group max / min and the 2-bit codes in packed 16-bit PTX.
    ``EVEN``: M a multiple of ROWS and K == KP == 16 * BLOCK_G (no masks)."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_G * 16)
    if EVEN:  # constant masks: the loads and stores compile without predicates
        rmask = tl.full([ROWS], 1, tl.int1)
        cmask = tl.full([BLOCK_G * 16], 1, tl.int1)
    else:
        rmask = rows < M
        cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    if HADAMARD:
        tl.static_assert(not SPLIT, "the split after a fused Hadamard is a second pass (act_quant)")
        hcols = tl.arange(0, HP)
        xh = tl.load(x_ptr + rows[:, None] * stride_xm + hcols[None, :], mask=rmask[:, None], other=0.0)
        xf = fwht_tile(_f32(xh), ROWS, HP) * HSCALE
        if IN_BF16:  # rounded to bf16 on the bits (Triton's interpreter truncates its own cast)
            xv = _round_bf16(xf)
        else:
            xv = xf.to(xh.dtype)  # HP == K == BLOCK_G * 16, no split (act_quant runs that separately)
    elif SPLIT:
        # loaded as [ROWS, 16, BLOCK_G] (element, group): a gather has no contiguity, so the
        # compiler spreads its last axis over the threads, and each thread gets whole groups
        g3 = tl.arange(0, BLOCK_G)[None, None, :] * 16 + tl.arange(0, 16)[None, :, None]
        if EVEN:
            src = tl.load(idx_ptr + g3)
            xv = tl.load(x_ptr + rows[:, None, None] * stride_xm + src)
            sc = tl.load(sc_ptr + g3)
        else:
            cm3 = g3 < K
            src = tl.load(idx_ptr + g3, mask=cm3, other=0)
            xv = tl.load(x_ptr + rows[:, None, None] * stride_xm + src, mask=rmask[:, None, None] & cm3, other=0.0)
            sc = tl.load(sc_ptr + g3, mask=cm3, other=0.0)
        # x * scale rounded to x's dtype, as the op computes it (a product in fp32, then rounded)
        xf = _f32(xv) * sc
        if IN_BF16:  # rounded to bf16 on the bits, as for the Hadamard
            xv = _round_bf16(xf)
        else:
            xv = xf.to(xv.dtype)
    else:
        xv = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    X16: tl.constexpr = xv.dtype == tl.bfloat16 or xv.dtype == tl.float16
    F16: tl.constexpr = xv.dtype == tl.float16
    if SPLIT:
        xr = tl.permute(xv, [0, 2, 1])
    else:
        xr = tl.reshape(xv, [ROWS, BLOCK_G, 16])
    if ASM:
        tl.static_assert(X16, "the packed path needs bf16 or fp16 x")
        gmax, gmin = _group_max_min16(xr, ROWS, BLOCK_G, F16)
    else:
        gmax = tl.max(_f32(xr), axis=2)
        gmin = tl.min(_f32(xr), axis=2)
    if RECIP:  # PyTorch on CUDA divides by a Python scalar as a product with its fp32 reciprocal
        pos = tl.maximum(gmax, 0.0) * INV_HI
        neg = tl.minimum(gmin, 0.0) * INV_LO
    else:
        lo = tl.full([ROWS, BLOCK_G], LO, tl.float32)
        hi = tl.full([ROWS, BLOCK_G], HI, tl.float32)
        pos = tl.math.div_rn(tl.maximum(gmax, 0.0), hi)
        neg = tl.math.div_rn(tl.minimum(gmin, 0.0), lo)
    s = tl.maximum(pos, neg)
    smax = tl.max(s, axis=1)
    if RECIP:
        gscale = smax * INV_SCALE_MAX
    else:
        gscale = tl.math.div_rn(smax, tl.full([ROWS], SCALE_MAX, tl.float32))
    gscale = tl.where(gscale > 0.0, gscale, 1.0)
    ratio = tl.minimum(tl.math.div_rn(s, gscale[:, None] + tl.zeros_like(s)) * 1.0625, SCALE_MAX)
    code_s = _e4m3_code(ratio)
    if CLIP != 1.0:  # activation clipping (lowbit.formats): the stored scales stay those of clip = 1
        gscale = gscale * CLIP
    eff = _decode_e4m3(code_s & 0x7F) * gscale[:, None]  # +0 for a -0 scale: e == 0 all the same
    if EVEN:
        gmask = rmask[:, None] & tl.full([1, BLOCK_G], 1, tl.int1)
        omask = mask
    else:
        gmask = rmask[:, None] & (tl.arange(0, BLOCK_G) < KP // 16)[None, :]
        omask = rmask[:, None] & (cols < KP)[None, :]
    # the group index times a 1 the compiler cannot see: the byte store keeps code_s's layout
    # (one byte per group and thread) instead of a shared-memory round trip to a coalesced one
    one = (KP > 0).to(tl.int32)
    tl.store(s_ptr + rows[:, None] * stride_sm + tl.arange(0, BLOCK_G)[None, :] * one, code_s.to(tl.uint8),
             mask=gmask)
    tl.store(g_ptr + rows, gscale, mask=rmask)
    optrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    if QMIN == -2 and QMAX == 1 and not HALF:
        # 2-bit int grid: q from three comparisons of x with per-group thresholds (module docstring)
        c, b1, b0 = _int2_group_bytes(code_s, FP8_OUT)
        # rows whose global is below 2^-90 (all |x| below ~2^-81): x and e times 2^64 (exact, x / e
        # unchanged), which puts every nonzero e above 2^-100, in fp32
        up = tl.where(gscale < _TINY_GLOBAL, _TWO_64, 1.0)
        if HADAMARD:  # one straight fp32 path (a branch here costs the butterflies' registers)
            out = _int2_bytes(_f32(xr) * up[:, None, None], eff * up[:, None], c, b1, b0).to(tl.uint8)
        elif tl.min(gscale, axis=0) < _TINY_GLOBAL:  # rare: the same, in a branch
            out = _int2_bytes(_f32(xr) * up[:, None, None], eff * up[:, None], c, b1, b0).to(tl.uint8)
        elif X16:  # 16-bit thresholds; a group with e == 0 writes zeros through its bytes
            u1, u2, u3 = _int2_thresholds16(eff, F16)
            zero = eff == 0.0
            c = tl.where(zero, 0, c)
            b1 = tl.where(zero, 0, b1)
            b0 = tl.where(zero, 0, b0)
            if ASM:
                z = tl.zeros([ROWS, BLOCK_G, 16], tl.int16)
                out = _int2_bytes16_asm(xr, u1.to(tl.int16)[:, :, None] + z, u2.to(tl.int16)[:, :, None] + z,
                                        u3.to(tl.int16)[:, :, None] + z, (b0 ^ b1).to(tl.int16)[:, :, None] + z,
                                        b0.to(tl.int16)[:, :, None] + z, b1.to(tl.int16)[:, :, None] + z,
                                        c.to(tl.int16)[:, :, None] + z, F16).to(tl.uint8)
            else:  # the same comparisons on the fp32 values (the interpreter; bf16 compares there are on bits;
                # -u1 is u2)
                out = _int2_select(_f32(xr), _from16(u1, F16), _from16(u3, F16), c, b1, b0).to(tl.uint8)
        else:
            out = _int2_bytes(_f32(xr), eff, c, b1, b0).to(tl.uint8)
        out = tl.reshape(out, [ROWS, BLOCK_G * 16])
        if FP8_OUT:
            tl.store(optrs, out, mask=omask)
        else:
            tl.store(optrs, out.to(tl.int8, bitcast=True), mask=omask)
    else:
        xg = _f32(xr)
        safe = tl.where(eff == 0.0, 1.0, eff)
        r = tl.math.div_rn(xg, safe[:, :, None] + tl.zeros_like(xg))
        r = tl.minimum(tl.maximum(r, -4194304.0), 4194304.0)
        if HALF:
            r = tl.floor(r)
        else:
            r = (r + _RNE_MAGIC) - _RNE_MAGIC
        q = tl.minimum(tl.maximum(r, QMIN), QMAX)
        q = tl.where(eff[:, :, None] == 0.0, 0.0, q)
        tl.store(optrs, tl.reshape(q, [ROWS, BLOCK_G * 16]).to(tl.int8), mask=omask)


@triton.jit
def _fp8_pair_dot(acc, w, s, s1, soff, ai, i: tl.constexpr, UPCAST: tl.constexpr, IMPRECISE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    if UPCAST:
        p = _dequant_pair(w, s, s1, soff, i, 0, tl.float32, False, BLOCK_N, BLOCK_G)
        return tl.dot(p, tl.trans(_decode_e4m3(ai.to(tl.int32))), acc, input_precision="ieee")
    p = _dequant_pair(w, s, s1, soff, i, 0, tl.float16, True, BLOCK_N, BLOCK_G).to(tl.float8e4nv)
    return tl.dot(p, tl.trans(ai.to(tl.float8e4nv, bitcast=True)), acc, max_num_imprecise_acc=IMPRECISE)


@triton.jit
def _w2a2_kernel(
    a_ptr, ga_ptr, w_ptr, s_ptr, gw_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, GX,
    stride_am, stride_wn, stride_sn, stride_ym,
    HAS_BIAS: tl.constexpr, PAIRS: tl.constexpr, UPCAST: tl.constexpr, IMPRECISE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, GROUP_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """acc[n, m] = sum_k (q_w s_w)[n, k] (q_a s_a)[m, k] over GX groups of 16; y[m, n] =
    acc * global_w * global_a[m] + bias[n]. a: E4M3 bytes [M, 16*GX]. ``UPCAST``: fp32 dot on
    exactly decoded operands (the interpreter). SPLIT_K > 1: serial split-K as in .w2a16."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_N * num_m
    first_n = (pid // width) * GROUP_N
    rows = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % width) % rows
    pid_m = (pid % width) // rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    offs_g = tl.arange(0, BLOCK_G)
    offs_k = tl.arange(0, 16 * BLOCK_G)
    tiles = tl.cdiv(GX, BLOCK_G)
    per_split = tl.cdiv(tiles, SPLIT_K)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, tiles)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for t in range(t_lo, t_hi):
        g = t * BLOCK_G + offs_g
        wmask = n_mask[:, None] & (g < GX)[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + g[None, :], mask=wmask, other=0)
        sb = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=wmask, other=0)
        s = _decode_e4m3(sb.to(tl.int32))
        w = w ^ _XOR_HIGH_BITS
        k = t * 16 * BLOCK_G + offs_k
        at = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :],
                     mask=m_mask[:, None] & (k < 16 * GX)[None, :], other=0)
        if PAIRS:
            s1 = s.to(tl.float16)
            soff = (s * -6.0).to(tl.float16)
            a0, a1, a2, a3, a4, a5, a6, a7 = _x_pairs(at, BLOCK_M, BLOCK_G)
            acc = _fp8_pair_dot(acc, w, s, s1, soff, a0, 0, UPCAST, IMPRECISE, BLOCK_N, BLOCK_G)
            acc = _fp8_pair_dot(acc, w, s, s1, soff, a1, 1, UPCAST, IMPRECISE, BLOCK_N, BLOCK_G)
            acc = _fp8_pair_dot(acc, w, s, s1, soff, a2, 2, UPCAST, IMPRECISE, BLOCK_N, BLOCK_G)
            acc = _fp8_pair_dot(acc, w, s, s1, soff, a3, 3, UPCAST, IMPRECISE, BLOCK_N, BLOCK_G)
            acc = _fp8_pair_dot(acc, w, s, s1, soff, a4, 4, UPCAST, IMPRECISE, BLOCK_N, BLOCK_G)
            acc = _fp8_pair_dot(acc, w, s, s1, soff, a5, 5, UPCAST, IMPRECISE, BLOCK_N, BLOCK_G)
            acc = _fp8_pair_dot(acc, w, s, s1, soff, a6, 6, UPCAST, IMPRECISE, BLOCK_N, BLOCK_G)
            acc = _fp8_pair_dot(acc, w, s, s1, soff, a7, 7, UPCAST, IMPRECISE, BLOCK_N, BLOCK_G)
        else:
            wt = _natural_tile(w, s, 0, BLOCK_N, BLOCK_G)
            if UPCAST:
                acc = tl.dot(wt, tl.trans(_decode_e4m3(at.to(tl.int32))), acc, input_precision="ieee")
            else:
                acc = tl.dot(wt.to(tl.float8e4nv), tl.trans(at.to(tl.float8e4nv, bitcast=True)), acc,
                             max_num_imprecise_acc=IMPRECISE)
    acc = acc * tl.load(gw_ptr) * tl.load(ga_ptr + offs_m, mask=m_mask, other=0.0)[None, :]
    ymask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K > 1:
        last, total = _split_k_total(acc, ws_ptr, cnt_ptr, pid_k, pid_n, pid_m, num_m, offs_n, offs_m, ymask, M, N,
                                     SPLIT_K, BLOCK_N, BLOCK_M)
        if last:
            _store_tile(total, b_ptr, y_ptr, offs_n, offs_m, n_mask, ymask, stride_ym, HAS_BIAS)
    else:
        _store_tile(acc, b_ptr, y_ptr, offs_n, offs_m, n_mask, ymask, stride_ym, HAS_BIAS)


@triton.jit
def _w_to_e4m3_kernel(w_ptr, s_ptr, out_ptr, N, GP, stride_wn, stride_sn, stride_on,
                      BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """E4M3 bytes of the W values ``q * stored`` [N, 16*GP] (exact), natural order."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    mask = (offs_n < N)[:, None] & (g < GP)[None, :]
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + g[None, :], mask=mask, other=0) ^ _XOR_HIGH_BITS
    s = _decode_e4m3(tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=mask, other=0).to(tl.int32))
    v = _natural_tile(w, s, 0, BLOCK_N, BLOCK_G)
    code = _e4m3_code(v)
    code = tl.where(v == 0.0, 0, code)
    k = tl.program_id(1) * 16 * BLOCK_G + tl.arange(0, 16 * BLOCK_G)
    tl.store(out_ptr + offs_n[:, None] * stride_on + k[None, :], code.to(tl.uint8),
             mask=(offs_n < N)[:, None] & (k < 16 * GP)[None, :])


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------

def _f32_reciprocal(c: float) -> float:
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(c, dtype=torch.float32))


def _fmt_constants(bits: int, grid: str, cuda: bool):
    """Format constants of the prologue. ``RECIP``: the reference op divides by the Python scalars
    ``level_hi``, ``level_lo`` and ``scale_max``; on CUDA PyTorch computes such a division as a
    product with the scalar's fp32 reciprocal, on the CPU as an IEEE division. The kernel follows
    the reference of the device it runs on (the interpreter runs CPU tensors)."""
    from lowbit.formats import QFormat

    f = QFormat(bits, grid, 16, "e4m3")
    return dict(QMIN=f.qmin, QMAX=f.qmax, LO=f.level_lo, HI=f.level_hi, SCALE_MAX=f.scale_max, HALF=grid == "half",
                RECIP=cuda, INV_LO=_f32_reciprocal(f.level_lo), INV_HI=_f32_reciprocal(f.level_hi),
                INV_SCALE_MAX=_f32_reciprocal(f.scale_max))


def _packed16(x: torch.Tensor) -> bool:
    """The packed 16-bit PTX of the prologue: bf16 x on sm_90+ (set.bf16x2), fp16 on sm_80+."""
    if not x.is_cuda or _interpreting() or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return torch.cuda.get_device_capability(x.device) >= ((9, 0) if x.dtype == torch.bfloat16 else (8, 0))


def act_quant(x: torch.Tensor, bits: int = 2, grid: str = "int", padded_width: int | None = None,
              split_index: torch.Tensor | None = None, split_scale: torch.Tensor | None = None,
              fp8_values: bool = False, rows_per_program: int | None = None, hadamard: bool = False,
              num_warps: int | None = None, clip: float = 1.0):
    """Dynamic per-row activation quantization in groups of 16 with E4M3 scales, in one pass.

    ``x`` [..., K_in] (any float dtype); with ``hadamard`` the rows first go through the online
    Hadamard transform (``torch.ops.lowbit.hadamard``; K_in a power of two from 16 to
    :data:`MAX_P`); with ``split_index``/``split_scale`` ([K]) the quantized activation is then
    ``x[..., index] * scale`` (``torch.ops.lowbit.channel_split``), else x itself (K = K_in).
    The order is the one the rotate and split_outliers passes give a site's prologue. Columns
    K..padded_width are zeros. Returns ``(out, scales,
    global)``: ``out`` int8 codes [..., Kp] (``fp8_values=False``: equal to
    ``torch.ops.lowbit.quantize_act``) or the ``float8_e4m3fn`` values ``q * stored``
    (2-bit ``int`` grid only); scales ``float8_e4m3fn`` [..., Kp/16]; global fp32 [..., 1].
    ``rows_per_program`` and ``num_warps`` override the launch (tuning). ``clip``: the activation
    clip ratio (``QFormat.clip``; the returned global includes it).
    """
    if fp8_values and (bits != 2 or grid != "int"):
        raise ValueError("E4M3 activation values need the 2-bit int grid (exact products)")
    k = x.shape[-1] if split_index is None else split_index.shape[0]
    kp = padded_width or -(-k // 16) * 16
    if kp % 16 or kp < k:
        raise ValueError(f"padded width {kp} must be a multiple of 16 and >= {k}")
    n_in = x.shape[-1]
    if hadamard and (n_in & (n_in - 1) or not 16 <= n_in <= MAX_P or x.dtype == torch.float64):
        raise ValueError(f"the fused Hadamard needs a power-of-two width from 16 to {MAX_P} and a half or "
                         f"float32 x (got {n_in}, {x.dtype}); run torch.ops.lowbit.hadamard first")
    if hadamard and split_index is None and kp != n_in:
        raise ValueError(f"the fused Hadamard without a split writes {n_in} columns; padded_width {kp} differs")
    if hadamard and split_index is not None:  # two passes: see the module docstring
        x, hadamard, n_in = torch.ops.lowbit.hadamard(x), False, x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, kp), device=x.device, dtype=torch.uint8 if fp8_values else torch.int8)
    scales = torch.empty((m, kp // 16), device=x.device, dtype=torch.uint8)
    gscale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    if m:
        block_g = triton.next_power_of_2(kp // 16)
        tile = 16 * block_g + (n_in if hadamard else 0)
        rows = rows_per_program or max(1, min(16, 4096 // tile))
        split = split_index is not None
        idx = split_index.to(torch.int32).contiguous() if split else gscale
        sc = split_scale.to(torch.float32).contiguous() if split else gscale
        nw = num_warps or (4 if tile * rows <= 4096 else 8)
        even = m % rows == 0 and k == kp == 16 * block_g
        # the packed path wants each thread's 16 values of a group in its registers, as the plain
        # load gives them; the gather of a split and the butterflies' layouts spread them out
        asm = _packed16(x) and not hadamard and not split
        _act_quant_kernel[(triton.cdiv(m, rows),)](
            x2, idx, sc, out, scales, gscale, m, k, kp, x2.stride(0), out.stride(0), scales.stride(0),
            **_fmt_constants(bits, grid, x.is_cuda), SPLIT=split, FP8_OUT=fp8_values, ROWS=rows, BLOCK_G=block_g,
            HADAMARD=hadamard, HP=n_in if hadamard else 1, HSCALE=1.0 / math.sqrt(n_in) if hadamard else 1.0,
            IN_BF16=x.dtype == torch.bfloat16, ASM=asm, EVEN=even, CLIP=float(clip),
            num_warps=nw)
    out = out.view(torch.float8_e4m3fn) if fp8_values else out
    return (out.reshape(*lead, kp), scales.view(torch.float8_e4m3fn).reshape(*lead, kp // 16),
            gscale.reshape(*lead, 1))


def weight_e4m3(w_packed: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """The values ``q * stored`` of a 2-bit int-grid weight as ``float8_e4m3fn`` [N, Kp] (exact)."""
    n, gp = w_scales.shape
    words = _words(w_packed)
    out = torch.empty((n, gp * 16), device=w_packed.device, dtype=torch.uint8)
    bn, bg = 64, 8
    _w_to_e4m3_kernel[(triton.cdiv(n, bn), triton.cdiv(gp, bg))](
        words, w_scales.view(torch.uint8), out, n, gp, words.stride(0), w_scales.stride(0), out.stride(0),
        BLOCK_N=bn, BLOCK_G=bg, num_warps=4)
    return out.view(torch.float8_e4m3fn)


PATHS = ("fused", "scaled_mm")
# The "scaled_mm" path lets cuBLAS accumulate FP8 products without promoting to fp32 at every
# K block ("fast accumulation") up to this K. H200, 2026-12-01 (`bench/kernels.py`-style run,
# M=4096, random 2-bit operands), relative error of the output against float64 on the same
# operands, fast / promoted: K=4096 3.4e-4 / 2.6e-5, K=8192 5.8e-4 / 2.5e-5, K=11008 7.1e-4 /
# 2.5e-5; the error grows with K, so longer sums keep the promoted accumulation (the contract is
# 1e-3). Prologue + dequantization + GEMM at M=4096, K=N=8192: 440.0 us (1.55x cuBLAS bf16)
# against 469.7 (1.45x); cuBLAS FP8 alone with the operands given 334.3 against 411.8 us.
SCALED_MM_FAST_ACCUM_MAX_K = 11008
_DEFAULTS = {
    "skinny": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_G=16, GROUP_N=1, SPLIT_K=0, PAIRS=True, IMPRECISE=None,
                   num_warps=8, num_stages=3),
    "gemm": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_G=8, GROUP_N=8, SPLIT_K=1, PAIRS=False, IMPRECISE=None,
                 num_warps=8, num_stages=3),
}
SKINNY_MAX_M = 16


def default_config(m: int, n: int, k: int) -> dict:
    cfg = dict(_DEFAULTS["skinny" if m <= SKINNY_MAX_M else "gemm"])
    if cfg["SPLIT_K"] == 0:
        tiles = triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(m, cfg["BLOCK_M"])
        max_split = max(1, triton.cdiv(triton.cdiv(k, 16), cfg["BLOCK_G"]))
        cfg["SPLIT_K"] = max(1, min(8, max_split, round(256 / tiles)))
    return cfg


def w2a2_gemm(a8: torch.Tensor, a_global: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor,
              w_global: torch.Tensor, bias: torch.Tensor | None = None, out_dtype=torch.bfloat16,
              path: str = "fused", fast_accum: bool | None = None, **config) -> torch.Tensor:
    """``y = (a8 * a_global) @ (W values * w_global)^T + bias`` for E4M3 activation values
    ``a8`` [M, Kp] (from :func:`act_quant` with ``fp8_values=True``) and a packed 2-bit weight.

    ``path``: "fused" (the Triton kernel, W dequantized in registers) or "scaled_mm" (W
    dequantized to an E4M3 buffer, then ``torch._scaled_mm`` with row-wise scales; GPU only).
    ``fast_accum`` (the "scaled_mm" path): let the FP8 tensor cores accumulate without
    promoting partial sums to fp32 at every K block; by default on for K up to
    :data:`SCALED_MM_FAST_ACCUM_MAX_K`.
    """
    n, gp = w_scales.shape
    m, kp = a8.shape
    if kp != gp * 16:
        raise ValueError(f"activation width {kp} != weight width {gp * 16}")
    ga = a_global.reshape(m).float().contiguous()
    gw = w_global.reshape(1).float()
    if path == "scaled_mm":
        w8 = weight_e4m3(w_packed, w_scales)
        fast = kp <= SCALED_MM_FAST_ACCUM_MAX_K if fast_accum is None else fast_accum
        y = torch._scaled_mm(a8, w8.t(), scale_a=ga.reshape(m, 1), scale_b=gw.expand(1, n).contiguous(),
                             out_dtype=out_dtype, use_fast_accum=bool(fast))
        return y if bias is None else (y.float() + bias.float()).to(out_dtype)
    cfg = default_config(m, n, kp)
    cfg.update(config)
    words = _words(w_packed)
    sbytes = w_scales.view(torch.uint8)
    a = a8.view(torch.uint8)
    y = torch.empty((m, n), device=a8.device, dtype=out_dtype)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    split = cfg["SPLIT_K"]
    if split > 1:
        ws = torch.empty((split, m, n), device=a8.device, dtype=torch.float32)
        cnt = _tile_counters(a8.device, tiles)
    else:
        ws, cnt = y, gw
    interp = _interpreting()
    _w2a2_kernel[(tiles, split)](
        a, ga, words, sbytes, gw, bias if bias is not None else gw, y, ws, cnt, m, n, gp,
        a.stride(0), words.stride(0), sbytes.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, PAIRS=cfg["PAIRS"], UPCAST=interp, IMPRECISE=cfg["IMPRECISE"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_G=cfg["BLOCK_G"], GROUP_N=cfg["GROUP_N"],
        SPLIT_K=split, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def w2a2_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, w_global: torch.Tensor,
                bias: torch.Tensor | None = None, split_index: torch.Tensor | None = None,
                split_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                path: str | None = None, hadamard: bool = False, clip: float = 1.0, **config) -> torch.Tensor:
    """``torch.ops.lowbit.qlinear`` for 2-bit int-grid weights and activations (groups of 16,
    E4M3 scales): the prologue (:func:`act_quant`, optionally with the online Hadamard and
    gathering split channels) then the FP8 GEMM (:func:`w2a2_gemm`). ``x`` [..., K]; output
    [..., N] in x's dtype (or ``out_dtype``); ``clip``: the activation clip ratio."""
    n, gp = w_scales.shape
    lead = x.shape[:-1]
    a8, _, ga = act_quant(x, 2, "int", gp * 16, split_index, split_scale, fp8_values=True, hadamard=hadamard,
                          clip=clip)
    a8 = a8.reshape(-1, gp * 16)
    out_dtype = out_dtype or x.dtype
    if a8.shape[0] == 0:
        return x.new_empty((*lead, n), dtype=out_dtype)
    y = w2a2_gemm(a8, ga, w_packed, w_scales, w_global, bias, out_dtype, path or default_path(a8), **config)
    return y.reshape(*lead, n)


def default_path(a8: torch.Tensor) -> str:
    """"fused" up to 16 rows; above, "scaled_mm" where row-wise ``torch._scaled_mm`` runs (compute
    capability 9.0), which measured 1.54x cuBLAS bf16 at M=4096, K=N=8192 on an H200 against
    0.74x for the best fused tile (GEMM alone; with the prologue and fast accumulation 1.55x,
    :data:`SCALED_MM_FAST_ACCUM_MAX_K`; docs/benchmarks.md)."""
    if a8.shape[0] <= SKINNY_MAX_M or not a8.is_cuda or torch.cuda.get_device_capability(a8.device) < (9, 0):
        return "fused"
    return "scaled_mm"
