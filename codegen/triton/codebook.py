"""Triton GEMV for binary codebook linears (``torch.ops.lowbit.codebook_linear``).

The format is :mod:`lowbit.codebook`'s: row n of W is cut into vectors of v = 16 signs, vector
m of row n is codebook entry ``idx[n, m]`` (c-bit indices in a little-endian bitstream per
row), and with per-row scales the value of a weight is ``+-0.5 * stored[n] * global``. So

    y[m_x, n] = 0.5 * stored[n] * global * sum_m  P[m, idx[n, m]] + bias[n],
    P[m, c]   = sum_j sign(codebook[c, j]) * x[m_x, 16 m + j].

Two kernels:

* ``path="decode"`` (``_codebook_decode_kernel``): the W2A16 tensor-core structure with a
  codebook lookup in place of the bit unpacking. Per tile of BLOCK_V vectors of BLOCK_N rows,
  the c-bit indices are read from the bitstream (two aligned int32 words per index, or bytes),
  each index's 16-bit codeword is loaded from the 2^c-entry table (4 KB for c = 11: L1
  resident; or a register copy gathered through shared memory with ``GATHER``), and the
  codewords are expanded into +-1 bf16/fp16 pairs by one shift and one LOP3 per two weights
  (sign bits of elements i and i + 8 moved to bits 15 and 31, OR'ed with the bits of 1.0). The
  +-1 tile is the A operand of a tensor-core product with x (swap-AB, x padded to 16 rows),
  one product per tile (``ONE_DOT``) in the K order of ``lowbit.codegen.triton.w2a16._tile_dot``.
  Exact products, fp32 accumulation; the per-row scale, global scale and bias are applied to
  the accumulator. Split K is reduced serially as in :mod:`.w2a16`.
* ``path="table"`` (``_codebook_table_kernel``): the kernel never expands W. A program owns a
  chunk of R consecutive vectors (16 R columns of K), one row of x and a slice of the row
  blocks; it builds its slice of P once (2^c x R dot products of 16 elements: one tensor-core
  product of the +-1 codebook with x, exact products and fp32 sums), keeps it in shared
  memory, and then loops over its blocks of BLOCK_N rows: per row, the words of the index
  bitstream that hold its R indices (aligned int32 loads, or bytes), the indices cut out at
  positions known at compile time, and R table lookups summed in order in fp32: one load
  from shared memory and about 9.6 instructions per 16 weights (0.6 per weight in the SASS of
  the default configuration, R=16, BLOCK_N=256, 8 warps, compiled by Triton 3.6 for sm_90 with
  the arguments' 16-divisibility as at a real launch; 240 registers, no spills, 128 KB of
  shared memory at c = 11; "decode" needs about 3.8 per weight). Where the table lives
  (``TABLE``): "shared" (the default; written once with ``st.shared`` and read with
  ``ld.shared`` through inline PTX, in shared memory that the kernel reserves from Triton),
  "global" (a scratch slice written once, read through L1) or "gather" (``tl.gather``, which
  stores the table to shared memory again for every block). "shared" takes at most one row
  per thread (BLOCK_N <= 32 * num_warps): with more, Triton's coalescing (given 16-divisible
  arguments) lays the row tensors out with several rows per thread and converts the sums back
  through shared memory at offset 0 inside the lookup loop, over the table; the launcher
  refuses such configurations and checks every compiled kernel's TTGIR for shared-memory ops
  in the loop (``_check_shared_table``).
  Partial sums of the K chunks are reduced serially as in :mod:`.w2a16` (fp32 partials, one
  arrival counter per row block, the last chunk to arrive sums them in chunk order and
  applies the scales and bias): deterministic, no memset. Products are exact; rounding
  happens in the fp32 table sums, the per-row sum of R entries and the fp32 reduction only.

``codebook_gemv(path=None)`` (what ``torch.ops.lowbit.codebook_linear`` runs) takes
``path="gluon"`` (:mod:`.codebook_gluon`: the Gluon W2A16 pipeline with a table lookup in
place of the bit unpacking) for bf16 x of at most 8 rows with K a multiple of 256 and N of 64.
Among the Triton paths it takes "table" for one row of x with K, N >= 8192 and c = 11, where
the H200 measured it faster (34.0 us against 52 for "decode" at K = N = 8192), and "decode"
elsewhere; a table build that the TTGIR guard refuses is recomputed by "decode" (with a
warning).

Bytes per weight: ``c / 16`` of an index (11/16 bit for the ``btc`` preset) plus the row scale:
about 1/23 of bf16 weights.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .w2a16 import _cdiv, _decode_e4m3, _interpreting, _joined_pairs_dot, _split_k_total, _tile_counters, _x_pairs


# ----------------------------------------------------------------------------------------
# "decode" path: expand each vector's codeword to +-1 tiles and multiply on tensor cores
# ----------------------------------------------------------------------------------------

@triton.jit
def _signs_asm_bf16(u):
    """bf16x2 {+-1, +-1} from the sign bits 15 and 31 of u (one LOP3: sign | 0x3F80)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t;
        lop3.b32 t, $2, 0x80008000, 0x3F803F80, 0xEA;
        mov.b32 {$0, $1}, t;
        }""",
        constraints="=h,=h,r", args=[u], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)


@triton.jit
def _signs_asm_fp16(u):
    """fp16x2 {+-1, +-1} from the sign bits 15 and 31 of u (sign | 0x3C00)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t;
        lop3.b32 t, $2, 0x80008000, 0x3C003C00, 0xEA;
        mov.b32 {$0, $1}, t;
        }""",
        constraints="=h,=h,r", args=[u], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)


@triton.jit
def _sign_pair3(cw, cw2, i: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """[BLOCK_N, BLOCK_V, 2] tile whose element [n, v, j] holds the sign (+-1, exact) of element
    i + 8j of vector v. ``cw`` holds the 16-bit codewords (bit e set: element e negative),
    ``cw2`` the same with bits 8-15 moved to 16-23, so elements i and i + 8 sit 16 bits apart."""
    if ASM:
        SH: tl.constexpr = 15 - i
        if DT == tl.bfloat16:
            lo, hi = _signs_asm_bf16(cw2 << SH)
        else:
            lo, hi = _signs_asm_fp16(cw2 << SH)
    else:
        lo = (1.0 - 2.0 * ((cw >> i) & 1).to(tl.float32)).to(DT)
        hi = (1.0 - 2.0 * ((cw >> (i + 8)) & 1).to(tl.float32)).to(DT)
    return tl.join(lo, hi)


@triton.jit
def _sign_pair(cw, cw2, i: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """[BLOCK_N, 2*BLOCK_V] tile: column 2v + j holds the sign of element i + 8j of vector v."""
    return tl.reshape(_sign_pair3(cw, cw2, i, DT, ASM), [BLOCK_N, 2 * BLOCK_V])


@triton.jit
def _sign_tile_dot(acc, cw, cw2, xt, DT: tl.constexpr, ASM: tl.constexpr, UPCAST_DOT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """acc + (all signs of the tile) @ x tile^T as one product over K = 16*BLOCK_V, in the K
    order of ``lowbit.codegen.triton.w2a16._tile_dot`` (column 16v + 8a + 4b + 2c + j holds
    element 4a + 2b + c + 8j of vector v; x permuted to match)."""
    p0 = _sign_pair3(cw, cw2, 0, DT, ASM)
    p1 = _sign_pair3(cw, cw2, 1, DT, ASM)
    p2 = _sign_pair3(cw, cw2, 2, DT, ASM)
    p3 = _sign_pair3(cw, cw2, 3, DT, ASM)
    p4 = _sign_pair3(cw, cw2, 4, DT, ASM)
    p5 = _sign_pair3(cw, cw2, 5, DT, ASM)
    p6 = _sign_pair3(cw, cw2, 6, DT, ASM)
    p7 = _sign_pair3(cw, cw2, 7, DT, ASM)
    return _joined_pairs_dot(acc, p0, p1, p2, p3, p4, p5, p6, p7, xt, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_V)


@triton.jit
def _sign_dot(acc, cw, cw2, xi, i: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr, UPCAST_DOT: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    a = _sign_pair(cw, cw2, i, DT, ASM, BLOCK_N, BLOCK_V)
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), tl.trans(xi).to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(xi), acc)


@triton.jit
def _codebook_decode_kernel(
    x_ptr, idx_ptr, cb_ptr, cb16_ptr, s_ptr, g_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, MV, ROW_BYTES,
    stride_xm, stride_in, stride_ym,
    C_BITS: tl.constexpr, NB: tl.constexpr, WORDS: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ASM: tl.constexpr, UPCAST_DOT: tl.constexpr, ONE_DOT: tl.constexpr,
):
    """Swap-AB tensor-core product over the MV vectors of a row (split K as in
    ``_w2a16_dot_kernel``): per tile of BLOCK_V vectors, the c-bit indices are read from the
    bitstream (``WORDS``: two aligned int32 words per index, else NB bytes), their codewords
    gathered from the 2^c-entry table (``GATHER``: a register copy of the table through
    ``tl.gather``, else 16-bit loads from the table in global memory / L1, ``cb16_ptr``), expanded into eight
    [BLOCK_N, 2*BLOCK_V] tiles of +-1 and multiplied with the matching permutations of x.
    With ``ONE_DOT`` the eight tiles are one product per tile (``_sign_tile_dot``).
    acc (fp32, exact products) * 0.5 * scale[n] * global + bias goes to y."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_n = pid // num_m
    pid_m = pid % num_m
    DT: tl.constexpr = x_ptr.dtype.element_ty
    CB: tl.constexpr = 1 << C_BITS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    offs_v = tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, 16 * BLOCK_V)
    if GATHER:
        offs_c = tl.arange(0, CB)
        table = tl.load(cb_ptr + 2 * offs_c).to(tl.int32) | (tl.load(cb_ptr + 2 * offs_c + 1).to(tl.int32) << 8)
    tiles = tl.cdiv(MV, BLOCK_V)
    per_split = tl.cdiv(tiles, SPLIT_K)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, tiles)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    row_words = ROW_BYTES // 4
    for t in range(t_lo, t_hi):
        vec = t * BLOCK_V + offs_v
        vmask = n_mask[:, None] & (vec < MV)[None, :]
        bitpos = vec * C_BITS
        if WORDS:
            w0 = bitpos >> 5
            sh = (bitpos & 31)[None, :]
            rows = idx_ptr + offs_n[:, None] * stride_in
            lo = tl.load(rows + w0[None, :], mask=vmask, other=0).to(tl.uint32, bitcast=True)
            hi = tl.load(rows + w0[None, :] + 1, mask=vmask & ((w0 + 1) < row_words)[None, :],
                         other=0).to(tl.uint32, bitcast=True)
            raw = (lo >> sh) | ((hi << 1) << (31 - sh))
            idx = (raw & (CB - 1)).to(tl.int32)
        else:
            byte0 = bitpos >> 3
            raw = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.int32)
            for b in tl.static_range(NB):
                ok = vmask & ((byte0 + b) < ROW_BYTES)[None, :]
                byte = tl.load(idx_ptr + offs_n[:, None] * stride_in + (byte0 + b)[None, :], mask=ok, other=0)
                raw |= byte.to(tl.int32) << (8 * b)
            idx = (raw >> (bitpos & 7)[None, :]) & (CB - 1)
        if GATHER:
            cw = tl.reshape(tl.gather(table, tl.reshape(idx, [BLOCK_N * BLOCK_V]), 0), [BLOCK_N, BLOCK_V])
        else:
            cw = tl.load(cb16_ptr + idx).to(tl.int32) & 0xFFFF
        cw = tl.where(vmask, cw, 0)
        cw2 = (cw & 0xFF) | ((cw & 0xFF00) << 8)
        k = t * 16 * BLOCK_V + offs_k
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                     mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
        if ONE_DOT:
            acc = _sign_tile_dot(acc, cw, cw2, xt, DT, ASM, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_V)
        else:
            x0, x1, x2, x3, x4, x5, x6, x7 = _x_pairs(xt, BLOCK_M, BLOCK_V)
            acc = _sign_dot(acc, cw, cw2, x0, 0, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_V)
            acc = _sign_dot(acc, cw, cw2, x1, 1, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_V)
            acc = _sign_dot(acc, cw, cw2, x2, 2, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_V)
            acc = _sign_dot(acc, cw, cw2, x3, 3, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_V)
            acc = _sign_dot(acc, cw, cw2, x4, 4, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_V)
            acc = _sign_dot(acc, cw, cw2, x5, 5, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_V)
            acc = _sign_dot(acc, cw, cw2, x6, 6, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_V)
            acc = _sign_dot(acc, cw, cw2, x7, 7, DT, ASM, UPCAST_DOT, BLOCK_N, BLOCK_V)
    ymask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K > 1:
        last, total = _split_k_total(acc, ws_ptr, cnt_ptr, pid_k, pid_n, pid_m, num_m, offs_n, offs_m, ymask, M, N,
                                     SPLIT_K, BLOCK_N, BLOCK_M)
        if last:
            _store_scaled(total, s_ptr, g_ptr, b_ptr, y_ptr, offs_n, offs_m, n_mask, ymask, stride_ym, HAS_BIAS)
    else:
        _store_scaled(acc, s_ptr, g_ptr, b_ptr, y_ptr, offs_n, offs_m, n_mask, ymask, stride_ym, HAS_BIAS)


