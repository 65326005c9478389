"""Triton GEMV for binary codebook linears (``torch.ops.lowbit.codebook_linear``).

The format is :mod:`lowbit.codebook`'s: row n of W is cut into vectors of v = 16 signs, vector
m of row n is codebook entry ``idx[n, m]`` (c-bit indices in a little-endian bitstream per
row), and with per-row scales the value of a weight is ``+-0.5 * stored[n] * global``. So

    y[m_x, n] = 0.5 * stored[n] * global * sum_m  P[m, idx[n, m]] + bias[n],
    P[m, c]   = sum_j sign(codebook[c, j]) * x[m_x, 16 m + j].

The kernel never expands W: a program takes R consecutive vectors (a chunk of K) and a block
of rows, computes its slice of the table P (R x C dot products of 16 elements: one small
tensor-core product of the +-1 codebook with x, exact products and fp32 sums), then for each
row gathers the R table entries its indices point to (``tl.gather``: the table lives in shared
memory) and adds them. Partial sums of the K chunks are reduced serially as in :mod:`.w2a16`
(fp32 partial tiles, the last program to arrive sums them in a fixed order and applies the
scales and bias): deterministic, no memset. Products are exact; rounding happens in the fp32
table sums and the fp32 reduction only.

Bytes per weight: ``c / 16`` of an index (11/16 bit for the ``btc`` preset) plus the row scale:
about 1/23 of bf16 weights.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .w2a16 import _decode_e4m3, _interpreting, _tile_counters


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


_DEFAULTS = dict(R=16, BLOCK_N=1024, num_warps=8, num_stages=1)  # measured best of the sweep (docs/benchmarks.md)


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


def codebook_gemv(x: torch.Tensor, indices_packed: torch.Tensor, codebook_packed: torch.Tensor,
                  scales: torch.Tensor, global_scale: torch.Tensor, bias: torch.Tensor | None = None,
                  index_bits: int = 11, padded_width: int | None = None, out_dtype=None, **config) -> torch.Tensor:
    """``x @ W^T + bias`` for a codebook weight with v = 16 and per-row E4M3 scales (module
    docstring). ``x`` bf16/fp16 [..., K]; output in x's dtype (or ``out_dtype``)."""
    cfg = dict(_DEFAULTS)
    cfg.update(config)
    n = indices_packed.shape[0]
    k = x.shape[-1]
    kp = padded_width or -(-k // 16) * 16
    mv = kp // 16
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out_dtype = out_dtype or x.dtype
    y = torch.empty((m, n), device=x.device, dtype=out_dtype)
    if m == 0:
        return y.reshape(*lead, n)
    r, bn = cfg["R"], cfg["BLOCK_N"]
    chunks = triton.cdiv(mv, r)
    nblocks = triton.cdiv(n, bn)
    ws = torch.empty((chunks, m, n), device=x.device, dtype=torch.float32)
    cnt = _tile_counters(x.device, nblocks * m)
    g = global_scale.reshape(1).float()
    idx = indices_packed if indices_packed.stride(-1) == 1 else indices_packed.contiguous()
    _codebook_gemv_kernel[(nblocks, chunks, m)](
        x2, idx, codebook_packed.contiguous(), scales.view(torch.uint8).reshape(n), g,
        bias if bias is not None else g, y, ws, cnt,
        n, k, mv, idx.shape[1], chunks, x2.stride(0), idx.stride(0), y.stride(0),
        C_BITS=index_bits, R=r, BLOCK_N=bn, NB=(7 + index_bits + 7) // 8, HAS_BIAS=bias is not None,
        UPCAST=_interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.reshape(*lead, n)
