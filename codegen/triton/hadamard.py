"""Triton kernel for the butterfly stages of the fast Hadamard transform.

``lowbit.hadamard.hadamard_transform`` applies ``H_n = H_m (x) S_p`` (``(m, p) =
decompose(n)``, ``p`` a power of two) as ``log2(p)`` butterfly stages over rows of length
``p`` followed by one ``m x m`` product. In torch every stage is two strided passes over the
activation (``u + w`` and ``u - w`` for the pairs at distance ``h = 1, 2, 4, ...``), so a
transform of an activation of 16K x 1536 costs 14 kernel launches and 14 round trips through
memory. :func:`fwht` does all the stages of a tile of rows in registers, in one pass: load,
``log2(p)`` stages of (reshape to ``[rows, p / 2h, 2, h]``, split the pair axis, join ``u + w``
and ``u - w``), store.

Exactness: every stage computes the same float32 sums and differences of the same operands
as the torch stages, in the same order, and IEEE addition is correctly rounded, so the output
equals ``_fwht_last``'s bit for bit (tested through the interpreter and, at full size, on an
H200 by tests/gpu/test_triton_gpu.py; timings in docs/benchmarks.md). The
``m x m`` product, the scaling and the casts stay in :func:`lowbit.hadamard.hadamard_transform`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_P = 8192  # one program holds BLOCK_R x p float32 values in registers
_TILE = 4096  # elements per program


@triton.jit
def _stage(x, BLOCK_R: tl.constexpr, P: tl.constexpr, H: tl.constexpr):
    """One butterfly stage: rows viewed as [p / 2h, 2, h]; (u, w) -> (u + w, u - w)."""
    pairs = tl.permute(tl.reshape(x, (BLOCK_R, P // (2 * H), 2, H)), (0, 1, 3, 2))
    u, w = tl.split(pairs)
    return tl.reshape(tl.permute(tl.join(u + w, u - w), (0, 1, 3, 2)), (BLOCK_R, P))


@triton.jit
def fwht_tile(x, BLOCK_R: tl.constexpr, P: tl.constexpr):
    """``x @ S_p`` of the rows of a [BLOCK_R, P] float32 tile in registers: the stages
    h = 1, 2, 4, ... < p in order (unrolled; the branches are resolved at compile time)."""
    if P > 1:
        x = _stage(x, BLOCK_R, P, 1)
    if P > 2:
        x = _stage(x, BLOCK_R, P, 2)
    if P > 4:
        x = _stage(x, BLOCK_R, P, 4)
    if P > 8:
        x = _stage(x, BLOCK_R, P, 8)
    if P > 16:
        x = _stage(x, BLOCK_R, P, 16)
    if P > 32:
        x = _stage(x, BLOCK_R, P, 32)
    if P > 64:
        x = _stage(x, BLOCK_R, P, 64)
    if P > 128:
        x = _stage(x, BLOCK_R, P, 128)
    if P > 256:
        x = _stage(x, BLOCK_R, P, 256)
    if P > 512:
        x = _stage(x, BLOCK_R, P, 512)
    if P > 1024:
        x = _stage(x, BLOCK_R, P, 1024)
    if P > 2048:
        x = _stage(x, BLOCK_R, P, 2048)
    if P > 4096:
        x = _stage(x, BLOCK_R, P, 4096)
    return x


@triton.jit
def _fwht_kernel(x_ptr, y_ptr, rows, P: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = r[:, None].to(tl.int64) * P + tl.arange(0, P)[None, :]
    mask = r[:, None] < rows
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, fwht_tile(x, BLOCK_R, P), mask=mask)


FWHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fwht(x: torch.Tensor, p: int) -> torch.Tensor:
    """``x @ S_p`` (unnormalised Sylvester transform) of the rows of a 2-D float32, float16 or
    bfloat16 tensor with ``x.shape[1] == p``, a power of two up to :data:`MAX_P`; a new float32
    tensor, equal bit for bit to :func:`lowbit.hadamard._fwht_last` of ``x.float()`` (half inputs
    are converted as they are loaded, which is exact, instead of in a float32 copy first)."""
    if x.dim() != 2 or x.shape[1] != p or p & (p - 1) or not 1 < p <= MAX_P or x.dtype not in FWHT_DTYPES:
        raise ValueError(f"fwht needs a 2-D float32/float16/bfloat16 tensor with rows of a power-of-two length "
                         f"p <= {MAX_P} (got {tuple(x.shape)} {x.dtype}, p={p})")
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    rows = x.shape[0]
    if rows == 0:
        return y
    block_r = max(1, min(_TILE // p, triton.next_power_of_2(rows)))
    _fwht_kernel[(triton.cdiv(rows, block_r),)](x, y, rows, P=p, BLOCK_R=block_r, num_warps=4)
    return y