@triton.jit
def _store_scaled(acc, s_ptr, g_ptr, b_ptr, y_ptr, offs_n, offs_m, n_mask, ymask, stride_ym, HAS_BIAS: tl.constexpr):
    """y[m, n] = acc[n, m] * 0.5 * scale[n] * global + bias[n], in y's dtype."""
    scale = _decode_e4m3(tl.load(s_ptr + offs_n, mask=n_mask, other=0).to(tl.int32)) * tl.load(g_ptr)
    out = acc * (0.5 * scale)[:, None]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], out.to(y_ptr.dtype.element_ty), mask=ymask)


# ----------------------------------------------------------------------------------------
# "table" path: per K chunk a table of the 2^c codeword dot products, one lookup per index
# ----------------------------------------------------------------------------------------

_TABLE_MODES = {"gather": 0, "global": 1, "shared": 2}


@triton.jit
def _stream_word(i_ptr, wi, ok, TOTAL, LOADS: tl.constexpr):
    """Word ``wi`` (uint32, little-endian) of the index bitstream of all rows (row n from byte
    ``n * ROW_BYTES`` on): an int32 load (``LOADS`` 1, 2; ``TOTAL`` words) or four byte loads
    (``LOADS`` 0; ``TOTAL`` bytes). Where ``ok`` is false or past the end the value is
    unspecified: such bits only ever select table entries that no output uses (see the kernel)."""
    if LOADS == 0:
        w = tl.zeros_like(wi)
        for j in tl.static_range(4):
            b = wi * 4 + j
            w |= tl.load(i_ptr + b, mask=ok & (b < TOTAL), other=0).to(tl.int32) << (8 * j)
    else:
        w = tl.load(i_ptr + wi, mask=ok & (wi < TOTAL))
    return w.to(tl.uint32, bitcast=True)


