"""Codebook GEMV (``btc`` format, v = 16, per-row E4M3 scales) on the Gluon W2A16 pipeline.

The W2A16 decode kernel of :mod:`lowbit.codegen.triton.w2a16_gluon` builds its tensor-core A
operand in registers from one int32 word per group of 16 weights. A codebook weight has one
index per vector of 16 weights instead, so the same kernel (``CB=True``) runs it with the
index in the word's place and a table lookup in place of the bit unpacking; the cp.async ring,
the staged x, the MMA layouts and the serial split-K reduction are shared.

Math (:mod:`lowbit.codebook`): element j of vector m of row n has the sign
``codebook[idx[n, m], j]`` and the value ``+-0.5 * e4m3(S[n]) * global``, so

    y[r, n] = rowscale[n] * sum_m sum_j sign(n, 16 m + j) * x[r, 16 m + j] + bias[n],
    rowscale[n] = 0.5 * fp32(e4m3(S[n])) * global      (fp32, exact: a power-of-two factor
                                                        times one fp32 product)

The signs are exact +-1 in bf16, so the tensor-core products are exact and only the fp32
accumulation and the final scaling round.

Offline formats (computed once per weight, :func:`prepared`)
------------------------------------------------------------
* indices: int16 ``[N, Kp / 16]`` (index m of row n at [n, m]; lowbit stores them as a c-bit
  stream per row). One 16-bit index per 16 weights: 1 bit per weight plus 16/K for the row
  scale, against 2.5 for W2A16.
* table words: int32 ``[2^c]``. Word T[c] has bit ``8 + i`` set when element 2i of codeword c
  is negative and bit ``24 + i`` when element 2i + 1 is (i < 8). ``T << (7 - i)`` puts the
  signs of the K-adjacent pair (2i, 2i + 1) at bits 15 and 31, and one LOP3
  ``& 0x80008000 | 0x3F803F80`` makes the bf16x2 ``{+-1, +-1}`` that meets the natural x pair
  ``x[16 m + 2i : 16 m + 2i + 2]``, exactly as pair i of a W2A16 word does. Cost per vector: a
  sign extension, an address, one shared-memory load, 7 shifts and 8 LOP3 (about one
  instruction per weight).
* byte table (an option, ``byte_table=True``, c <= 11; slower, below): int32 ``[4 * 2^c]``, 16 bytes per codeword; byte b of
  word 4c + q is the high byte of bf16 ``sign(element 4q + b)``: 0x3F or 0xBF. One 16-byte
  shared-memory load per vector, and pair i is one PRMT of word i // 2 that puts bytes (0, 1)
  or (2, 3) under low bytes 0x80 (bf16 +-1 is 0x3F80 / 0xBF80): half an instruction per
  weight, no shifts. Its main loop has 1.48 SASS instructions per weight against 2.24 for the
  sign words (Triton 3.6, sm_90, K = N = 8192, default tiles), at the price of 32 KB of shared
  memory and more bank conflicts on the random 16-byte loads, and those cost more than the
  instructions saved: on the H200 (same run, M=1) 17.5 us against 13.2 at 8192^2, 8.2 against
  6.7 at 4096^2, 56.5 against 32.7 at 8192 -> 28672.
* row scales: fp32 ``[N]`` (``rowscale`` above), applied to the accumulator.

The table lives in shared memory: each program copies it there once (32 KB for the byte
table at c = 11, 8 KB for the sign words) and reads it with ``ld.shared`` through inline PTX at
a byte offset past everything Triton allocates (Gluon on Triton 3.6 has no gather from shared
memory). The launcher compiles the kernel twice to learn that offset and raises the compiled
kernel's shared-memory size to cover the table before it is loaded
(:func:`lowbit.codegen.triton.w2a16_gluon._compile_codebook`), so Triton's loader opts in to
more than 48 KB where the rings, x and the table need it.

Measured on an H200 (2026-12-01, ``python bench/kernels.py --suites codebook --variants
--codebook-variants gluon``, M=1, c=11, docs/benchmarks.md), with the sign words as packed
32-bit asm results (``_sign_pair``, ``pack=2``, so ptxas adds no register move per pair: 1.76
SASS instructions per weight in the main loop): 12.1 us at K = N = 8192 (cuBLAS bf16 33.5:
2.78x; the Triton table path 33.5), 6.5 at 4096^2 (2.03x), 32.2 at 8192 -> 28672. Before the
packing (2.24 instructions per weight, 0.45 of them moves) the same shapes took 13.1, 6.7 and
32.7 us: the kernel is bound by instruction issue and latency, as W2A16's is, not by its 1 bit
per weight. The byte table removes a third of the instructions, but its random 16-byte
shared-memory loads conflict on more banks, and it is slower (17.9 us at 8192^2).

Shapes: x bf16 with at most 8 rows, K a multiple of 256 (the padded width Kp = K), N of the
tile's BLOCK_N (64). Everything else goes to :func:`lowbit.codegen.triton.codebook.codebook_gemv`.
The CPU tests (tests/test_codebook_gluon.py) check the formats and replay the sign
construction in torch; tests/gpu/test_codebook_gluon.py runs the kernel against float64.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import w2a16_gluon as _g

MAX_INDEX_BITS = 12   # table of 2^12 words = 16 KB
MAX_BYTE_TABLE_BITS = 11  # byte table of 2^11 x 16 bytes = 32 KB (an option: slower, see the docstring)
VECTOR = 16


class CodebookOperands(NamedTuple):
    """What the kernel reads for one weight (module docstring): int16 indices [N, Kp/16], the
    table (int32: 2^c sign words, or 4 x 2^c words of bytes when ``byte_table``) and fp32 row
    scales [N]."""
    indices: torch.Tensor
    table: torch.Tensor
    rowscale: torch.Tensor
    byte_table: bool


def table_words(codebook_packed: torch.Tensor, index_bits: int) -> torch.Tensor:
    """int32 table words [2^c] of lowbit's packed codebook (uint8 bitstream, bit j of codeword c
    at bit 16 c + j, set for a negative element): bit 8 + i of word c is element 2i's bit, bit
    24 + i element 2i + 1's (module docstring)."""
    from lowbit.codebook import unpack_codebook

    neg = (unpack_codebook(codebook_packed, 1 << index_bits, VECTOR) != 0).to(torch.int64)  # [C, 16]
    i = torch.arange(8, dtype=torch.int64, device=neg.device)
    word = (neg[:, 0::2] << (8 + i)).sum(-1) + (neg[:, 1::2] << (24 + i)).sum(-1)
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def table_bytes(codebook_packed: torch.Tensor, index_bits: int) -> torch.Tensor:
    """int32 byte table [4 * 2^c] of lowbit's packed codebook: byte b of word 4c + q is the high
    byte of bf16 sign(element 4q + b of codeword c): 0x3F for +1, 0xBF for -1 (module docstring)."""
    from lowbit.codebook import unpack_codebook

    neg = (unpack_codebook(codebook_packed, 1 << index_bits, VECTOR) != 0).to(torch.int64)  # [C, 16]
    byte = (0x3F | (neg << 7)).reshape(-1, 4, 4)                                              # [C, q, b]
    word = (byte << (8 * torch.arange(4, dtype=torch.int64, device=neg.device))).sum(-1).reshape(-1)
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def signs_of_byte_table(words: torch.Tensor) -> torch.Tensor:
    """The byte-table path's pairs replayed in torch: int8 +-1 [C, 16]. Pair i is one PRMT of word
    i // 2: bytes (0, 1) or (2, 3), each under a low byte 0x80, read as bf16."""
    w = (words.to(torch.int64) & 0xFFFFFFFF).reshape(-1, 4)
    out = torch.empty((w.shape[0], VECTOR), dtype=torch.int8, device=w.device)
    for i in range(8):
        q, half = divmod(i, 2)
        for j in range(2):
            byte = (w[:, q] >> (8 * (2 * half + j))) & 0xFF
            bits = (byte << 8) | 0x80                                  # the bf16 pattern of the pair's half
            out[:, 2 * i + j] = _bf16_of_bits(bits).to(torch.int8)
    return out


