"""Triton kernels for W2A16 linears: ``y = x @ dequant(W)^T (+ bias)``.

Operands (the layout of :mod:`lowbit.formats`, nothing repacked):

* ``x``: bf16 or fp16 ``[M, K]`` (any leading dims are flattened into M);
* ``W``: 2-bit two's complement codes packed four per byte along K, the element with the
  lowest index in the lowest bits, uint8 ``[N, Kp/4]`` (``Kp >= K``, a multiple of 16);
* group scales: FP8 E4M3 (``torch.float8_e4m3fn``) ``[N, Kp/16]``, one per group of 16
  consecutive elements of a row; one fp32 global scale (a 0-d tensor);
* optional bias ``[N]`` (any float dtype, added in fp32).

The value of code ``q`` of group ``g`` in row ``n`` is ``(q + h) * e4m3(S[n, g]) * global``
with ``h = 0`` on the ``int`` grid and ``h = 1/2`` on the ``half`` grid, and the kernels
compute ``y[m, n] = sum_k x[m, k] * value[n, k] + bias[n]`` for ``k < K = x.shape[-1]``,
accumulating in fp32 and rounding once to the output dtype (x's by default).

Exact dequantization
--------------------
A group of 16 codes is one little-endian 32-bit word (code ``i`` in bits ``2i, 2i+1``), so
the kernels read W as int32 ``[N, Kp/16]``, aligned with the scales. After ``w ^= 0xAAAAAAAA``
(which flips the high bit of every code) a field ``f`` in {0, 1, 2, 3} holds ``q + 2``. A
shift moves a field into the top bits of a float's mantissa and one AND-OR (a single LOP3)
adds an exponent, which makes the float ``c + f`` (``c`` a power of two) or ``c (1 + f/c)``
without any int-to-float conversion; then ``q + h = (c + f) - (c + 2 - h)``.

* Tensor-core kernel (``_pair_asm_*``, inline PTX): codes i and i+8 of a word are 16 bits
  apart, so after one shift a LOP3 builds the bf16x2 (f16x2) pair ``4 + f`` and one
  ``fma.rn.bf16x2`` gives ``(4 + f) s - (6 - h) s = (q + h) s`` for both. Every number involved
  is exact in bf16 and fp16: an E4M3 scale has 4 significant bits, ``4 + f`` 3, ``6 - h`` 4, so
  ``(4 + f) s`` and ``(6 - h) s`` fit in 8 bits and the FMA rounds an exactly representable
  result; magnitudes stay within ``2 * 448`` and above ``2^-10``. The tensor-core products of
  these values with bf16/fp16 x are exact, so only the fp32 accumulation rounds. The global
  scale multiplies the fp32 accumulator at the end. Without inline PTX (Triton's interpreter,
  ``ASM=False``) ``_dequant_field`` computes the same value in fp32 (``fma(fv, c s, -(c+2-h) s)``,
  exact for the same reason) and casts it (exactly) to x's dtype.
* CUDA-core GEMV (``_gemv_field``): ``sum_i (q_i + h) x_i = sum_i (c_i + f_i) x_i -
  sum_i (c_i + 2 - h) x_i``, one FMA per weight, the second sum computed once per tile of x.
  Up to ``FPS`` fields share one shift (c = 4, 16, 64), which costs ``log2(c)`` of the fp32
  accumulator's 24 bits (at most 6: relative errors ~1e-6).

E4M3 scales are decoded from their bits, exactly: ``fp32_bits = sign << 31 | (b & 0x7F) << 20``
is the E4M3 value times ``2^-120`` for normal and subnormal codes alike (NaN codes, which
formats never produces, are not special-cased).

Paths
-----
* ``skinny`` (M <= 16, the default there) and ``gemm`` (above, where ``dequant`` is not the
  default): one tensor-core kernel, ``_w2a16_dot_kernel``, with tile sizes for each. Swap-AB:
  the dequantized W tile is the wgmma A operand (from registers) and x^T (rows padded to a
  tile) the B operand. The dot
  of code pair i runs over the groups of a tile (the K order of a dot is free) against the
  matching permutation of x, built in registers (``XPERM``) or by ``permute_pairs``. When N has
  too few tiles to fill the GPU, K is split: programs store fp32 partial tiles and the last one
  to arrive sums them in a fixed order (no memset, no cast kernel, deterministic).
* ``dequant`` (CUDA, from ``DEQUANT_MIN_M`` rows on, the default there): ``_w_values_kernel``
  writes the exact W values ``(q + h) * e4m3(S)`` in x's dtype, cuBLAS multiplies with an fp32
  output, and the global scale and bias are applied before one rounding to the output dtype.
  At large M the product is compute-bound and the extra pass over W (2 bytes per weight,
  written once per call) is small against it.
* ``gemv``: CUDA-core FMAs on fp32 products, one program per (block of rows, x row, K split;
  serial split-K as above), x read as bf16 pairs. Slower than ``skinny`` on the H200 at every
  measured shape (1.26-1.5x cuBLAS against 1.5-2.1x); kept for comparison and as a second,
  independent implementation.

Both kernels have an ``EVEN`` form, chosen when N and K fall on whole tiles: no load masks
(x rows beyond M are read through a row index clamped to M - 1 and never stored).

Measurements and the tile sizes' origin: docs/benchmarks.md.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# 0xAAAAAAAA as a signed 32-bit literal: flips bit 1 of every 2-bit field.
_XOR_HIGH_BITS = tl.constexpr(-1431655766)
_ONE_F32_BITS = tl.constexpr(0x3F800000)
_TWO_POW_120 = tl.constexpr(1.329227995784916e36)  # 2**120, exact in fp32


@triton.jit
def _decode_e4m3(b):
    """fp32 value of E4M3 bytes ``b`` (int32 in [0, 255]); exact for every non-NaN code."""
    bits = ((b & 0x80) << 24) | ((b & 0x7F) << 20)
    return bits.to(tl.float32, bitcast=True) * _TWO_POW_120


@triton.jit
def _field(w, i: tl.constexpr, FPS: tl.constexpr):
    """``fv = 1 + f_i * 2^(p-23)`` for field i of the XOR'd words w (see module docstring).

    Fields are taken FPS per shift: the top field T of each run lands in bits 21-22, the
    ones below it in 19-20 and 17-18, so ``c = 2^(23-p) = 4 * 4^(T-i)``.
    """
    T: tl.constexpr = 15 - ((15 - i) // FPS) * FPS
    SH: tl.constexpr = 21 - 2 * T
    P: tl.constexpr = 21 - 2 * (T - i)
    if SH > 0:
        u = w << SH
    elif SH < 0:
        u = w >> (-SH)
    else:
        u = w
    return ((u & (3 << P)) | _ONE_F32_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _dequant_field(w, s, i: tl.constexpr, FPS: tl.constexpr, HALF: tl.constexpr):
    """fp32 ``(q_i + h) * s`` for field i of XOR'd words w and decoded scales s (exact)."""
    T: tl.constexpr = 15 - ((15 - i) // FPS) * FPS
    C: tl.constexpr = 4 << (2 * (T - i))
    OFF: tl.constexpr = C + 2 - 0.5 * HALF
    fv = _field(w, i, FPS)
    return fv * (s * C) - s * OFF


# ----------------------------------------------------------------------------------------
# GEMV on CUDA cores (M small)
# ----------------------------------------------------------------------------------------

@triton.jit
def _gemv_field(w, xi, i: tl.constexpr, FPS: tl.constexpr, HALF: tl.constexpr):
    """(fvc_i * x_i, (c_i + 2 - h) x_i) for field i: the float ``fvc = c + f`` is built with the
    exponent of ``c = 2^(23-p)`` instead of 1 (same mantissa), so x needs no scaling."""
    T: tl.constexpr = 15 - ((15 - i) // FPS) * FPS
    SH: tl.constexpr = 21 - 2 * T
    P: tl.constexpr = 21 - 2 * (T - i)
    C: tl.constexpr = 4 << (2 * (T - i))
    EXP: tl.constexpr = (127 + 23 - P) << 23
    if SH > 0:
        u = w << SH
    elif SH < 0:
        u = w >> (-SH)
    else:
        u = w
    fvc = ((u & (3 << P)) | EXP).to(tl.float32, bitcast=True)
    return fvc * xi[None, :], xi * (C + 2 - 0.5 * HALF)


@triton.jit
def _x_field(x_row, x32_row, g, i: tl.constexpr, K, EVEN: tl.constexpr, PAIRS: tl.constexpr):
    """fp32 ``x[16 g + i]`` (zero beyond K). With ``PAIRS`` (bf16 x, ``EVEN``) the even field's
    load brings its odd neighbour in the same 32-bit word: returns (x_i, x_{i+1}) from one load,
    widened by a shift and a mask (a bf16 is the top half of its fp32)."""
    if PAIRS:
        v = tl.load(x32_row + g * 8 + i // 2)
        lo = (v << 16).to(tl.float32, bitcast=True)
        hi = (v & -65536).to(tl.float32, bitcast=True)
        return lo, hi
    k = g * 16 + i
    if EVEN:
        xi = tl.load(x_row + k).to(tl.float32)
    else:
        xi = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
    return xi, xi


@triton.jit
def _gemv_tile(w_rows, s_rows, g, n_mask, GX, g_end, EVEN: tl.constexpr):
    """Words and scale bytes of groups g (zeros from ``g_end`` on: a split's last tile
    prefetches nothing, and a split may get no tile). With ``EVEN`` the mask is uniform over
    the tile's BLOCK_G groups (g_end is a multiple of BLOCK_G), so the loads stay vectorized."""
    if EVEN:
        mask = (g < g_end)[None, :]
    else:
        mask = n_mask[:, None] & (g < tl.minimum(GX, g_end))[None, :]
    return (tl.load(w_rows + g[None, :], mask=mask, other=0),
            tl.load(s_rows + g[None, :], mask=mask, other=0))


@triton.jit
def _w2a16_gemv_kernel(
    x_ptr, w_ptr, s_ptr, g_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, GX,
    stride_xm, stride_wn, stride_sn, stride_ym,
    HALF: tl.constexpr, HAS_BIAS: tl.constexpr, FPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr,
    PAIRS: tl.constexpr,
):
    """One program: rows [pid_n*BLOCK_N, +BLOCK_N) of W against row m of x, over a 1/SPLIT_K
    share of the ``GX = cdiv(K, 16)`` groups (partial sums reduced serially: the last program
    of a row block to arrive adds them in a fixed order and writes y).

    Per tile of BLOCK_G groups: part[n, g] = sum_i (c_i + f_i[n, g]) x[16g+i] (one FMA per
    weight), then acc[n, g] += (part - sum_i (c_i + 2 - h) x[16g+i]) * s[n, g]; finally
    y[m, n] = global * sum_g acc[n, g] + bias[n]. The next tile's words and scales are loaded
    before the current one is used (register double buffering). ``EVEN`` (N a multiple of
    BLOCK_N, K of 16*BLOCK_G): no per-element masks (only one uniform over a tile), so the loads
    are vectorized.
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_g = tl.arange(0, BLOCK_G)
    tiles = tl.cdiv(GX, BLOCK_G)
    per_split = tl.cdiv(tiles, SPLIT_K)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, tiles)
    x_row = x_ptr + m * stride_xm
    x32_row = x_ptr.to(tl.pointer_type(tl.int32)) + m * (stride_xm // 2)
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    s_rows = s_ptr + offs_n[:, None] * stride_sn
    acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    g = t_lo * BLOCK_G + offs_g
    w_next, s_next = _gemv_tile(w_rows, s_rows, g, n_mask, GX, t_hi * BLOCK_G, EVEN)
    for t in range(t_lo, t_hi):
        w = w_next ^ _XOR_HIGH_BITS
        s = _decode_e4m3(s_next.to(tl.int32))
        gn = g + BLOCK_G
        w_next, s_next = _gemv_tile(w_rows, s_rows, gn, n_mask, GX, t_hi * BLOCK_G, EVEN)
        xoff = tl.zeros([BLOCK_G], dtype=tl.float32)
        part = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
        for j in tl.static_range(8):
            x_even, x_odd = _x_field(x_row, x32_row, g, 2 * j, K, EVEN, PAIRS)
            if not PAIRS:
                x_odd, _ = _x_field(x_row, x32_row, g, 2 * j + 1, K, EVEN, PAIRS)
            prod, xo = _gemv_field(w, x_even, 2 * j, FPS, HALF)
            part += prod
            xoff += xo
            prod, xo = _gemv_field(w, x_odd, 2 * j + 1, FPS, HALF)
            part += prod
            xoff += xo
        acc += (part - xoff[None, :]) * s
        g = gn
    y = tl.sum(acc, axis=1) * tl.load(g_ptr)
    if SPLIT_K > 1:
        offs_m = m + tl.arange(0, 1)
        ymask = n_mask[:, None] & (offs_m < M)[None, :]
        last, total = _split_k_total(y[:, None], ws_ptr, cnt_ptr, pid_k, pid_n, m, M, offs_n, offs_m, ymask, M, N,
                                     SPLIT_K, BLOCK_N, 1)
        if last:
            _store_tile(total, b_ptr, y_ptr, offs_n, offs_m, n_mask, ymask, stride_ym, HAS_BIAS)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


# ----------------------------------------------------------------------------------------
# tensor-core path (skinny and GEMM): acc[n, m] = sum_i dot(P_i[n, 2g + j], xp_i[m, 2g + j]^T)
# ----------------------------------------------------------------------------------------

@triton.jit
def _pair_asm_bf16(u, s1, soff):
    """bf16x2 {(q_i + h) s, (q_{i+8} + h) s} from a word u shifted so that fields i and i+8
    sit in bits 5-6 and 21-22: one LOP3 builds the two bf16 ``4 + f`` (exponent of 4, f in the
    top mantissa bits) and one bf16x2 FMA gives ``(4 + f) s - (6 - h) s`` (exact: see the
    module docstring; ``s`` and ``(6 - h) s`` are exact bf16 values)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, c, d, r;
        lop3.b32 t, $2, 0x00600060, 0x40804080, 0xEA;
        mov.b32 c, {$3, $3};
        mov.b32 d, {$4, $4};
        fma.rn.bf16x2 r, t, c, d;
        mov.b32 {$0, $1}, r;
        }""",
        constraints="=h,=h,r,h,h", args=[u, s1, soff], dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True, pack=1)


@triton.jit
def _pair_asm_fp16(u, s1, soff):
    """fp16 version of :func:`_pair_asm_bf16` (fields in bits 8-9 and 24-25)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, c, d, r;
        lop3.b32 t, $2, 0x03000300, 0x44004400, 0xEA;
        mov.b32 c, {$3, $3};
        mov.b32 d, {$4, $4};
        fma.rn.f16x2 r, t, c, d;
        mov.b32 {$0, $1}, r;
        }""",
        constraints="=h,=h,r,h,h", args=[u, s1, soff], dtype=(tl.float16, tl.float16),
        is_pure=True, pack=1)


@triton.jit
def _dequant_pair3(w, s, s1, soff, i: tl.constexpr, HALF: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """[BLOCK_N, BLOCK_G, 2] tile whose element [n, g, j] holds the value of code i + 8j of
    group g (fields i and i + 8 of a word are 16 bits apart: one 32-bit lane of packed math)."""
    if ASM:
        if DT == tl.bfloat16:
            SH: tl.constexpr = 2 * i - 5
        else:
            SH: tl.constexpr = 2 * i - 8
        if SH > 0:
            u = w >> SH
        elif SH < 0:
            u = w << (-SH)
        else:
            u = w
        if DT == tl.bfloat16:
            lo, hi = _pair_asm_bf16(u, s1, soff)
        else:
            lo, hi = _pair_asm_fp16(u, s1, soff)
    else:
        lo = _dequant_field(w, s, i, 1, HALF).to(DT)
        hi = _dequant_field(w, s, i + 8, 1, HALF).to(DT)
    return tl.join(lo, hi)


@triton.jit
def _dequant_pair(w, s, s1, soff, i: tl.constexpr, HALF: tl.constexpr, DT: tl.constexpr,
                  ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """[BLOCK_N, 2*BLOCK_G] tile whose column 2g + j holds the value of code i + 8j of group g."""
    return tl.reshape(_dequant_pair3(w, s, s1, soff, i, HALF, DT, ASM), [BLOCK_N, 2 * BLOCK_G])


@triton.jit
def _x_pairs(xt, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """The 8 B-operand tiles of a natural x tile [BLOCK_M, 16*BLOCK_G]: tile i holds
    x[m, 16g + i + 8j] in column 2g + j (the in-register form of ``permute_pairs``)."""
    r = tl.reshape(xt, [BLOCK_M, BLOCK_G, 2, 2, 2, 2])  # dims (m, g, j, a, b, c), i = 4a + 2b + c
    e0, e1 = tl.split(r)
    e00, e01 = tl.split(e0)
    e10, e11 = tl.split(e1)
    e000, e001 = tl.split(e00)
    e010, e011 = tl.split(e01)
    e100, e101 = tl.split(e10)
    e110, e111 = tl.split(e11)
    shape: tl.constexpr = [BLOCK_M, 2 * BLOCK_G]
    # e{c}{b}{a} holds i = 4a + 2b + c
    return (tl.reshape(e000, shape), tl.reshape(e100, shape), tl.reshape(e010, shape), tl.reshape(e110, shape),
            tl.reshape(e001, shape), tl.reshape(e101, shape), tl.reshape(e011, shape), tl.reshape(e111, shape))


@triton.jit
def _pair_dot(acc, w, s, s1, soff, xi, i: tl.constexpr, HALF: tl.constexpr, DT: tl.constexpr,
              ASM: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """acc + P_i @ xi^T, P_i the [BLOCK_N, 2*BLOCK_G] code-pair tile i of W."""
    a = _dequant_pair(w, s, s1, soff, i, HALF, DT, ASM, BLOCK_N, BLOCK_G)
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), tl.trans(xi).to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(xi), acc)


@triton.jit
def _tile_dot(acc, w, s, s1, soff, xt, HALF: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr,
              UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """acc + (the whole dequantized tile) @ x tile^T as ONE product over K = 16*BLOCK_G.

    The eight code-pair tiles are joined (each join adds a register dimension) into
    A[n, 16g + 8a + 4b + 2c + j] = value of code 4a + 2b + c + 8j of group g (the two halves of
    a packed bf16x2 pair adjacent along K), and the natural x tile [BLOCK_M, 16*BLOCK_G] is
    permuted to the same K order on its way to the B operand. One dot instead of eight: one
    wait for the tensor cores per tile, not one per code pair."""
    p0 = _dequant_pair3(w, s, s1, soff, 0, HALF, DT, ASM)
    p1 = _dequant_pair3(w, s, s1, soff, 1, HALF, DT, ASM)
    p2 = _dequant_pair3(w, s, s1, soff, 2, HALF, DT, ASM)
    p3 = _dequant_pair3(w, s, s1, soff, 3, HALF, DT, ASM)
    p4 = _dequant_pair3(w, s, s1, soff, 4, HALF, DT, ASM)
    p5 = _dequant_pair3(w, s, s1, soff, 5, HALF, DT, ASM)
    p6 = _dequant_pair3(w, s, s1, soff, 6, HALF, DT, ASM)
    p7 = _dequant_pair3(w, s, s1, soff, 7, HALF, DT, ASM)
    return _joined_pairs_dot(acc, p0, p1, p2, p3, p4, p5, p6, p7, xt, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_G)


@triton.jit
def _joined_pairs_dot(acc, p0, p1, p2, p3, p4, p5, p6, p7, xt, UPCAST_DOT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """acc + A @ xp^T, one product: ``p_i`` are [BLOCK_N, BLOCK_G, 2] tiles holding code/element
    i + 8j of each group of 16 (j = 0, 1), joined into A[n, 16g + 8a + 4b + 2c + j] (i = 4a + 2b
    + c); the x tile [BLOCK_M, 16*BLOCK_G] is permuted to the same K order."""
    # dims (n, g, j, c, b, a): code i = 4a + 2b + c; reordered to (n, g, a, b, c, j) so that the
    # two codes of a packed pair (j = 0, 1) stay adjacent along K
    b0 = tl.join(tl.join(p0, p1), tl.join(p2, p3))
    b1 = tl.join(tl.join(p4, p5), tl.join(p6, p7))
    a = tl.reshape(tl.permute(tl.join(b0, b1), (0, 1, 5, 4, 3, 2)), [BLOCK_N, 16 * BLOCK_G])
    xr = tl.reshape(xt, [BLOCK_M, BLOCK_G, 2, 2, 2, 2])  # dims (m, g, j, a, b, c)
    xp = tl.reshape(tl.permute(xr, (0, 1, 3, 4, 5, 2)), [BLOCK_M, 16 * BLOCK_G])
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), tl.trans(xp).to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(xp), acc)


@triton.jit
def _store_tile(acc, b_ptr, y_ptr, offs_n, offs_m, n_mask, ymask, stride_ym, HAS_BIAS: tl.constexpr):
    """y[m, n] = acc[n, m] + bias[n], in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def _split_k_total(acc, ws_ptr, cnt_ptr, pid_k, pid_n, pid_m, num_m, offs_n, offs_m, ymask, M, N,
                   SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Serial split-K: every program stores its fp32 partial tile; the last one to arrive
    (counted by an acq_rel atomic on a per-tile counter) sums them in a fixed order and
    resets the counter for the next launch. Returns (last, total): ``total`` is the sum in
    the last program (zeros elsewhere), which alone writes y."""
    tile = pid_n * num_m + pid_m
    tile_mn = offs_m[None, :] * N + offs_n[:, None]
    tl.store(ws_ptr + pid_k * M * N + tile_mn, acc, mask=ymask)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if last:
        for kk in tl.static_range(SPLIT_K):
            total += tl.load(ws_ptr + kk * M * N + tile_mn, mask=ymask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile, 0)
    return last, total


@triton.jit
def _x_tile(x_ptr, x_rows, k, stride_xm, K, EVEN: tl.constexpr):
    """x[x_rows, k] (zero for k >= K unless ``EVEN``, where every k is in range)."""
    ptrs = x_ptr + x_rows[:, None] * stride_xm + k[None, :]
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(k < K)[None, :], other=0.0)


@triton.jit
def _w2a16_dot_kernel(
    x_ptr, w_ptr, s_ptr, g_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, GX, GP,
    stride_xi, stride_xm, stride_wn, stride_sn, stride_ym,
    HALF: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr, XPERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    GROUP_N: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST_DOT: tl.constexpr, ONE_DOT: tl.constexpr = False,
    EVEN: tl.constexpr = False,
):
    """Swap-AB tensor-core product over ``GX = cdiv(K, 16)`` groups of 16.

    The A operand of dot i (i < 8) is the tile of code pairs (i, i+8) of W (``_dequant_pair``),
    the B operand the matching tile of x^T: ``xp[i, m, 2g + j] = x[m, 16g + i + 8j]``. With
    ``XPERM`` the kernel reads natural x [M, K] and permutes tiles in registers (``_x_pairs``);
    otherwise ``x_ptr`` is ``permute_pairs(x)`` [8, M, 2*GX]. acc[n, m] (fp32) * global + bias
    goes to y[m, n]. With SPLIT_K > 1, ``ws`` (fp32 [SPLIT_K, M, N]) holds partial sums and
    ``cnt`` (int32, one zero per output tile, left at zero) counts arrivals. ``UPCAST_DOT``
    (Triton's CPU interpreter only, whose bf16 dot is wrong) multiplies the exactly upcast
    fp32 operands instead. ``ONE_DOT`` (needs ``XPERM``): one product per tile over all 16
    codes of each group (``_tile_dot``) instead of eight pair products (2x slower on the H200:
    docs/benchmarks.md). ``EVEN`` (N a multiple of BLOCK_N, K of 16*BLOCK_G, x read in natural
    order): no load masks, so the loads are vectorized. x rows are always read through a row
    index clamped to M - 1 (padding rows repeat the last row and are never stored), so only
    the K bound can mask an x load.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_N * num_m
    first_n = (pid // width) * GROUP_N
    rows = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % width) % rows
    pid_m = (pid % width) // rows
    DT: tl.constexpr = x_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    x_rows = tl.minimum(offs_m, M - 1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_c = tl.arange(0, 2 * BLOCK_G)
    offs_k = tl.arange(0, 16 * BLOCK_G)
    tiles = tl.cdiv(GX, BLOCK_G)
    per_split = tl.cdiv(tiles, SPLIT_K)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, tiles)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for t in range(t_lo, t_hi):
        g = t * BLOCK_G + offs_g
        if EVEN:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + g[None, :])
            sb = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :])
        else:
            wmask = n_mask[:, None] & (g < GX)[None, :]
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + g[None, :], mask=wmask, other=0)
            sb = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=wmask, other=0)
        s = _decode_e4m3(sb.to(tl.int32))
        w = w ^ _XOR_HIGH_BITS
        s1 = s.to(DT)
        soff = (s * (0.5 * HALF - 6.0)).to(DT)
        if ONE_DOT:
            k = t * 16 * BLOCK_G + offs_k
            xt = _x_tile(x_ptr, x_rows, k, stride_xm, K, EVEN)
            acc = _tile_dot(acc, w, s, s1, soff, xt, HALF, DT, ASM, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_G)
        else:
            if XPERM:
                k = t * 16 * BLOCK_G + offs_k
                xt = _x_tile(x_ptr, x_rows, k, stride_xm, K, EVEN)
                x0, x1, x2, x3, x4, x5, x6, x7 = _x_pairs(xt, BLOCK_M, BLOCK_G)
            else:
                c = t * 2 * BLOCK_G + offs_c
                xp = x_ptr + x_rows[:, None] * stride_xm + c[None, :]
                xmask = (c < 2 * GX)[None, :]
                x0 = tl.load(xp, mask=xmask, other=0.0)
                x1 = tl.load(xp + stride_xi, mask=xmask, other=0.0)
                x2 = tl.load(xp + 2 * stride_xi, mask=xmask, other=0.0)
                x3 = tl.load(xp + 3 * stride_xi, mask=xmask, other=0.0)
                x4 = tl.load(xp + 4 * stride_xi, mask=xmask, other=0.0)
                x5 = tl.load(xp + 5 * stride_xi, mask=xmask, other=0.0)
                x6 = tl.load(xp + 6 * stride_xi, mask=xmask, other=0.0)
                x7 = tl.load(xp + 7 * stride_xi, mask=xmask, other=0.0)
            acc = _pair_dot(acc, w, s, s1, soff, x0, 0, HALF, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_G)
            acc = _pair_dot(acc, w, s, s1, soff, x1, 1, HALF, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_G)
            acc = _pair_dot(acc, w, s, s1, soff, x2, 2, HALF, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_G)
            acc = _pair_dot(acc, w, s, s1, soff, x3, 3, HALF, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_G)
            acc = _pair_dot(acc, w, s, s1, soff, x4, 4, HALF, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_G)
            acc = _pair_dot(acc, w, s, s1, soff, x5, 5, HALF, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_G)
            acc = _pair_dot(acc, w, s, s1, soff, x6, 6, HALF, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_G)
            acc = _pair_dot(acc, w, s, s1, soff, x7, 7, HALF, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_G)
    acc = acc * tl.load(g_ptr)
    ymask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K > 1:
        last, total = _split_k_total(acc, ws_ptr, cnt_ptr, pid_k, pid_n, pid_m, num_m, offs_n, offs_m, ymask, M, N,
                                     SPLIT_K, BLOCK_N, BLOCK_M)
        if last:
            _store_tile(total, b_ptr, y_ptr, offs_n, offs_m, n_mask, ymask, stride_ym, HAS_BIAS)
    else:
        _store_tile(acc, b_ptr, y_ptr, offs_n, offs_m, n_mask, ymask, stride_ym, HAS_BIAS)