@triton.jit
def _chunk_words(i_ptr, rows, ok, v0, rot, ROW_BYTES, TOTAL, C_BITS: tl.constexpr, NW: tl.constexpr,
                 LOADS: tl.constexpr):
    """The NW stream words from the one that holds the first bit of vector ``v0`` of each row,
    and that bit's position in it (``sh``, 0..31); NW = ceil((31 + R c) / 32) words hold
    vectors v0 .. v0 + R - 1 whatever ``sh`` is. With ``LOADS`` 2 the i-th load of a row reads
    word (i + rot) mod NW (``rot`` in 0..3 varies across the lanes of a warp, so that the lanes'
    loads spread over more banks: rows ROW_BYTES apart share few of them); ``_align_words``
    puts the words back in order."""
    sb = v0 * C_BITS
    byte = rows * ROW_BYTES + (sb >> 3)
    sh = ((byte & 3) * 8 + (sb & 7)).to(tl.uint32)
    words = ()
    for i in tl.static_range(NW):
        if LOADS == 2:
            k = i + rot
            k = tl.where(k >= NW, k - NW, k)
        else:
            k = i
        words = words + (_stream_word(i_ptr, (byte >> 2) + k, ok, TOTAL, LOADS),)
    return words, sh


@triton.jit
def _rotate_back(words, rot_bit, D: tl.constexpr, NW: tl.constexpr):
    """Where ``rot_bit``: out[j] = words[(j - D) mod NW] (a per-lane select per word)."""
    out = ()
    for j in tl.static_range(NW):
        out = out + (tl.where(rot_bit, words[(j - D + NW) % NW], words[j]),)
    return out


@triton.jit
def _align_words(words, sh, rot, NA: tl.constexpr, NW: tl.constexpr, LOADS: tl.constexpr):
    """``a[i]`` = bits [sh + 32 i, sh + 32 i + 32) of the words (funnel shifts), i < NA =
    ceil(R c / 32): the index of vector v0 + r is then bits [r c, r c + c) of ``a``. With
    ``LOADS`` 2 the words are first rotated back by ``rot`` (two stages of selects)."""
    if LOADS == 2:
        words = _rotate_back(words, (rot & 1) != 0, 1, NW)
        words = _rotate_back(words, (rot & 2) != 0, 2, NW)
    a = ()
    for i in tl.static_range(NA):
        v = words[i] >> sh
        if i + 1 < NW:
            v = v | ((words[i + 1] << 1) << (31 - sh))
        a = a + (v,)
    return a


