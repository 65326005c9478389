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
* ``path="table"`` (``_codebook_gemv_kernel``, the first design, kept as a second, independent
  implementation; 1.8x slower than "decode" at M=1 on the H200): the kernel never expands W:
  a program takes R consecutive vectors (a chunk of K) and a block of rows, computes its slice
  of the table P (R x C dot products of 16 elements: one small tensor-core product of the +-1
  codebook with x, exact products and fp32 sums), then for each row gathers the R table
  entries its indices point to (``tl.gather``: the table lives in shared memory) and adds
  them. Partial sums of the K chunks are reduced serially as in :mod:`.w2a16` (fp32 partial
  tiles, the last program to arrive sums them in a fixed order and applies the scales and
  bias): deterministic, no memset. Products are exact; rounding happens in the fp32 table
  sums and the fp32 reduction only.

Bytes per weight: ``c / 16`` of an index (11/16 bit for the ``btc`` preset) plus the row scale:
about 1/23 of bf16 weights.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .w2a16 import _cdiv, _decode_e4m3, _interpreting, _joined_pairs_dot, _split_k_total, _tile_counters, _x_pairs


@triton.jit
def _codebook_gemv_kernel(
    x_ptr, idx_ptr, cb_ptr, s_ptr, g_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    N, K, MV, ROW_BYTES, CHUNKS,
    stride_xm, stride_in, stride_ym,
    C_BITS: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (rows block, K chunk of R vectors, row of x)."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    mx = tl.program_id(2)
    M = tl.num_programs(2)
    CB: tl.constexpr = 1 << C_BITS
    # table P[c, r] = sum_j sign(cb[c, j]) x[16 (m0 + r) + j]
    m0 = pid_c * R
    offs_c = tl.arange(0, CB)
    cbw = tl.load(cb_ptr + 2 * offs_c).to(tl.int32) | (tl.load(cb_ptr + 2 * offs_c + 1).to(tl.int32) << 8)
    j = tl.arange(0, 16)
    offs_r = tl.arange(0, R)
    kx = (m0 + offs_r)[:, None] * 16 + j[None, :]
    xr = tl.load(x_ptr + mx * stride_xm + kx, mask=(kx < K) & ((m0 + offs_r) < MV)[:, None], other=0.0)
    neg = (cbw[:, None] >> j[None, :]) & 1
    if R < 16:  # below the smallest tl.dot: broadcast products, fp32 sums
        signs = 1.0 - 2.0 * neg.to(tl.float32)
        table = tl.sum(signs[:, None, :] * xr.to(tl.float32)[None, :, :], axis=2)
    elif UPCAST:
        signs = 1.0 - 2.0 * neg.to(tl.float32)
        table = tl.dot(signs, tl.trans(xr.to(tl.float32)), input_precision="ieee")  # [CB, R]
    else:
        signs = (1.0 - 2.0 * neg.to(tl.float32)).to(xr.dtype)
        table = tl.dot(signs, tl.trans(xr))
    flat = tl.reshape(table, [CB * R])
    # indices of rows [pid_n*BLOCK_N, +BLOCK_N), vectors m0 + r
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    vec = m0 + offs_r
    vmask = n_mask[:, None] & (vec < MV)[None, :]
    bitpos = vec * C_BITS
    byte0 = bitpos >> 3
    raw = tl.zeros([BLOCK_N, R], dtype=tl.int32)
    for b in tl.static_range(NB):
        ok = vmask & ((byte0 + b) < ROW_BYTES)[None, :]
        byte = tl.load(idx_ptr + offs_n[:, None] * stride_in + (byte0 + b)[None, :], mask=ok, other=0)
        raw |= byte.to(tl.int32) << (8 * b)
    idx = (raw >> (bitpos & 7)[None, :]) & (CB - 1)
    gidx = tl.reshape(idx * R + offs_r[None, :], [BLOCK_N * R])
    vals = tl.reshape(tl.gather(flat, gidx, 0), [BLOCK_N, R])
    vals = tl.where(vmask, vals, 0.0)
    part = tl.sum(vals, axis=1)
    # serial reduction over the K chunks (fixed order)
    tile = pid_n * M + mx
    tl.store(ws_ptr + (pid_c * M + mx) * N + offs_n, part, mask=n_mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == CHUNKS - 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for kk in range(CHUNKS):
            acc += tl.load(ws_ptr + (kk * M + mx) * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
        scale = _decode_e4m3(tl.load(s_ptr + offs_n, mask=n_mask, other=0).to(tl.int32)) * tl.load(g_ptr)
        y = acc * (0.5 * scale)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + mx * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)
        tl.atomic_xchg(cnt_ptr + tile, 0)


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


# measured best of the H200 sweep (docs/benchmarks.md): BLOCK_V=8 is 1.5x faster than 16 at every shape
_DECODE_DEFAULTS = dict(path="decode", BLOCK_M=16, BLOCK_N=128, BLOCK_V=8, SPLIT_K=0, GATHER=False, ASM=True,
                        ONE_DOT=True, num_warps=8, num_stages=3)
_TARGET_PROGRAMS = 256


_TABLE_DEFAULTS = dict(path="table", R=16, BLOCK_N=1024, num_warps=8, num_stages=1)  # best of its own sweep


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
    """Tile sizes of a path ("decode", the default, or "table"); ``SPLIT_K=0`` means automatic
    (about two programs per SM, as in :func:`lowbit.codegen.triton.w2a16.default_config`)."""
    cfg = dict(_DECODE_DEFAULTS if path == "decode" else _TABLE_DEFAULTS)
    if path == "decode" and cfg["SPLIT_K"] == 0:
        tiles = _cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"])
        cfg["SPLIT_K"] = max(1, min(8, _cdiv(mv, cfg["BLOCK_V"]), round(_TARGET_PROGRAMS / tiles)))
    return cfg


def codebook_gemv(x: torch.Tensor, indices_packed: torch.Tensor, codebook_packed: torch.Tensor,
                  scales: torch.Tensor, global_scale: torch.Tensor, bias: torch.Tensor | None = None,
                  index_bits: int = 11, padded_width: int | None = None, out_dtype=None, path: str = "decode",
                  **config) -> torch.Tensor:
    """``x @ W^T + bias`` for a codebook weight with v = 16 and per-row E4M3 scales (module
    docstring). ``x`` bf16/fp16 [..., K]; output in x's dtype (or ``out_dtype``). ``path``:
    "decode" (codewords expanded to +-1 tiles on tensor cores; the default: 1.8x faster than
    "table" at M=1 on the H200, 25x at M=16) or "table" (the table-lookup kernel);
    ``config`` overrides tile sizes."""
    if path not in ("decode", "table"):
        raise ValueError(f"path must be 'decode' or 'table', got {path!r}")
    n = indices_packed.shape[0]
    k = x.shape[-1]
    kp = padded_width or -(-k // 16) * 16
    mv = kp // 16
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = default_config(path, m, n, mv)
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
    r, bn = cfg["R"], cfg["BLOCK_N"]
    chunks = _cdiv(mv, r)
    nblocks = _cdiv(n, bn)
    ws = torch.empty((chunks, m, n), device=x.device, dtype=torch.float32)
    cnt = _tile_counters(x.device, nblocks * m)
    _codebook_gemv_kernel[(nblocks, chunks, m)](
        x2, idx, cb, sbytes, g, bias if bias is not None else g, y, ws, cnt,
        n, k, mv, idx.shape[1], chunks, x2.stride(0), idx.stride(0), y.stride(0),
        C_BITS=index_bits, R=r, BLOCK_N=bn, NB=(7 + index_bits + 7) // 8, HAS_BIAS=bias is not None,
        UPCAST=interp, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.reshape(*lead, n)