# ----------------------------------------------------------------------------------------
# dequantized W for cuBLAS (large M)
# ----------------------------------------------------------------------------------------

@triton.jit
def _natural_tile(w, s, HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """fp32 [BLOCK_N, 16*BLOCK_G] values (q + h) * s of the XOR'd words w, in natural column order."""
    a0 = tl.join(_dequant_field(w, s, 0, 1, HALF), _dequant_field(w, s, 8, 1, HALF))
    a1 = tl.join(_dequant_field(w, s, 1, 1, HALF), _dequant_field(w, s, 9, 1, HALF))
    a2 = tl.join(_dequant_field(w, s, 2, 1, HALF), _dequant_field(w, s, 10, 1, HALF))
    a3 = tl.join(_dequant_field(w, s, 3, 1, HALF), _dequant_field(w, s, 11, 1, HALF))
    a4 = tl.join(_dequant_field(w, s, 4, 1, HALF), _dequant_field(w, s, 12, 1, HALF))
    a5 = tl.join(_dequant_field(w, s, 5, 1, HALF), _dequant_field(w, s, 13, 1, HALF))
    a6 = tl.join(_dequant_field(w, s, 6, 1, HALF), _dequant_field(w, s, 14, 1, HALF))
    a7 = tl.join(_dequant_field(w, s, 7, 1, HALF), _dequant_field(w, s, 15, 1, HALF))
    b0 = tl.join(a0, a4)
    b1 = tl.join(a1, a5)
    b2 = tl.join(a2, a6)
    b3 = tl.join(a3, a7)
    c0 = tl.join(b0, b2)
    c1 = tl.join(b1, b3)
    d = tl.join(c0, c1)  # [BN, BG, j, l, m, n] holds code n + 2m + 4l + 8j
    return tl.reshape(d, [BLOCK_N, 16 * BLOCK_G])


@triton.jit
def _w_values_kernel(w_ptr, s_ptr, out_ptr, N, GP, stride_wn, stride_sn, stride_on,
                     HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """W values ``(q + h) * e4m3(S)`` [N, 16*GP] in out's dtype (bf16/fp16/fp32: exact, see the
    module docstring), natural order; the global scale is left out."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    mask = (offs_n < N)[:, None] & (g < GP)[None, :]
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + g[None, :], mask=mask, other=0) ^ _XOR_HIGH_BITS
    s = _decode_e4m3(tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=mask, other=0).to(tl.int32))
    v = _natural_tile(w, s, HALF, BLOCK_N, BLOCK_G)
    k = tl.program_id(1) * 16 * BLOCK_G + tl.arange(0, 16 * BLOCK_G)
    tl.store(out_ptr + offs_n[:, None] * stride_on + k[None, :], v.to(out_ptr.dtype.element_ty),
             mask=(offs_n < N)[:, None] & (k < 16 * GP)[None, :])


def weight_values(w_packed: torch.Tensor, w_scales: torch.Tensor, grid: str = "int",
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(q + h) * e4m3(S)`` of a packed 2-bit weight as a [N, Kp] tensor of ``dtype`` (bf16,
    fp16 or fp32; exact in all three), without the global scale."""
    n, gp = w_scales.shape
    words = _words(w_packed)
    out = torch.empty((n, gp * 16), device=w_packed.device, dtype=dtype)
    bn, bg = 64, 8
    _w_values_kernel[(_cdiv(n, bn), _cdiv(gp, bg))](
        words, w_scales.view(torch.uint8), out, n, gp, words.stride(0), w_scales.stride(0), out.stride(0),
        HALF=grid == "half", BLOCK_N=bn, BLOCK_G=bg, num_warps=4)
    return out


def _dequant_matmul(x2: torch.Tensor, w_packed, w_scales, g, bias, grid: str, out_dtype) -> torch.Tensor:
    """The "dequant" path: W values in x's dtype (exact), one cuBLAS product with fp32 output
    (``torch.mm(..., out_dtype=torch.float32)`` on CUDA; an fp32 product of the same exact
    operands elsewhere), then ``* global + bias`` and one rounding to ``out_dtype``."""
    k = x2.shape[1]
    wv = weight_values(w_packed, w_scales, grid, x2.dtype)[:, :k]
    acc = None
    if x2.is_cuda:
        try:
            acc = torch.mm(x2, wv.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a PyTorch without mm's out_dtype
            acc = None
    if acc is None:
        acc = x2.float() @ wv.float().t()
    acc = acc * g
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


# ----------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------

PATHS = ("gemv", "skinny", "gemm", "dequant")
SKINNY_MAX_M = 16
DEQUANT_MIN_M = 17  # measured at M = 64, 256, 2048, 4096 on the H200: "dequant" 1.6-2x faster than "gemm"
_TARGET_PROGRAMS = 256  # about two programs per SM of an H100 (measured best for the skinny path)

_DEFAULTS = {
    "gemv": dict(BLOCK_N=32, BLOCK_G=32, FPS=3, SPLIT_K=0, num_warps=4, num_stages=1),
    "skinny": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_G=32, GROUP_N=1, SPLIT_K=0, ASM=True, XPERM=True,
                   num_warps=8, num_stages=3),
    "gemm": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_G=8, GROUP_N=8, SPLIT_K=1, ASM=True, XPERM=True,
                 num_warps=8, num_stages=3),
    "dequant": dict(),
}


def default_path(m: int, cuda: bool = True) -> str:
    """"skinny" (tensor cores, x padded to 16 rows) up to 16 rows; "gemm" above, or on CUDA from
    ``DEQUANT_MIN_M`` rows on "dequant" (W values to x's dtype, then cuBLAS), which beats the
    fused GEMM there (H200, docs/benchmarks.md). The CUDA-core "gemv" path is slower than
    "skinny" at every measured shape."""
    if m <= SKINNY_MAX_M:
        return "skinny"
    return "dequant" if cuda and m >= DEQUANT_MIN_M else "gemm"


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil division (``triton.cdiv`` goes through Triton's function machinery, which
    costs microseconds on every launch)."""
    return -(-a // b)


def default_config(path: str, m: int, n: int, k: int) -> dict:
    """Tile sizes for a problem, from the H100 measurements in docs/benchmarks.md.

    ``SPLIT_K=0`` means automatic: split K so that about two programs per SM run (fewer N
    tiles than that leave the GPU idle: N=4096 has only 32 tiles of 128 rows).
    """
    return dict(_default_config(path, m, n, k))


@functools.lru_cache(maxsize=4096)
def _default_config(path: str, m: int, n: int, k: int) -> tuple:
    cfg = dict(_DEFAULTS[path])
    if cfg.get("SPLIT_K") == 0:
        tiles = _cdiv(n, cfg["BLOCK_N"]) * (m if path == "gemv" else 1)
        groups = _cdiv(k, 16)
        max_split = max(1, _cdiv(groups, cfg["BLOCK_G"]))  # at least one tile of K per split
        cfg["SPLIT_K"] = max(1, min(8 if path == "skinny" else 32, max_split, round(_TARGET_PROGRAMS / tiles)))
    return tuple(cfg.items())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


def _words(w_packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, Kp/4] -> int32 [N, Kp/16] view (one word = one group of 16 codes)."""
    if w_packed.stride(-1) != 1 or w_packed.stride(0) % 4 or w_packed.storage_offset() % 4 \
            or w_packed.data_ptr() % 4:
        w_packed = w_packed.contiguous()
    return w_packed.view(torch.int32)


_COUNTERS: dict = {}


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Per-device int32 arrival counters of the serial split-K reduction. They start at zero and
    every launch leaves them at zero, so one buffer serves all launches (and CUDA graph
    replays) issued in stream order; launches that overlap on several streams would need
    buffers of their own."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < tiles:
        buf = torch.zeros(max(tiles, 1024), device=device, dtype=torch.int32)
        _COUNTERS[key] = buf
    return buf


def permute_pairs(x2: torch.Tensor) -> torch.Tensor:
    """``xp[i, m, 2g + j] = x[m, 16g + i + 8j]`` ([8, M, 2G], x zero-padded to 16G columns):
    the B operands of the tensor-core path (see ``_w2a16_dot_kernel``)."""
    m, k = x2.shape
    gx = _cdiv(k, 16)
    if gx * 16 != k:
        x2 = torch.nn.functional.pad(x2, (0, gx * 16 - k))
    return x2.reshape(m, gx, 2, 8).permute(3, 0, 1, 2).contiguous().view(8, m, 2 * gx)


def w2a16_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    w_global: torch.Tensor,
    bias: torch.Tensor | None = None,
    grid: str = "int",
    path: str | None = None,
    out_dtype: torch.dtype | None = None,
    **config,
) -> torch.Tensor:
    """``x @ dequant(W)^T + bias`` for 2-bit W with E4M3 group-16 scales (module docstring).

    ``x``: bf16/fp16 ``[..., K]``; ``w_packed`` uint8 ``[N, Kp/4]``; ``w_scales``
    ``float8_e4m3fn`` ``[N, Kp/16]``; ``w_global`` fp32 (one element); ``grid``: "int" or
    "half". ``path``: "gemv", "skinny", "gemm", "dequant" or None (by M, :func:`default_path`).
    ``out_dtype``: x's dtype by default (fp32 gives the accumulator itself, for tests). ``config`` overrides tile sizes.
    Tensors may live on the CPU when Triton runs in its interpreter (``TRITON_INTERPRET=1``).
    """
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"w2a16_linear takes bf16 or fp16 activations, got {x.dtype}")
    if grid not in ("int", "half"):
        raise ValueError(f"grid must be 'int' or 'half', got {grid!r}")
    n, gp = w_scales.shape
    if w_packed.shape != (n, gp * 4) or w_packed.dtype != torch.uint8:
        raise ValueError(f"packed weight {tuple(w_packed.shape)} {w_packed.dtype} does not match "
                         f"scales {tuple(w_scales.shape)} (expected uint8 [{n}, {gp * 4}])")
    if w_scales.dtype != torch.float8_e4m3fn:
        raise TypeError(f"w2a16_linear takes E4M3 group scales, got {w_scales.dtype}")
    k = x.shape[-1]
    if k > gp * 16:
        raise ValueError(f"x has {k} features, the weight only {gp * 16}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out_dtype = out_dtype or x.dtype
    if m == 0:
        return x.new_empty((*lead, n), dtype=out_dtype)
    path = path or default_path(m, x.is_cuda)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    cfg = default_config(path, m, n, k)
    cfg.update(config)
    if cfg.get("SPLIT_K", 1) < 1:
        cfg.update(SPLIT_K=default_config(path, m, n, k)["SPLIT_K"])
    if max(m * max(k, n) * max(cfg.get("SPLIT_K", 1), 1), n * gp * 4) >= 2**31:
        raise ValueError("tensors beyond 2^31 elements need 64-bit indexing, which these kernels do not use")
    words = _words(w_packed)
    sbytes = w_scales.view(torch.uint8)
    g = w_global.reshape(1).float()
    has_bias = bias is not None
    b = bias if has_bias else g  # dummy pointer when there is no bias
    half = grid == "half"
    interp = _interpreting()
    if path == "dequant":
        if n * gp * 16 >= 2**31:
            raise ValueError("the dequantized weight would exceed 2^31 elements; use path='gemm'")
        return _dequant_matmul(x2, w_packed, w_scales, g, bias, grid, out_dtype).reshape(*lead, n)
    split = cfg["SPLIT_K"]
    gx = _cdiv(k, 16)
    if path == "gemv":
        y = torch.empty((m, n), device=x.device, dtype=out_dtype)
        bn, bg = cfg["BLOCK_N"], cfg["BLOCK_G"]
        if split > 1:
            ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
            cnt = _tile_counters(x.device, _cdiv(n, bn) * m)
        else:
            ws, cnt = y, g  # unused
        even = n % bn == 0 and k % (16 * bg) == 0
        pairs = even and x2.dtype == torch.bfloat16 and x2.stride(0) % 2 == 0 and x2.data_ptr() % 4 == 0
        _w2a16_gemv_kernel[(_cdiv(n, bn), m, split)](
            x2, words, sbytes, g, b, y, ws, cnt, m, n, k, gx,
            x2.stride(0), words.stride(0), sbytes.stride(0), y.stride(0),
            HALF=half, HAS_BIAS=has_bias, FPS=cfg["FPS"], BLOCK_N=bn, BLOCK_G=bg,
            SPLIT_K=split, EVEN=even, PAIRS=pairs and cfg.get("PAIRS", True),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return y.reshape(*lead, n)
    xperm = cfg["XPERM"]
    xk = x2 if xperm else permute_pairs(x2)
    y = torch.empty((m, n), device=x.device, dtype=out_dtype)
    tiles = _cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"])
    if split > 1:
        ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
        cnt = _tile_counters(x.device, tiles)
    else:
        ws, cnt = y, g  # unused
    _w2a16_dot_kernel[(tiles, split)](
        xk, words, sbytes, g, b, y, ws, cnt, m, n, k, gx, gp,
        0 if xperm else xk.stride(0), xk.stride(-2), words.stride(0), sbytes.stride(0), y.stride(0),
        HALF=half, HAS_BIAS=has_bias, ASM=cfg["ASM"] and not interp, XPERM=xperm,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_G=cfg["BLOCK_G"], GROUP_N=cfg["GROUP_N"],
        SPLIT_K=split, UPCAST_DOT=interp and x.dtype == torch.bfloat16, ONE_DOT=cfg.get("ONE_DOT", False),
        EVEN=cfg.get("EVEN", True) and xperm and n % cfg["BLOCK_N"] == 0 and k % (16 * cfg["BLOCK_G"]) == 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.reshape(*lead, n)