@triton.jit
def _vector_index(a, r: tl.constexpr, C_BITS: tl.constexpr):
    """Index (int32, < 2^c) of vector v0 + r: bits [r c, r c + c) of the aligned words, at
    positions known at compile time (one or two shifts and a mask)."""
    Q: tl.constexpr = (r * C_BITS) // 32
    S: tl.constexpr = (r * C_BITS) % 32
    v = a[Q] >> S
    if S + C_BITS > 32:
        v = v | (a[Q + 1] << (32 - S))
    return (v & ((1 << C_BITS) - 1)).to(tl.int32)


@triton.jit
def _swizzle(r, SWZ: tl.constexpr):
    """XOR applied to the codeword index in table row r. With ``SWZ`` (2^c >= 32) it moves
    r = 2t, 2t + 1 to the t-th quarter of the banks, so that the table stores from the
    tensor-core accumulator layout (lanes: 8 codewords x 4 column pairs) hit all 32 banks
    once; lookups are random either way and the XOR shares a LOP3 with the row offset."""
    if SWZ:
        return ((r >> 1) & 3) * 8
    return r * 0


@triton.jit
def _chunk_table(x_row, cb16_ptr, v0, K, MV, C_BITS: tl.constexpr, R: tl.constexpr, ASM: tl.constexpr,
                 UPCAST_DOT: tl.constexpr):
    """``P[c, r] = sum_j sign(codeword c, element j) * x[16 (v0 + r) + j]`` as [2^c, R] fp32:
    one tensor-core product of the +-1 codebook with the R vectors of x (exact products, fp32
    sums). K runs in the order 2i + h <-> element i + 8h, so that the signs of elements i and
    i + 8 are one packed pair (one LOP3, as in the decode path) and the +-1 tile is built in
    the registers of the dot operand; x is loaded in that order. Columns of vectors past MV,
    and elements past K, are zero."""
    CB: tl.constexpr = 1 << C_BITS
    DT: tl.constexpr = x_row.dtype.element_ty
    cw = (tl.load(cb16_ptr + tl.arange(0, CB)).to(tl.int32) & 0xFFFF)[:, None]
    i = tl.arange(0, 8)[None, :]
    if ASM:
        u = ((cw & 0xFF) | ((cw & 0xFF00) << 8)) << (15 - i)
        if DT == tl.bfloat16:
            lo, hi = _signs_asm_bf16(u)
        else:
            lo, hi = _signs_asm_fp16(u)
    else:
        lo = (1.0 - 2.0 * ((cw >> i) & 1).to(tl.float32)).to(DT)
        hi = (1.0 - 2.0 * ((cw >> (i + 8)) & 1).to(tl.float32)).to(DT)
    signs = tl.reshape(tl.join(lo, hi), [CB, 16])
    offs_r = tl.arange(0, R)
    col = tl.arange(0, 16)
    kx = (v0 + offs_r)[:, None] * 16 + ((col >> 1) + 8 * (col & 1))[None, :]
    xr = tl.load(x_row + kx, mask=(kx < K) & ((v0 + offs_r) < MV)[:, None], other=0.0)
    if UPCAST_DOT:
        return tl.dot(signs.to(tl.float32), tl.trans(xr).to(tl.float32), input_precision="ieee")
    return tl.dot(signs, tl.trans(xr))


@triton.jit
def _st_shared(byte_off, value):
    """Store fp32 ``value`` at byte ``byte_off`` of the kernel's dynamic shared memory
    (``global_smem``, the symbol Triton declares for it)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .u32 a;
        mov.u32 a, global_smem;
        add.u32 a, a, $1;
        st.shared.b32 [a], $2;
        mov.u32 $0, 0;
        }""",
        constraints="=r,r,r", args=[byte_off, value.to(tl.int32, bitcast=True)], dtype=tl.int32, is_pure=False,
        pack=1)