def _bf16_of_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 values of bf16 bit patterns (uint16 in int64)."""
    return (bits.to(torch.int32) << 16).view(torch.float32)


def signs_of_table(words: torch.Tensor) -> torch.Tensor:
    """The kernel's sign construction replayed in torch: int8 +-1 [C, 16] from table words, pair
    i being the bits 15 and 31 of ``word << (7 - i)`` (inverse of :func:`table_words`)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty((w.shape[0], VECTOR), dtype=torch.int8, device=w.device)
    for i in range(8):
        v = (w << (7 - i)) & 0xFFFFFFFF
        out[:, 2 * i] = 1 - 2 * ((v >> 15) & 1)
        out[:, 2 * i + 1] = 1 - 2 * ((v >> 31) & 1)
    return out


def indices_int16(indices_packed: torch.Tensor, vectors: int, index_bits: int) -> torch.Tensor:
    """int16 [N, vectors] of lowbit's c-bit index stream uint8 [N, ceil(vectors c / 8)]."""
    from lowbit.codebook import unpack_indices

    if not 1 <= index_bits <= 15:
        raise ValueError(f"int16 indices hold at most 15 bits, got {index_bits}")
    return unpack_indices(indices_packed, vectors, index_bits).to(torch.int16)


def row_scales(scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """fp32 [N]: ``0.5 * fp32(e4m3 S[n]) * global`` (per-row E4M3 scales [N, 1]): half of lowbit's
    effective scale, the magnitude of a weight on the 1-bit half grid."""
    from lowbit.formats import effective_scales

    return effective_scales(scales, global_scale).reshape(-1) * 0.5


def unsupported(x: torch.Tensor, indices_packed: torch.Tensor, index_bits: int, padded_width: int,
                max_m: int = _g.MAX_M) -> str | None:
    """Why this codebook call does not take the Gluon kernel, or None (the caller has checked the
    format: v = 16, per-row E4M3 scales)."""
    why = _g.runtime_problem(x) or _g.activation_problem(x, max_m)
    if why:
        return why
    m = x.numel() // max(x.shape[-1], 1)
    return shape_problem(m, indices_packed.shape[0], x.shape[-1], index_bits, padded_width)


def shape_problem(m: int, n: int, k: int, index_bits: int, padded_width: int) -> str | None:
    """Why an M x K by N x K codebook product does not fit the Gluon kernel's default launch, or
    None: K = Kp a multiple of 256, N of BLOCK_N, at most :data:`MAX_INDEX_BITS` index bits, and
    the pipelined plan (a K share of x staged whole, the stage ring and the table) within the
    shared memory of one program. Codebook mode has no classic-kernel fallback, so a K whose
    staged x would not fit goes to a Triton path instead."""
    if k % _g.TILE_K or padded_width != k or n % _g.DEFAULTS["BLOCK_N"]:
        return f"K={k} (padded {padded_width}), N={n} (Gluon path: K = Kp a multiple of {_g.TILE_K}, " \
               f"N of {_g.DEFAULTS['BLOCK_N']})"
    if index_bits > MAX_INDEX_BITS:
        return f"{index_bits} index bits (Gluon path: at most {MAX_INDEX_BITS})"
    cfg, plan, _ = _g._pipe_launch_plan(max(m, 1), n, k, (), tuple(sorted(_g.DEFAULTS.items())))
    table = 4 << index_bits
    if plan is None or plan["smem"] + table > _g.SMEM_LIMIT:
        need = _g.pipe_plan(max(m, 1), n, k, {**cfg, "STAGES": cfg["STAGES"] or _g.DEFAULTS["STAGES"]})["smem"]
        return f"K={k} at {m} rows: {need + table} bytes of shared memory with the table (> {_g.SMEM_LIMIT})"
    return None


_PREPARED: dict = {}


def prepared(indices_packed: torch.Tensor, codebook_packed: torch.Tensor, scales: torch.Tensor,
             global_scale: torch.Tensor, index_bits: int, padded_width: int,
             byte_table: bool | None = None) -> CodebookOperands:
    """The :class:`CodebookOperands` of a weight, computed once and kept while the index tensor
    lives and none of the four tensors is modified in place (keyed by identity and version
    counters), so inference converts each weight on its first call only. ``byte_table``: the
    byte table (one PRMT per pair, c <= 11; measured slower) instead of the sign words (shift +
    LOP3; the default)."""
    byte_table = bool(byte_table)
    if byte_table and index_bits > MAX_BYTE_TABLE_BITS:
        raise ValueError(f"the byte table holds at most {MAX_BYTE_TABLE_BITS} index bits, got {index_bits}")
    table = table_bytes if byte_table else table_words
    return _g.cached_conversion(
        _PREPARED, (id(indices_packed), index_bits, padded_width, byte_table),
        (indices_packed, codebook_packed, scales, global_scale),
        lambda: CodebookOperands(indices_int16(indices_packed, padded_width // VECTOR, index_bits).contiguous(),
                                 table(codebook_packed, index_bits).contiguous(),
                                 row_scales(scales, global_scale).contiguous(), byte_table))


def codebook_gluon(x: torch.Tensor, operands: CodebookOperands, bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None, **config) -> torch.Tensor:
    """``x @ W^T + bias`` for bf16 x [..., K] (at most 16 rows) and a codebook weight in the
    offline formats of the module docstring (:func:`prepared`). ``config``: the pipelined
    kernel's keys of :data:`lowbit.codegen.triton.w2a16_gluon.DEFAULTS` (STAGES >= 1)."""
    indices, table, rowscale, byte_table = operands
    if not _g.HAVE_GLUON:
        raise RuntimeError("codebook_gluon needs triton.experimental.gluon")
    if x.dtype != torch.bfloat16:
        raise TypeError(f"the Gluon kernel takes bf16 activations, got {x.dtype}")
    n, mv = indices.shape
    k = x.shape[-1]
    if indices.dtype != torch.int16 or table.dtype != torch.int32 or rowscale.dtype != torch.float32:
        raise TypeError(f"expected int16 indices, int32 table words and fp32 row scales, got {indices.dtype}, "
                        f"{table.dtype}, {rowscale.dtype}")
    words_per_entry = 4 if byte_table else 1
    c = (table.numel() // words_per_entry).bit_length() - 1
    if table.numel() != words_per_entry << c or c > MAX_INDEX_BITS or rowscale.numel() != n:
        raise ValueError(f"table of {table.numel()} words (a power of two up to 2^{MAX_INDEX_BITS}) and "
                         f"{rowscale.numel()} row scales for {n} rows")
    if mv * VECTOR != k:
        raise ValueError(f"indices cover {mv * VECTOR} columns, x has {k}")
    lead = x.shape[:-1]
    x2, m = _g._x_rows(x)
    out_dtype = out_dtype or x.dtype
    if m == 0:
        return x.new_empty((*lead, n), dtype=out_dtype)
    config_key = (tuple(sorted(config.items())), tuple(sorted(_g.DEFAULTS.items())))
    cfg, plan, constexprs = _g._pipe_launch_plan(m, n, k, *config_key)
    if plan is None:
        raise ValueError("the codebook kernel is the pipelined one: STAGES must be >= 1")
    bn, split, nw = cfg["BLOCK_N"], cfg["SPLIT_K"], cfg["num_warps"]
    if n % bn or k % _g.TILE_K:
        raise ValueError(f"N ({n}) must be a multiple of BLOCK_N ({bn}) and K ({k}) of {_g.TILE_K}")
    if max(m, split) * max(n, k) * 16 >= 2**31:
        raise ValueError("too large for 32-bit indexing")
    idx = indices if indices.stride(-1) == 1 else indices.contiguous()
    if idx.stride(0) % 8 or idx.data_ptr() % 16:
        raise ValueError("the indices need 16-byte aligned rows")
    x32 = x2.view(torch.int32)
    y = torch.empty((m, n), device=x.device, dtype=out_dtype)
    ws, cnt = _g._split_k_buffers(y, split, bn, rowscale)
    has_bias = bias is not None
    consts = dict(constexprs, CB=True, TAB_N=table.numel(), TAB_BYTES=bool(byte_table))
    _g._launch_pipe(plan["G"], (x32, idx, table, rowscale, bias if has_bias else rowscale, y, ws, cnt,
                                m, n, k, x32.stride(0), y.stride(0)),
                    dict(HALF=False, HAS_BIAS=has_bias, SWN=idx.stride(0), SSN=0, **consts), nw, bool(cfg["PDL"]),
                    ("codebook", c, bool(byte_table), m, n, k, config_key, has_bias, idx.stride(0)))
    return y.reshape(*lead, n)