@triton.jit
def _ld_shared(byte_off):
    """The fp32 at byte ``byte_off`` of the kernel's dynamic shared memory."""
    bits = tl.inline_asm_elementwise(
        asm="""{
        .reg .u32 a;
        mov.u32 a, global_smem;
        add.u32 a, a, $1;
        ld.shared.b32 $0, [a];
        }""",
        constraints="=r,r", args=[byte_off], dtype=tl.int32, is_pure=False, pack=1)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _prefetch_l2(addr):
    """``prefetch.global.L2`` of the line holding byte address ``addr`` (int64)."""
    return tl.inline_asm_elementwise(asm="prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", constraints="=r,l",
                                     args=[addr], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_block(i_addr, blk, pid_c, CHUNKS, ROW_BYTES, NBYTES, BLOCK_N: tl.constexpr, PFQ):
    """L2 prefetch of this program's share of the index bytes of row block ``blk``: its 128-byte
    lines pid_c, pid_c + CHUNKS, ..., PFQ of them, one per thread (threads past PFQ repeat the
    last, which a warp merges); lines are clamped into the buffer (past its blocks, a line is
    fetched twice or early: only a hint)."""
    q = tl.minimum(tl.arange(0, BLOCK_N), PFQ - 1)
    line = (blk * BLOCK_N * ROW_BYTES >> 7) + pid_c + q * CHUNKS
    _prefetch_l2(i_addr + tl.minimum(line, (NBYTES - 1) >> 7).to(tl.int64) * 128)


@triton.jit
def _codebook_table_kernel(
    x_ptr, i_ptr, cb16_ptr, s_ptr, g_ptr, b_ptr, y_ptr, ws_ptr, tab_ptr, cnt_ptr, i_addr,
    N, K, MV, ROW_BYTES, TOTAL, NBYTES, CHUNKS, NBLK, PFQ,
    stride_xm, stride_ym,
    C_BITS: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, NW: tl.constexpr, NA: tl.constexpr,
    LOADS: tl.constexpr, TABLE: tl.constexpr, SWZ: tl.constexpr, MAXB: tl.constexpr, RED: tl.constexpr,
    PREFETCH: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Program (s, chunk, m) of a grid (S, CHUNKS, M): builds the table of its chunk of R
    vectors, v0 = chunk * R, once (``_chunk_table``), then for each row block b = s, s + S, ...
    of BLOCK_N rows adds up the R entries that the row's indices select (r = 0 .. R-1 in order,
    fp32) into the fp32 partial ``ws[chunk, m, rows]``. The index words of the next block are
    loaded one block ahead, and (``PREFETCH`` > 0) the block that far ahead is prefetched into
    L2, each chunk's program a 1/CHUNKS share of its lines. After the loop, one arrival counter
    per (block, m): the last chunk to arrive at a block sums its partials in chunk order and
    writes ``0.5 * scale[n] * global * sum + bias[n]``. Deterministic (fixed order), no memset.

    Bits that do not belong to the row's vectors v0 .. v0 + R - 1 of a real row (rows past N,
    vectors past MV, words past the end) select entries that are zero (x is zero past MV) or
    never stored; every index selects an entry of the table (it has c bits).

    ``TABLE`` is where the lookups read the table: 0, ``tl.gather`` of the table held in
    registers (Triton stores it to shared memory at every block); 1, a global scratch slice
    written once (``tab_ptr``; L1-cached loads after a barrier); 2, the kernel's own shared
    memory, written once with ``st.shared`` and read with ``ld.shared`` (inline PTX). For 2 the
    kernel owns bytes [0, 4 R 2^c) of its dynamic shared memory from the first barrier after the
    table to the one after the loop: a ``tl.gather`` of that many bytes before them makes Triton
    allocate at least that much (a masked-off store keeps it alive), and between them no
    Triton op may use shared memory (its scratch would start at offset 0, in the table): the
    loop has only 1-D tensors and the inline PTX, which stay in one layout while BLOCK_N is at
    most the number of threads (the launcher enforces that and checks the TTGIR). Modes 1
    and 2 keep entry (c, r) at element ``r * 2^c + (c ^ _swizzle(r))``."""
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    mx = tl.program_id(2)
    S = tl.num_programs(0)
    M = tl.num_programs(2)
    CB: tl.constexpr = 1 << C_BITS
    v0 = pid_c * R
    nb = tl.cdiv(NBLK - pid_s, S)  # this program's blocks: pid_s + j * S, j < nb
    offs = tl.arange(0, BLOCK_N)
    rows = pid_s * BLOCK_N + offs
    # the first block's words, and the L2 prefetch of the next PREFETCH blocks, go out before
    # the table is built
    rot = (offs >> 1) & 3  # LOADS 2: varies across a warp's lanes (pairs of rows)
    if NW < 4:
        rot = rot % NW
    words, sh = _chunk_words(i_ptr, rows, rows < N, v0, rot, ROW_BYTES, TOTAL, C_BITS, NW, LOADS)
    for jj in tl.static_range(1, PREFETCH + 1):
        _prefetch_block(i_addr, pid_s + jj * S, pid_c, CHUNKS, ROW_BYTES, NBYTES, BLOCK_N, PFQ)
    table = _chunk_table(x_ptr + mx * stride_xm, cb16_ptr, v0, K, MV, C_BITS, R, ASM, UPCAST_DOT)  # [CB, R]
    offs_r = tl.arange(0, R)
    slot2 = offs_r[None, :] * CB + (tl.arange(0, CB)[:, None] ^ _swizzle(offs_r, SWZ)[None, :])
    if TABLE == 2:
        keep = tl.gather(tl.zeros([CB * R // 2], dtype=tl.int64), tl.zeros([R], dtype=tl.int32), 0)
        tl.store(ws_ptr + offs_r, keep.to(tl.float32), mask=(offs_r * 0 + pid_c) >= CHUNKS)
        tl.debug_barrier()
        _st_shared(slot2 * 4, table)
        tl.debug_barrier()
    elif TABLE == 1:
        tab = tab_ptr + ((mx * CHUNKS + pid_c) * S + pid_s) * (CB * R)
        tl.store(tab + slot2, table)
        tl.debug_barrier()
    else:
        flat = tl.reshape(tl.trans(table), [R * CB])
    part = ws_ptr + (pid_c * M + mx) * N
    for j in range(nb):
        rows = (pid_s + j * S) * BLOCK_N + offs
        nxt = rows + S * BLOCK_N
        nwords, nsh = _chunk_words(i_ptr, nxt, nxt < N, v0, rot, ROW_BYTES, TOTAL, C_BITS, NW, LOADS)
        if PREFETCH > 0:
            _prefetch_block(i_addr, pid_s + (j + PREFETCH + 1) * S, pid_c, CHUNKS, ROW_BYTES, NBYTES, BLOCK_N, PFQ)
        a = _align_words(words, sh, rot, NA, NW, LOADS)
        if TABLE == 0:
            idx = tl.zeros([BLOCK_N, R], dtype=tl.int32)
            for r in tl.static_range(R):
                idx = tl.where(offs_r[None, :] == r, (_vector_index(a, r, C_BITS) + r * CB)[:, None], idx)
            acc = tl.sum(tl.reshape(tl.gather(flat, tl.reshape(idx, [BLOCK_N * R]), 0), [BLOCK_N, R]), axis=1)
        else:
            for r in tl.static_range(R):
                slot = r * CB + (_vector_index(a, r, C_BITS) ^ _swizzle(r, SWZ))
                if TABLE == 2:
                    val = _ld_shared(slot * 4)
                else:
                    val = tl.load(tab + slot)
                if r == 0:
                    acc = val
                else:
                    acc += val
        tl.store(part + rows, acc, mask=rows < N)
        words, sh = nwords, nsh
    # serial reduction over the K chunks
    tl.debug_barrier()
    js = tl.arange(0, MAXB)
    mine = js < nb
    arrived = tl.atomic_add(cnt_ptr + mx * NBLK + pid_s + js * S, 1, mask=mine, sem="acq_rel", scope="gpu")
    last = tl.sum(tl.where(mine & (arrived == CHUNKS - 1), tl.full([MAXB], 1, tl.int64) << js.to(tl.int64), 0))
    tl.debug_barrier()
    gs = tl.load(g_ptr)
    for j in range(nb):
        if ((last >> j) & 1) != 0:
            blk = pid_s + j * S
            rows = blk * BLOCK_N + offs
            rmask = rows < N
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, CHUNKS, RED):
                for u in tl.static_range(RED):
                    kk = offs * 0 + (k0 + u)
                    acc += tl.load(ws_ptr + (kk * M + mx) * N + rows, mask=rmask & (kk < CHUNKS), other=0.0,
                                   cache_modifier=".cg")
            scale = _decode_e4m3(tl.load(s_ptr + rows, mask=rmask, other=0).to(tl.int32)) * gs
            y = acc * (0.5 * scale)
            if HAS_BIAS:
                y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            tl.store(y_ptr + mx * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)
            tl.atomic_xchg(cnt_ptr + mx * NBLK + blk, 0)


# measured best of the H200 sweep (docs/benchmarks.md): BLOCK_V=8 is 1.5x faster than 16 at every shape
_DECODE_DEFAULTS = dict(path="decode", BLOCK_M=16, BLOCK_N=128, BLOCK_V=8, SPLIT_K=0, GATHER=False, ASM=True,
                        ONE_DOT=True, num_warps=8, num_stages=3)
_TARGET_PROGRAMS = 256


# table path, H200 (Triton 3.6), M=1, K = N = 8192, c = 11 (cuBLAS bf16 33.7 us, "decode" 52 us): R=16 34.0 us,
# R=16 with LOADS="rotated" 35.0, R=8 55 (PREFETCH=0 45.6, TABLE="global" 55.9), R=4 114; R=8 with BLOCK_N=512
# 58 and 1024 85 (and BLOCK_N > 32 * num_warps is refused with TABLE="shared", see _table_gemv). R=16 fills the
# 128 KB table limit at c = 11 (smaller c: smaller tables; larger c: R is halved per extra bit, see codebook_gemv).
# SPLIT_N=0: about one program per SM; the L2 prefetch runs 8 blocks ahead, the last chunk sums up to 64 partials
# per round
_TABLE_DEFAULTS = dict(path="table", R=16, BLOCK_N=256, SPLIT_N=0, TABLE="shared", SWZ=True, RED=64, PREFETCH=8,
                       num_warps=8, num_stages=1)
# path=None in codebook_gemv: "table" where it measured faster than "decode" on the H200 (c = 11, Triton 3.6):
# M=1, K = N = 8192: 34.0 us (R=16) vs 52; M=1, 8192 -> 28672: 158 (R=8; R=16 not timed there) vs 188.5. "decode"
# elsewhere: M=1, 4096 x 4096: 14.9 vs 26.0 (R=8); M=16, 8192 x 8192: 53 vs 241 (R=8).
_TABLE_ROUTE_MIN_K = _TABLE_ROUTE_MIN_N = 8192


def _table_route(m: int, k: int, n: int, index_bits: int) -> bool:
    """Whether ``path=None`` takes the table path: one row of x, K and N at least 8192, c = 11
    (the shapes and index width where it was measured faster; module constants above)."""
    return m == 1 and k >= _TABLE_ROUTE_MIN_K and n >= _TABLE_ROUTE_MIN_N and index_bits == 11


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _table_split(programs: int, n: int, sms: int, setup_rows: int = 2048) -> int:
    """Slices of the row blocks per (chunk, row of x) for the table path: the S in 1..16 that
    minimizes ``ceil(programs * S / sms) * (setup_rows / n + 1 / S)``, waves of programs times
    one program's time (building its table costs about as much as looking up ``setup_rows``
    rows, measured in instructions; then N / S rows). The smallest such S."""
    return min(range(1, 17), key=lambda s: (_cdiv(programs * s, sms) * (setup_rows / n + 1 / s), s))


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def codebook_unsupported(x, indices_packed, codebook_packed, scales, global_scale, bias, vector_size, index_bits,
                         group_size, scale_dtype) -> str | None:
    """Why the Triton codebook GEMV does not cover these arguments, or None when it does."""
    if vector_size != 16 or scale_dtype != "e4m3" or not 1 <= index_bits <= 16:
        return "codebook kernel: vectors of 16, E4M3 scales, at most 16 index bits"
    if scales.dim() != 2 or scales.shape[1] != 1 or group_size * scales.shape[1] < x.shape[-1]:
        return "codebook kernel: per-row scales only"
    if x.dtype not in (torch.bfloat16, torch.float16) or scales.dtype != torch.float8_e4m3fn:
        return f"dtypes {x.dtype} / {scales.dtype}"
    if codebook_packed.numel() != (1 << index_bits) * 2 or indices_packed.dtype != torch.uint8:
        return "packed layout"
    if bias is not None and bias.shape != (indices_packed.shape[0],):
        return "bias shape"
    if x.device.type == "cpu" and not _interpreting():
        return "device cpu"
    return None


def default_config(path: str, m: int, n: int, mv: int) -> dict:
    """Tile sizes of a path ("decode" or "table"); ``SPLIT_K=0`` means automatic
    (about two programs per SM, as in :func:`lowbit.codegen.triton.w2a16.default_config`), and
    so does the table path's ``SPLIT_N=0`` (slices of the row blocks: about one program per SM,
    resolved at launch)."""
    cfg = dict(_DECODE_DEFAULTS if path == "decode" else _TABLE_DEFAULTS)
    if path == "decode" and cfg["SPLIT_K"] == 0:
        tiles = _cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"])
        cfg["SPLIT_K"] = max(1, min(8, _cdiv(mv, cfg["BLOCK_V"]), round(_TARGET_PROGRAMS / tiles)))
    return cfg


def codebook_gemv(x: torch.Tensor, indices_packed: torch.Tensor, codebook_packed: torch.Tensor,
                  scales: torch.Tensor, global_scale: torch.Tensor, bias: torch.Tensor | None = None,
                  index_bits: int = 11, padded_width: int | None = None, out_dtype=None, path: str | None = None,
                  **config) -> torch.Tensor:
    """``x @ W^T + bias`` for a codebook weight with v = 16 and per-row E4M3 scales (module
    docstring). ``x`` bf16/fp16 [..., K]; output in x's dtype (or ``out_dtype``). ``path``:
    "gluon" (the Gluon W2A16 pipeline in codebook mode, :mod:`.codebook_gluon`: what None picks
    on CUDA for bf16 x of at most 8 rows, K a multiple of 256 and N of 64),
    "decode" (codewords expanded to +-1 tiles on tensor cores) or "table" (one lookup in a
    per-chunk table of codeword dot products per index: ``_codebook_table_kernel``); None (the
    default) picks "table" for one row of x with K, N >= 8192 and c = 11, where the H200
    measured it faster (M=1, K = N = 8192: 34.0 us against 52 for "decode", cuBLAS bf16 33.7;
    M=1, 8192 -> 28672: 158 with R=8, R=16 not timed there, against 188.5), and "decode"
    everywhere else (M=1, 4096 x 4096: 14.9 us against 26.0 with R=8; M=16, 8192 x 8192: 53
    against 241 with R=8) among the Triton paths. ``config`` overrides tile sizes (``_DECODE_DEFAULTS``,
    ``_TABLE_DEFAULTS``; the table path's default R is halved for every index bit past 11, so
    that the table stays within 128 KB)."""
    n = indices_packed.shape[0]
    k = x.shape[-1]
    kp = padded_width or -(-k // 16) * 16
    mv = kp // 16
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    auto = path is None
    if auto:
        from .codebook_gluon import unsupported as gluon_unsupported

        if gluon_unsupported(x, indices_packed, index_bits, kp) is None:
            path = "gluon"
        else:
            path = "table" if _table_route(m, k, n, index_bits) else "decode"
    if path == "gluon":
        from .codebook_gluon import codebook_gluon, prepared

        byte_table = config.pop("BYTE_TABLE", None)
        operands = prepared(indices_packed, codebook_packed, scales, global_scale, index_bits, kp, byte_table)
        return codebook_gluon(x, operands, bias, out_dtype=out_dtype, **config)
    if path not in ("decode", "table"):
        raise ValueError(f"path must be 'gluon', 'decode', 'table' or None, got {path!r}")
    cfg = default_config(path, m, n, mv)
    if path == "table":
        cfg["R"] = max(1, min(cfg["R"], 32768 >> index_bits))  # the default R within the 128 KB table limit
    cfg.update(config)
    cfg.pop("path", None)
    out_dtype = out_dtype or x.dtype
    y = torch.empty((m, n), device=x.device, dtype=out_dtype)
    if m == 0:
        return y.reshape(*lead, n)
    g = global_scale.reshape(1).float()
    idx = indices_packed if indices_packed.stride(-1) == 1 else indices_packed.contiguous()
    cb = codebook_packed.contiguous()
    sbytes = scales.view(torch.uint8).reshape(n)
    interp = _interpreting()
    if path == "decode":
        split = cfg["SPLIT_K"]
        if split < 1:
            split = default_config(path, m, n, mv)["SPLIT_K"]
        tiles = _cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"])
        words = idx.shape[1] % 4 == 0 and idx.stride(0) % 4 == 0 and idx.data_ptr() % 4 == 0 \
            and cfg.get("WORDS", True)
        idx_arg = idx.view(torch.int32) if words else idx
        if split > 1:
            ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
            cnt = _tile_counters(x.device, tiles)
        else:
            ws, cnt = y, g  # unused
        _codebook_decode_kernel[(tiles, split)](
            x2, idx_arg, cb, cb.view(torch.int16), sbytes, g, bias if bias is not None else g, y, ws, cnt,
            m, n, k, mv, idx.shape[1], x2.stride(0), idx_arg.stride(0), y.stride(0),
            C_BITS=index_bits, NB=(7 + index_bits + 7) // 8, WORDS=words, GATHER=cfg["GATHER"],
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], SPLIT_K=split,
            HAS_BIAS=bias is not None, ASM=cfg["ASM"] and not interp,
            UPCAST_DOT=interp and x.dtype == torch.bfloat16, ONE_DOT=cfg["ONE_DOT"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return y.reshape(*lead, n)
    try:
        return _table_gemv(x2, idx, cb, sbytes, g, bias, y, index_bits, k, mv, cfg, interp).reshape(*lead, n)
    except RuntimeError as e:  # the compiled-kernel guard of TABLE="shared" refused this build
        if not auto or "codebook table kernel" not in str(e):
            raise
        _warn_once(f"{e}; the codebook GEMV falls back to path='decode'")
        return codebook_gemv(x, indices_packed, codebook_packed, scales, global_scale, bias, index_bits,
                             padded_width, out_dtype, "decode")


def _table_gemv(x2, idx, cb, sbytes, g, bias, y, c, k, mv, cfg, interp):
    """Launch ``_codebook_table_kernel`` (path "table"): grid (SPLIT_N slices of the row
    blocks, ceil(MV / R) K chunks, M); ``SPLIT_N=0`` picks about one program per SM."""
    m, n = y.shape
    r, bn = cfg["R"], cfg["BLOCK_N"]
    if r < 1 or r & (r - 1) or bn < 1 or bn & (bn - 1):
        raise ValueError(f"R and BLOCK_N must be powers of two, got {r}, {bn}")
    if r << c > 32768:
        raise ValueError(f"table path: a table of 2^{c} x {r} entries is over 128 KB; use a smaller R or "
                         "path='decode'")
    mode = _TABLE_MODES[cfg["TABLE"]]
    if mode == 2 and cfg["num_stages"] != 1:
        raise ValueError("TABLE='shared' needs num_stages=1 (pipelined loads would use the table's shared memory)")
    if mode == 2 and bn > 32 * cfg["num_warps"]:
        # more rows than threads: Triton's coalescing gives the row tensors several rows per thread
        # (when the arguments are 16-divisible) and converts the sums back through shared memory at
        # offset 0 inside the lookup loop, over the table (tests/gpu: R=16 BLOCK_N=512, R=4 BLOCK_N=1024)
        raise ValueError(f"TABLE='shared' needs BLOCK_N <= 32 * num_warps = {32 * cfg['num_warps']} (one row per "
                         f"thread), got {bn}; use a smaller BLOCK_N or TABLE='global'")
    if mode == 2 and interp:
        mode = 1  # no inline PTX in the interpreter: the same table layout, in global scratch
    chunks = _cdiv(mv, r)
    nblk = _cdiv(n, bn)
    sms = _sm_count(y.device.index or 0) if y.device.type == "cuda" else 132
    split = cfg["SPLIT_N"] or _table_split(chunks * m, n, sms)
    split = min(max(split, _cdiv(nblk, 64)), nblk)  # at most 64 blocks per program (one bit each)
    flat = idx.contiguous().reshape(-1)  # rows back to back: one bitstream
    row_bytes = idx.shape[1]
    loads = cfg.get("LOADS", "words")
    if not cfg.get("WORDS", True) or flat.numel() % 4 or flat.data_ptr() % 4:
        loads = "bytes"  # the stream is not a whole number of aligned words
    loads = {"bytes": 0, "words": 1, "rotated": 2}[loads]
    i_arg = flat.view(torch.int32) if loads else flat
    nw = (31 + r * c + 31) // 32
    ws = torch.empty((chunks, m, n), device=y.device, dtype=torch.float32)
    tab = torch.empty((m * chunks * split, r << c), device=y.device, dtype=torch.float32) if mode == 1 else ws
    cnt = _tile_counters(y.device, m * nblk)
    prefetch = 0 if interp else cfg["PREFETCH"]
    pfq = _cdiv(_cdiv(bn * row_bytes, 128) + 1, chunks)  # lines of a block per program
    kernel = _codebook_table_kernel[(split, chunks, m)](
        x2, i_arg, cb.view(torch.int16), sbytes, g, bias if bias is not None else g, y, ws, tab, cnt, flat.data_ptr(),
        n, k, mv, row_bytes, i_arg.numel(), flat.numel(), chunks, nblk, pfq, x2.stride(0), y.stride(0),
        C_BITS=c, R=r, BLOCK_N=bn, NW=nw, NA=_cdiv(r * c, 32), LOADS=loads, TABLE=mode, SWZ=cfg["SWZ"] and c >= 5,
        MAXB=_next_pow2(_cdiv(nblk, split)), RED=max(1, min(cfg["RED"], chunks)), PREFETCH=prefetch,
        HAS_BIAS=bias is not None, ASM=not interp, UPCAST_DOT=interp and x2.dtype == torch.bfloat16,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if mode == 2:
        _check_shared_table(kernel, 4 * (r << c))
    return y


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


_SHARED_TABLE_OK: dict = {}
# TTGIR ops that use shared memory (Triton's own scratch or buffers, all allocated from offset 0)
_SMEM_OPS = ("ttg.convert_layout", "ttg.local_alloc", "ttg.local_load", "ttg.local_store", "tt.reduce", "tt.scan",
             "tt.gather", "tt.histogram", "tt.atomic_rmw", "tt.atomic_cas", "tt.dot", "ttng.warp_group_dot",
             "ttg.async_copy", "ttng.async_tma")


def _check_shared_table(kernel, table_bytes: int) -> None:
    """TABLE="shared" guard, once per compiled kernel: the dynamic shared memory holds the table
    (``metadata.shared``), and between the barrier after the table stores and the barrier after
    the lookup loop the TTGIR has no op that uses shared memory (such an op's scratch starts at
    offset 0, inside the table: a layout conversion in the loop corrupted the lookups of every
    later block). Raises RuntimeError; the launch's output is then not to be used."""
    key = (kernel.hash, table_bytes)
    err = _SHARED_TABLE_OK.get(key)
    if err is None:
        err = ""
        if kernel.metadata.shared < table_bytes:  # the reservation must hold the table
            err = f"{kernel.metadata.shared} bytes of shared memory, the table needs {table_bytes}"
        else:
            lines = kernel.asm["ttgir"].splitlines()
            st = next((i for i, t in enumerate(lines) if "st.shared.b32 [a]" in t), None)
            bars = [i for i, t in enumerate(lines) if "gpu.barrier" in t and st is not None and i > st]
            if st is None or len(bars) < 2:
                err = "the table stores or the barriers around the lookup loop are missing from the TTGIR"
            else:
                bad = [t.strip()[:160] for t in lines[bars[0] + 1:bars[1]] if any(o in t for o in _SMEM_OPS)]
                if bad:
                    err = f"Triton uses shared memory (over the table) in the lookup loop: {bad[0]}"
        _SHARED_TABLE_OK[key] = err
    if err:
        raise RuntimeError(f"codebook table kernel, TABLE='shared': {err}; use TABLE='global' or another "
                           "BLOCK_N / num_warps")
