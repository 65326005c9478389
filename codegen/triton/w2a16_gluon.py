"""W2A16 decode kernel (M <= 16) in Triton's Gluon dialect: the dequantized weight is built
directly in the tensor-core operand registers, with no layout conversion. ``lowbit::qlinear``
runs it on CUDA for bf16 calls of at most ``MAX_M`` = 8 rows (:func:`gluon_unsupported`), on
weights repacked once per tensor (:func:`repacked`).

Two kernels share the tile math: the classic one (``STAGES=0``, :func:`_w2a16_gluon_kernel`,
operands loaded from global memory into registers) and the pipelined one (``STAGES >= 1``,
:func:`_w2a16_pipe_kernel`, words and scales through a shared-memory ring filled by cp.async,
x staged in shared memory). The default (and what qlinear runs) is the pipelined kernel with
``STAGES=2``, except where its shared memory would not fit (:func:`default_config`).

Measured on an H200 (2026-12-01, ``python bench/gluon_w2a16.py --configs ...``, M=1, Triton
3.6, torch 2.11; docs/benchmarks.md), us per call, in one run: the default (pipelined,
``STAGES=2``, BLOCK_N=64) / the same at BLOCK_N=128 / cuBLAS bf16: 8192 x 8192 12.71 / 12.67 /
34.3; 4096 x 4096 6.35 / 6.66 / 13.1; 4096 -> 11008 10.39 / 10.63 / 24.9; 11008 -> 4096 10.59 /
10.80 / 27.1; 4096 -> 12288 (q, k, v fused) 10.51 / 10.85 / 27.7; 4096 -> 22016 (gate and up
fused) 16.03 / 16.63 / 45.1: 2.1-2.8x cuBLAS. A simple Triton kernel that only reads the same
words and scales (the bench's read-ceiling row) takes 7.1 us at 8192 x 8192 (4.9x cuBLAS) and
4.2-8.8 us at the others: the GEMV runs at 53-66% of its speed. In an earlier run the same
day the classic kernel (``STAGES=0``, BLOCK_N=128) took 13.60, 7.07, 11.37, 12.20, 11.39 and
21.54 us at these shapes. Deeper cp.async rings were correct and slower (at 8192^2, BLOCK_N=128,
one run: STAGES=3 13.68 us, STAGES=4 16.27, against 12.73 for STAGES=2).
At M=16 (MP=16) the classic kernel was 2.3x slower than the ``tl.dot`` kernel, hence the
8-row limit.

Programmatic dependent launch (``PDL=True``, pipelined kernel only; off by default): the
kernel is launched so that it may start before the previous kernel on the stream has
finished. It requests its first STAGES - 1 ring positions of words and scales (weights, which
no kernel writes) and then waits (``griddepcontrol.wait``) for the previous grid before it
reads x or writes anything; after its main loop it lets the next PDL-launched kernel start.
Same bits as without (tests/gpu). H200, 2026-12-01 (torch 2.11, whose inductor kernels are not
PDL-launched): eight layer GEMVs back to back in a CUDA graph 87.1 us against 85.0 without;
the 8-layer compiled decode of ``bench/e2e.py --pdl`` 1752 against 1679 tokens/s.

Triton's CPU interpreter does not run Gluon: the CPU tests (tests/test_gluon_repack.py) check
the repacked format and replay the kernel's layouts and arithmetic in torch, thread by thread;
tests/gpu/test_gluon_w2a16.py runs the kernel itself.

Same math as :mod:`lowbit.codegen.triton.w2a16` (read its docstring first): code ``q`` of
group ``g`` (16 consecutive elements of a row) of row ``n`` has the value
``(q + h) * e4m3(S[n, g]) * global``, and ``y[m, n] = sum_k x[m, k] * value[n, k] + bias[n]``,
accumulated in fp32 and rounded once to the output dtype.

Why Gluon
---------
The Triton ``tl.dot`` kernel (``_w2a16_dot_kernel``) dequantizes in a layout of Triton's
choosing and then converts it to the tensor-core operand layout through shared memory (STSM,
barrier, LDSM) once per code pair, waiting for each product. Gluon states every layout, so
here the words are *loaded* in a layout chosen such that, after the register-only reshapes
below, the dequantized tile already *is* the ``mma.sync`` A operand layout:
``gl.convert_layout(..., assert_trivial=True)`` proves at compile time that the conversion
moves no data (it raises otherwise).

Repacked weight (:func:`repack_w2a16`, offline)
----------------------------------------------
One int32 word per group of 16 codes, same place as lowbit's packed format ([N, Kp/16], the
scales stay as they are), but inside the word

* field ``i`` (bits ``2i, 2i+1``, i < 8) holds code ``2i`` and field ``i + 8`` (bits
  ``16+2i, 17+2i``) holds code ``2i + 1``: the two codes of "pair i" sit 16 bits apart (one
  bf16x2 lane each) AND are the K-adjacent elements ``16g + 2i, 16g + 2i + 1``, so they meet
  the natural bf16 pair ``x[m, 16g + 2i : 16g + 2i + 2]`` (x needs no permutation: it is
  read as it is, 16 bytes per load);
* each field stores ``f = q + 2`` in [0, 3] (the ``^ 0xAAAAAAAA`` of w2a16.py done offline).

Dequantization (inline PTX, exact; see w2a16.py). A shift moves the two fields of pair i to
bits 5-6 and 21-22, ``lop3`` ORs in the exponent of 4 (bf16x2 ``{4 + f_lo, 4 + f_hi}``, the
fields in the top mantissa bits) and one ``fma.rn.bf16x2`` with ``{s, s}`` and
``{-(6 - h) s, ..}`` gives ``(q + h) s`` for both codes. On the int grid (h = 0) two pairs
share one shift: after a shift by ``2i - 3`` (i even) pair i sits at bits 3-4 / 19-20, where
the exponent of 16 makes ``16 + f``, and pair i + 1 at bits 5-6 / 21-22; the FMA offset
``-18 s`` is exact too (18 has 4 significant bits, s at most 4, bf16 keeps 8). So a word costs
4 shifts + 8 LOP3 + 8 HFMA2 on the int grid (1.25 instructions per weight) and 8 + 8 + 8 on
the half grid (where ``17.5 s`` would not be exact in bf16). Every value is exact in bf16, so
the tensor-core products are exact and only the fp32 accumulation rounds; the global scale
multiplies the fp32 accumulator at the end. ptxas folds the ``{s, s}`` broadcasts into the
HFMA2 operand selectors (``R.H0_H0``): no extra instruction.

Scale decoding (inline PTX, exact, subnormals and signs included). A thread reads the four
E4M3 bytes of its four groups of a row as one int32 word. One ``prmt`` per two groups puts
bytes u and u + 1 in the low bytes of the two halves and sign-replicated copies in the high
bytes; ``<< 4`` and ``& 0x87F0`` leave the bf16 bits ``(b & 0x7F) << 4 | (b & 0x80) << 8``,
which are the E4M3 value times ``2^-120`` (a bf16 subnormal for E4M3 subnormals); one
``fma.rn.bf16x2`` by ``2^120`` (bf16 arithmetic keeps subnormals) gives ``{s_u, s_u+1}`` and one
more per offset ``{-(6 - h) s, ..}`` / ``{-18 s, ..}``: 12 instructions per 4 groups.

Layouts (swap-AB ``mma.sync.m16n8k16``, ``mma_v2``; W rows are the MMA M dimension)
----------------------------------------------------------------------------------
PTX's fragments for lane ``L`` (``gid = L >> 2``, ``t = L & 3``): A (16 x 16) registers
``a0,a1`` = (row gid, k 2t, 2t+1), ``a2,a3`` = (row gid+8, same k), ``a4,a5`` = (row gid,
k 2t+8, 2t+9), ``a6,a7`` = (row gid+8, k 2t+8, 2t+9); B (16 x 8): ``b0,b1`` = (k 2t, 2t+1,
col gid), ``b2,b3`` = (k 2t+8, 2t+9, col gid); C (16 x 8): ``c0,c1`` = (row gid, col 2t,
2t+1), ``c2,c3`` = (row gid+8, ...).

The order of K inside a product is free (the same on both sides). One *tile* covers 16 groups
(256 elements of K) of ``BLOCK_N`` rows; group ``g = 4t + u`` of the tile goes to the lanes
with ``t = L & 3`` (u < 4 in registers). Tile word (row, g) is loaded by the thread with
``gid = row % 8`` and ``t = g // 4`` (four consecutive words of a row: one 16-byte load), rows
``gid + 8h + 16 warp + 16 num_warps r`` (h, r: registers). For each ``u`` one ``mma_v2`` over
64 logical K indices

    k = j + 2 t + 8 i0 + 16 i1 + 32 i2   <->   actual K  16 (g0 + 4t + u) + 2i + j,

``i = i0 + 2 i1 + 4 i2`` the pair and ``j`` its half: bits j, i0 land in A's registers (the
bf16x2 halves and a4..a7), t in the lanes, (i1, i2) pick one of the four k16 steps, so the
thread's own word (row, 4t + u) feeds exactly its own A registers. On the x side the same
k is ``x[m, 16 (g0 + 4t + u) + 2i + j]``: the thread with ``t`` loads the 64 consecutive
elements ``[64t, 64t + 64)`` of the tile as 32 bf16 pairs (eight 16-byte loads; the B column
``m = gid``, rows clamped to M - 1 and never stored beyond M) and each pair already is a B
register (``b0,b1`` for even i, ``b2,b3`` for odd i).

In Gluon terms (:func:`layout_bases`): words [BLOCK_N, 16] are loaded in the
``DistributedLinearLayout`` ``WL`` (reg bases: g 1, 2, row 8, row repetitions; lanes: g 4, 8,
rows 1, 2, 4; warps: rows 16, 32, ...), scale words [BLOCK_N, 4] in ``SL`` (the same without
the g registers), x words [MP, 128] in ``XL`` (reg: word 1, 2, 4 (pair i), 8, 16 (u), col 8
if MP = 16; lanes: word 32, 64 (t), cols 1, 2, 4; warps: broadcast). ``gl.split`` separates
the four words of a row (a register dimension), the eight pairs are ``gl.join``-ed and
``gl.permute`` + ``gl.reshape`` relabel them to the logical k above; these only rename
registers, and every ``convert_layout`` (to the ``DotOperandLayout`` of A and B, and of the
scales to the words' layout) is asserted trivial at compile time. Emulations in pure torch
check the reasoning on the CPU (tests/test_gluon_repack.py): :func:`emulate_tile_ops` replays
the kernel's op chain on whole tensors, :func:`emulate_fragments` the data flow per thread
and register into PTX's fragments.

K is split across programs (``SPLIT_K``): each stores its fp32 partial tile, the last to arrive
sums them in a fixed order (the serial reduction of w2a16.py; no memset, deterministic). With
``PREFETCH`` the next tile's words, scales and x are loaded before the current tile is used;
``UNROLL2`` (two tiles per iteration, set where every split has an even tile count) removes
the register copies of that double buffer. Shapes: N a multiple of BLOCK_N, K of 256 (the
kernel has no masked tail), M <= 16, bf16 x.

Pipelined variant (``STAGES >= 1``, :func:`_w2a16_pipe_kernel`; the default, ``STAGES=2``)
------------------------------------------------------------------------------------------
Same tiles, dequantization and MMA as above (``_step``), so the same exact products; only where
the operands come from differ.

* Work items. A work item is (row block, K share of ``TPI = ceil(tiles / SPLIT_K)`` tiles);
  program p computes item p: row block ``p // SPLIT_K``, share ``p % SPLIT_K``, its tiles
  forming the stream positions ``j = 0 .. TPI - 1``. The last shares may hold fewer tiles
  than TPI (any count, also not a multiple of STAGES, also one or none): positions past K are
  fetched as nothing (cp.async, zero fill) and skipped; an empty share stores a zero partial.
  The epilogue is the serial split-K reduction above.
* W ring. Words and scale words of stream position p go to ring slot ``p % STAGES`` (shared
  memory, plain row-major [BLOCK_N, 16] / [BLOCK_N, 4] int32 per slot): at step j the program
  issues position ``j + STAGES - 1`` and then waits for position j, so ``STAGES - 1`` tiles are
  in flight while one is computed. Each thread cp.asyncs exactly the words / scale words it
  later reads (the WL / SL layouts: 4 x 16 B + 4 x 4 B per tile at BLOCK_N=128, one commit
  group per position, ``wait_group(STAGES - 1)``). The register side is unchanged:
  ``.load(WL)`` / ``.load(SL)`` give the registers the classic kernel loads from global memory
  (one LDS.128 per 4 words, conflict-free: a warp quarter reads two whole 64-byte rows; the
  scale load becomes one LDSM.x4), and every ``convert_layout`` stays ``assert_trivial``.
  Triton's shared-memory barrier analysis does not know that the cp.async slots are private
  per thread (nor which slot a dynamic index names): it puts a CTA barrier before the step's
  copies (they write the ring the previous step read) and one after the wait (the reads follow
  copies into the same ring).
* x staged per work item. The item's x rows (``XR`` = M rounded up to a power of two, row m
  copied from ``min(m, M - 1)``) go to shared memory once, as ``XT`` (TPI rounded up) tiles of
  [XR * 4, 32] int32: row ``4m + t`` holds the 32 words (bf16 pairs) ``32t .. 32t + 31`` of the
  tile (x words ``32t + 8u + i`` as in the classic kernel). The 16-byte chunk c of row r is
  stored at chunk ``c ^ (r % 8)``, so the LDS.128 of a warp quarter (t = 0..3 and two m, or
  four t rows broadcast to all m when XR = 1) hit different banks. Per group column u, a
  thread loads words ``8u .. 8u + 7`` of its row (two LDS.128) in the layout ``XSL``
  (:func:`pipe_layout_bases`): lanes t -> rows 1, 2, lanes gid -> m = gid % XR; the tensor is
  then broadcast in registers from XR to MP rows ([XR, 4, 8] -> [MP/XR, XR, 4, 8] -> [MP, 4,
  8]: column m of the MMA gets row m % XR, which is row m for every m < M; columns >= M are
  never stored) and enters ``_step`` as the classic kernel's x of that column, with the B
  conversion still asserted trivial. So x costs 8 LDS.128 per tile and thread instead of 8
  LDG.128 into 32 registers of a double buffer. The copy of an item's x rides with the commit
  group of position 0 (:func:`_issue_x`, issued once, just before position 0), and a CTA
  barrier at step 0 (after its wait) makes all threads' pieces visible.
* The bug of the first version (STAGES >= 3, measured wrong on the H200, err 0.2-1.0): the x
  copy was issued with *every* stream position, switched off by its mask for all but an item's
  first tile. A masked cp.async is not "no copy": Triton lowers it to ``cp.async ... 16,
  src_size`` with src_size 0, which still writes 16 zero bytes. So the prologue positions
  1 .. STAGES - 2 zero-filled the staged x, in commit groups that land after the barrier of
  step 0. With STAGES=2 position 0 is the only prologue position and the loop issued no x:
  correct. Now x is copied exactly once.
* Numerics: the products are the classic kernel's (exact), the MMA sequence of a tile and the
  order of tiles and of the split-K reduction too, so the result is bit for bit the classic
  kernel's with the same BLOCK_N, warps and SPLIT_K (MMA columns >= M see other x rows, but
  columns do not mix). Repeated calls are bit-identical (tests/gpu/test_gluon_w2a16.py checks
  both).
* Removed options. A TMA-filled ring (mbarrier per slot), two rings of alternating positions
  with one barrier per tile (RING2), a second accumulator (ACC2) and a ptxas register cap
  (MAXNREG=96) were built, verified correct on the H200 and measured (2026-12-01, six shapes,
  M=1): none was more than 2% faster than STAGES=2 at any shape, most were slower (at 8192^2,
  BLOCK_N=128, one run: TMA STAGES=3 13.45 us, RING2 STAGES=2 13.05, against 12.73 for
  STAGES=2), so they were removed as not paying for their code.

Compile facts of the pipelined variant (Triton 3.6, sm_90, compiled without a GPU, K=N=8192,
M=1, BLOCK_N=128, 4 warps, split-K 8, TPI 4). Default STAGES=2: 100 registers, no spills, 22 KB
shared memory, 500 SASS instructions per tile in the main loop = 1.95 per weight, 3 BAR.SYNC
(77 registers at 4096^2, 94 at 11008 -> 4096, 100 at 4096 -> 11008 / 12288 / 22016; M=8: 100,
36 KB; M=12 (MP=16): 150). STAGES=4: 94 registers, no spills, 42 KB shared memory (5 programs
per SM), 492 SASS instructions per tile in the main loop = 1.92 per weight (the classic loop's
~410 of dequantization / HMMA / scale decoding, plus 8 LDGSTS with their 64-bit addresses, 15
LDS + 1 LDSM, ~20 uniform-datapath instructions of the stream bookkeeping, 3 BAR.SYNC);
8 (STAGES - 1) cp.async of 16 / 4 bytes in flight per thread. (The BAR.SYNC counts include the
x barrier, taken at step 0 only.) At the default BLOCK_N=64 (split-K 4, TPI 8, same K, N, M):
60 registers, no spills, 14 KB shared memory, 277 SASS instructions per tile in the main loop =
2.16 per weight (M=8, 11008 -> 4096: 55 registers, 42 KB, 2.17 per weight).

Compile facts (Triton 3.6, sm_90, compiled without a GPU; BLOCK_N=64, 4 warps, split-K 4,
MP=8, int grid, UNROLL2; BLOCK_N=128, its default before the pipelined kernel, has 128 registers
and 1.72 instructions per weight): 86 registers, no spills, 4 bytes of shared memory (the broadcast of
the split-K counter's atomic); no st.shared / ld.shared / ldmatrix / stmatrix for W or x. Main
loop: 225 SASS instructions per tile = 1.76 per weight (128 weights per thread and tile:
64 HFMA2 + 68 LOP3 + 24 shifts of the dequantization, 16 HMMA, 12 LDG (2 x 16 B of words, 2 x
4 B of scales, 8 x 16 B of x), 12 scale-decoding instructions per word, addressing). Half
grid 1.97, MP=16 2.02 per weight. For comparison the Triton skinny kernel: 3.8 per weight
and a shared-memory round trip per code pair.
"""
from __future__ import annotations

import functools

import torch

try:  # Gluon exists from Triton 3.4 on; keep the module importable without it (CPU tests)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    HAVE_GLUON = True
except Exception:  # pragma: no cover - no triton or too old
    HAVE_GLUON = False


# ----------------------------------------------------------------------------------------
# repacked weight format (pure torch)
# ----------------------------------------------------------------------------------------

def _codes_of(packed: torch.Tensor) -> torch.Tensor:
    """int8 [N, Kp] two's complement codes of lowbit's packed uint8 [N, Kp/4] format."""
    from lowbit.formats import unpack_codes

    return unpack_codes(packed, 2)


def repack_codes(codes: torch.Tensor) -> torch.Tensor:
    """int32 [N, Kp/16] repacked words of int8 codes [N, Kp] in [-2, 1] (module docstring):
    field i holds ``code[16g + 2i] + 2``, field i + 8 holds ``code[16g + 2i + 1] + 2``."""
    n, kp = codes.shape
    if kp % 16:
        raise ValueError(f"K ({kp}) must be a multiple of 16")
    f = (codes.to(torch.int64) + 2).reshape(n, kp // 16, 8, 2)  # [..., i, j] = code 2i + j
    if bool(((f < 0) | (f > 3)).any()):
        raise ValueError("2-bit codes must lie in [-2, 1]")
    shifts = 2 * torch.arange(8, dtype=torch.int64, device=codes.device)
    word = (f[..., 0] << shifts).sum(-1) + ((f[..., 1] << shifts).sum(-1) << 16)
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def repack_w2a16(packed: torch.Tensor) -> torch.Tensor:
    """Repack lowbit's uint8 [N, Kp/4] 2-bit weight into the int32 [N, Kp/16] words of the
    Gluon kernel (offline; the E4M3 scales and the global scale are used unchanged)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"expected lowbit's packed uint8 [N, Kp/4] weight, got {packed.dtype} {tuple(packed.shape)}")
    return repack_codes(_codes_of(packed))


def unpack_repacked(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`repack_codes`: int8 codes [N, 16 * words.shape[1]]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = 2 * torch.arange(8, dtype=torch.int64, device=words.device)
    lo = (w.unsqueeze(-1) >> shifts) & 3           # [N, G, i]: code 2i + 2
    hi = (w.unsqueeze(-1) >> (shifts + 16)) & 3    # code 2i + 1 + 2
    return (torch.stack([lo, hi], -1) - 2).reshape(words.shape[0], -1).to(torch.int8)


# ----------------------------------------------------------------------------------------
# layouts (host side, passed to the kernel as constexprs)
# ----------------------------------------------------------------------------------------

def _lg(v: int) -> int:
    b = v.bit_length() - 1
    if v <= 0 or (1 << b) != v:
        raise ValueError(f"{v} is not a power of two")
    return b


def layout_bases(block_n: int, mp: int, num_warps: int) -> dict:
    """Linear-layout bases (lists of [row, col] per register / lane / warp bit) of the tiles the
    kernel loads (module docstring): words ``w`` [BLOCK_N, 16] (g = 4t + u), scale words ``s``
    [BLOCK_N, 4] (word t = bytes of groups 4t..4t+3) and x words ``x`` [MP, 128] (bf16 pairs:
    x word 32t + 8u + i holds elements 16(4t + u) + 2i + (0, 1)). Plain lists, also used by
    :func:`emulate_fragments`."""
    rb = block_n // (16 * num_warps)
    if rb < 1 or rb * 16 * num_warps != block_n:
        raise ValueError(f"BLOCK_N ({block_n}) must be 16 * num_warps ({num_warps}) * a power of two")
    if mp not in (8, 16):
        raise ValueError("MP must be 8 or 16")
    rows = [[1, 0], [2, 0], [4, 0]]
    row_reps = [[16 * num_warps << r, 0] for r in range(_lg(rb))]
    warps = [[16 << b, 0] for b in range(_lg(num_warps))]
    w = dict(reg=[[0, 1], [0, 2], [8, 0]] + row_reps, lane=[[0, 4], [0, 8]] + rows, warp=warps, shape=[block_n, 16])
    sc = dict(reg=[[8, 0]] + row_reps, lane=[[0, 1], [0, 2]] + rows, warp=warps, shape=[block_n, 4])
    x = dict(reg=[[0, 1], [0, 2], [0, 4], [0, 8], [0, 16]] + ([[8, 0]] if mp == 16 else []),
             lane=[[0, 32], [0, 64]] + rows, warp=[[0, 0] for _ in range(_lg(num_warps))], shape=[mp, 128])
    return dict(w=w, s=sc, x=x)


def _layouts(block_n: int, mp: int, num_warps: int):
    b = layout_bases(block_n, mp, num_warps)
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])
    a_l = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    lin = {key: gl.DistributedLinearLayout(reg_bases=v["reg"], lane_bases=v["lane"], warp_bases=v["warp"],
                                           block_bases=[], shape=v["shape"]) for key, v in b.items()}
    return lin["w"], lin["s"], lin["x"], mma, a_l, b_l


def _spread(bits: list, lanes: int, warps: int):
    """Distribute the coordinate bits ``bits`` (basis vectors, lowest first) over 5 lane bits,
    then ``warps`` warp bits, the rest over registers; lanes/warps left over get zero bases
    (those threads duplicate others). Returns (reg, lane, warp) basis lists."""
    rank = len(bits[0]) if bits else 1
    zero = [0] * rank
    lane = bits[:lanes] + [zero] * max(0, lanes - len(bits))
    warp = bits[lanes:lanes + warps] + [zero] * max(0, warps - len(bits[lanes:]))
    return bits[lanes + warps:], lane, warp


def pipe_layout_bases(block_n: int, mp: int, xr: int, xt: int, num_warps: int) -> dict:
    """Linear-layout bases of the pipelined kernel's x path (module docstring, "Pipelined
    variant"), on top of :func:`layout_bases`:

    * ``xs``: the load of one group column u of a staged x tile, shared-memory view
      [XR*4, 8] (row ``4m + t``, word i = bf16 pair i of group ``4t + u``): reg: words 1, 2, 4
      (and row 32, the m bit 3, if MP = 16); lanes: rows 1, 2 (t), then the m bits 0..2 (rows 4,
      8, 16) below XR, zero (broadcast) above; warps: zero (every warp reads all of x);
    * ``x4``: [MP/XR, XR, 4, 8], the same registers after the broadcast of the XR stored rows
      to the MP columns of the MMA (m = XR d0 + d1): the m bits below XR go to d1, above to d0;
    * ``xc``: the cp.async staging copy of a work item's x, [XT, XR*4, 32] words, 4 words (16
      bytes) per thread and copy: lanes over the 8 chunks of a row then rows, then tiles,
      warps next, registers for the rest.
    """
    lxr, lmp, lw = _lg(xr), _lg(mp), _lg(num_warps)
    if xr > mp or mp not in (8, 16):
        raise ValueError(f"XR ({xr}) must be a power of two <= MP ({mp}), MP 8 or 16")
    mrow = [[4 << b, 0] if b < lxr else [0, 0] for b in range(lmp)]            # m bit b in [XR*4, 8]
    xs = dict(reg=[[0, 1], [0, 2], [0, 4]] + mrow[3:], lane=[[1, 0], [2, 0]] + mrow[:3],
              warp=[[0, 0]] * lw, shape=[xr * 4, 8])
    m4 = [[0, 1 << b, 0, 0] if b < lxr else [1 << (b - lxr), 0, 0, 0] for b in range(lmp)]
    x4 = dict(reg=[[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4]] + m4[3:], lane=[[0, 0, 1, 0], [0, 0, 2, 0]] + m4[:3],
              warp=[[0, 0, 0, 0]] * lw, shape=[mp // xr, xr, 4, 8])
    bits = [[0, 0, 4], [0, 0, 8], [0, 0, 16]] + [[0, 1 << b, 0] for b in range(_lg(xr * 4))] + \
        [[1 << b, 0, 0] for b in range(_lg(xt))]
    reg, lane, warp = _spread(bits, 5, lw)
    xc = dict(reg=[[0, 0, 1], [0, 0, 2]] + reg, lane=lane, warp=warp, shape=[xt, xr * 4, 32])
    return dict(xs=xs, x4=x4, xc=xc)


def _pipe_layouts(block_n: int, mp: int, xr: int, xt: int, num_warps: int):
    b = pipe_layout_bases(block_n, mp, xr, xt, num_warps)
    lin = {key: gl.DistributedLinearLayout(reg_bases=v["reg"], lane_bases=v["lane"], warp_bases=v["warp"],
                                           block_bases=[], shape=v["shape"]) for key, v in b.items()}
    flat = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    # x tiles: 16-byte chunk c of row r stored at chunk c ^ (r % 8): the four t rows (and the
    # m rows) one warp quarter reads in one LDS.128 fall into different banks
    xsw = gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[2, 1, 0])
    xsw2 = gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0])
    return lin["xs"], lin["x4"], lin["xc"], flat, xsw, xsw2


# ----------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------

if HAVE_GLUON:

    _SCALE_ASM = """{
            .reg .b32 a, b, c, z, sa, sb, oa, ob, pa, pb;
            prmt.b32 a, $12, 0, 0x9180;
            prmt.b32 b, $12, 0, 0xB3A2;
            shl.b32 a, a, 4;
            shl.b32 b, b, 4;
            and.b32 a, a, 0x87F087F0;
            and.b32 b, b, 0x87F087F0;
            mov.b32 c, 0x7B807B80;
            mov.b32 z, 0x80008000;
            fma.rn.bf16x2 sa, a, c, z;
            fma.rn.bf16x2 sb, b, c, z;
            mov.b32 c, OFF4;
            fma.rn.bf16x2 oa, sa, c, z;
            fma.rn.bf16x2 ob, sb, c, z;
            mov.b32 c, OFF16;
            fma.rn.bf16x2 pa, sa, c, z;
            fma.rn.bf16x2 pb, sb, c, z;
            mov.b32 {$0, $1}, sa;
            mov.b32 {$2, $3}, sb;
            mov.b32 {$4, $5}, oa;
            mov.b32 {$6, $7}, ob;
            mov.b32 {$8, $9}, pa;
            mov.b32 {$10, $11}, pb;
            }"""
    # int grid: -(4 + 2) s and -(16 + 2) s; half grid: -(4 + 2 - 1/2) s (the C = 16 fields are not used)
    _SCALE_ASM_INT = gl.constexpr(_SCALE_ASM.replace("OFF4", "0xC0C0C0C0").replace("OFF16", "0xC190C190"))
    _SCALE_ASM_HALF = gl.constexpr(_SCALE_ASM.replace("OFF4", "0xC0B0C0B0").replace("OFF16", "0xC0B0C0B0"))

    @gluon.jit
    def _scales4(sw, HALF: gl.constexpr):
        """bf16 ``s_u``, ``-(6 - h) s_u`` and ``-18 s_u`` (u < 4) of int32 words ``sw`` holding
        four E4M3 bytes (byte u = group u). A ``prmt`` puts bytes u, u+1 in the low bytes of the
        two halves of a word and their sign-replicated copies in the high bytes; a shift by 4 and
        an AND with 0x87F0 leave the bf16 bits ``(b & 0x7F) << 4 | (b & 0x80) << 8`` (the E4M3
        value times 2^-120, a bf16 subnormal for E4M3 subnormals) in both halves; one bf16x2
        FMA by 2^120 (then one per offset) per two groups. All exact."""
        if HALF:
            asm: gl.constexpr = _SCALE_ASM_HALF
        else:
            asm: gl.constexpr = _SCALE_ASM_INT
        return gl.inline_asm_elementwise(
            asm=asm, constraints="=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,r", args=[sw],
            dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16,
                   gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16),
            is_pure=True, pack=1)

    @gluon.jit
    def _halves(v):
        """bf16 (low half, high half) of int32 v (a register rename)."""
        return gl.inline_asm_elementwise(asm="mov.b32 {$0, $1}, $2;", constraints="=h,=h,r", args=[v],
                                         dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)

    _PAIR_ASM = """{
            .reg .b32 t, c, d, r;
            lop3.b32 t, $2, MASK, EXPO, 0xEA;
            mov.b32 c, {$3, $3};
            mov.b32 d, {$4, $4};
            fma.rn.bf16x2 r, t, c, d;
            mov.b32 {$0, $1}, r;
            }"""
    _PAIR_ASM_C4 = gl.constexpr(_PAIR_ASM.replace("MASK", "0x00600060").replace("EXPO", "0x40804080"))
    _PAIR_ASM_C16 = gl.constexpr(_PAIR_ASM.replace("MASK", "0x00180018").replace("EXPO", "0x41804180"))

    @gluon.jit
    def _shift(w, SH: gl.constexpr):
        """w >> SH (SH < 0: w << -SH); bits shifted in are masked away later."""
        if SH < 0:
            v = w << (-SH)
        elif SH > 0:
            v = w >> SH
        else:
            v = w
        return v

    @gluon.jit
    def _pair(v, s, o, C16: gl.constexpr):
        """[.., 2] bf16 ``(q + h) s`` of the two fields at bits 5-6 and 21-22 of v (``C16``: bits
        3-4 and 19-20): lop3 makes the bf16x2 ``C + f`` (C = 4 or 16, the fields in the top
        mantissa bits under the exponent of C) and fma.rn.bf16x2 gives ``(C + f) s + o`` with
        ``o = -(C + 2 - h) s``."""
        if C16:
            asm: gl.constexpr = _PAIR_ASM_C16
        else:
            asm: gl.constexpr = _PAIR_ASM_C4
        lo, hi = gl.inline_asm_elementwise(asm=asm, constraints="=h,=h,r,h,h", args=[v, s, o],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        return gl.join(lo, hi)

    @gluon.jit
    def _step(acc, w, s, o4, o16, xu, HALF: gl.constexpr, BLOCK_N: gl.constexpr, MP: gl.constexpr,
              AL: gl.constexpr, BL: gl.constexpr):
        """acc + one mma_v2 over the 4 groups (one per lane t) of words w [BLOCK_N, 4] against
        xu [MP, 4, 16] (x elements of those groups, natural order). Pair i (codes 2i, 2i+1 in
        fields i, i+8) is shifted so that its fields reach bits 5-6 / 21-22 (C = 4). On the int
        grid the even pairs use bits 3-4 / 19-20 (C = 16, exact there since 18 s fits bf16) and
        share the shift of the odd pair after them: 4 shifts per word instead of 8."""
        if HALF:
            p0 = _pair(_shift(w, -5), s, o4, False)
            p1 = _pair(_shift(w, -3), s, o4, False)
            p2 = _pair(_shift(w, -1), s, o4, False)
            p3 = _pair(_shift(w, 1), s, o4, False)
            p4 = _pair(_shift(w, 3), s, o4, False)
            p5 = _pair(_shift(w, 5), s, o4, False)
            p6 = _pair(_shift(w, 7), s, o4, False)
            p7 = _pair(_shift(w, 9), s, o4, False)
        else:
            v = _shift(w, -3)
            p0 = _pair(v, s, o16, True)
            p1 = _pair(v, s, o4, False)
            v = _shift(w, 1)
            p2 = _pair(v, s, o16, True)
            p3 = _pair(v, s, o4, False)
            v = _shift(w, 5)
            p4 = _pair(v, s, o16, True)
            p5 = _pair(v, s, o4, False)
            v = _shift(w, 9)
            p6 = _pair(v, s, o16, True)
            p7 = _pair(v, s, o4, False)
        return _mma_pairs(acc, p0, p1, p2, p3, p4, p5, p6, p7, xu, BLOCK_N, MP, AL, BL)

    @gluon.jit
    def _mma_pairs(acc, p0, p1, p2, p3, p4, p5, p6, p7, xu, BLOCK_N: gl.constexpr, MP: gl.constexpr,
                   AL: gl.constexpr, BL: gl.constexpr):
        """acc + one mma_v2 of the A tile made of the bf16 pairs p_i [BLOCK_N, 4, 2] (pair i of the
        group of lane t: K elements 2i, 2i + 1) against xu [MP, 4, 16] (x elements of those groups,
        natural order); every layout conversion is asserted trivial."""
        # dims (n, t, j, i0, i1, i2) -> (n, i2, i1, i0, t, j): k = j + 2t + 8 i0 + 16 i1 + 32 i2
        a = gl.join(gl.join(gl.join(p0, p1), gl.join(p2, p3)), gl.join(gl.join(p4, p5), gl.join(p6, p7)))
        a = gl.reshape(gl.permute(a, (0, 5, 4, 3, 1, 2)), [BLOCK_N, 64])
        a = gl.convert_layout(a, AL, assert_trivial=True)
        # x: (m, t, c = 2i + j) -> (m, i, t, j), then transposed to [64, MP]
        xb = gl.permute(gl.reshape(xu, [MP, 4, 8, 2]), (0, 2, 1, 3))
        xb = gl.permute(gl.reshape(xb, [MP, 64]), (1, 0))
        xb = gl.convert_layout(xb, BL, assert_trivial=True)
        return mma_v2(a, xb, acc)

    @gluon.jit
    def _tile_operands(w, sw, HALF: gl.constexpr, BLOCK_N: gl.constexpr):
        """The four word columns u of a tile (words w [BLOCK_N, 16], group g = 4t + u) and the
        bf16 scale operands of each (``_scales4`` of the scale words sw), in the words' layout
        (conversions asserted trivial)."""
        s0, s1, s2, s3, o0, o1, o2, o3, q0, q1, q2, q3 = _scales4(sw, HALF)
        # u = 2a + b: the first split takes b (the last dimension), the second a
        we, wo = gl.split(gl.reshape(w, [BLOCK_N, 4, 2, 2]))
        w0, w2 = gl.split(we)
        w1, w3 = gl.split(wo)
        lay: gl.constexpr = w0.type.layout
        s0 = gl.convert_layout(s0, lay, assert_trivial=True)
        s1 = gl.convert_layout(s1, lay, assert_trivial=True)
        s2 = gl.convert_layout(s2, lay, assert_trivial=True)
        s3 = gl.convert_layout(s3, lay, assert_trivial=True)
        o0 = gl.convert_layout(o0, lay, assert_trivial=True)
        o1 = gl.convert_layout(o1, lay, assert_trivial=True)
        o2 = gl.convert_layout(o2, lay, assert_trivial=True)
        o3 = gl.convert_layout(o3, lay, assert_trivial=True)
        q0 = gl.convert_layout(q0, lay, assert_trivial=True)
        q1 = gl.convert_layout(q1, lay, assert_trivial=True)
        q2 = gl.convert_layout(q2, lay, assert_trivial=True)
        q3 = gl.convert_layout(q3, lay, assert_trivial=True)
        return w0, w1, w2, w3, s0, s1, s2, s3, o0, o1, o2, o3, q0, q1, q2, q3

    @gluon.jit
    def _tile(acc, w, sw, xw, HALF: gl.constexpr, BLOCK_N: gl.constexpr, MP: gl.constexpr,
              AL: gl.constexpr, BL: gl.constexpr):
        """acc + the products of one tile of 16 groups: words w [BLOCK_N, 16] (group g = 4t + u),
        scale words sw [BLOCK_N, 4] (byte u of word t: group 4t + u), x words xw [MP, 128]
        (bf16 pairs of the 256 x elements)."""
        w0, w1, w2, w3, s0, s1, s2, s3, o0, o1, o2, o3, q0, q1, q2, q3 = _tile_operands(w, sw, HALF, BLOCK_N)
        # x: pairs -> elements; k = 64 t + 16 u + c -> (m, t, c, u)
        xlo, xhi = _halves(xw)
        xt = gl.reshape(gl.join(xlo, xhi), [MP, 256])
        xr = gl.permute(gl.reshape(xt, [MP, 4, 4, 16]), (0, 1, 3, 2))
        xe, xo = gl.split(gl.reshape(xr, [MP, 4, 16, 2, 2]))
        x0, x2 = gl.split(xe)
        x1, x3 = gl.split(xo)
        acc = _step(acc, w0, s0, o0, q0, x0, HALF, BLOCK_N, MP, AL, BL)
        acc = _step(acc, w1, s1, o1, q1, x1, HALF, BLOCK_N, MP, AL, BL)
        acc = _step(acc, w2, s2, o2, q2, x2, HALF, BLOCK_N, MP, AL, BL)
        acc = _step(acc, w3, s3, o3, q3, x3, HALF, BLOCK_N, MP, AL, BL)
        return acc

    @gluon.jit
    def _w2a16_gluon_kernel(
        x_ptr, w_ptr, s_ptr, g_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
        HALF: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, MP: gl.constexpr,
        SPLIT_K: gl.constexpr, PREFETCH: gl.constexpr, UNROLL2: gl.constexpr,
        WL: gl.constexpr, SL: gl.constexpr, XL: gl.constexpr, MMA: gl.constexpr, AL: gl.constexpr,
        BL: gl.constexpr,
    ):
        """One program: rows [pid_n * BLOCK_N, +BLOCK_N) over a 1/SPLIT_K share of the K tiles
        (256 elements each; module docstring). ``x_ptr``, ``s_ptr``: int32 views (bf16 pairs,
        four E4M3 bytes); strides in int32 words. ``PREFETCH``: the next tile's words, scales
        and x are loaded before the current tile is used (register double buffering)."""
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        tiles = K // 256
        per = (tiles + SPLIT_K - 1) // SPLIT_K
        t_lo = pid_k * per
        t_hi = gl.minimum(t_lo + per, tiles)
        offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WL))
        offs_g = gl.arange(0, 16, layout=gl.SliceLayout(0, WL))
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_g[None, :]
        offs_sn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, SL))
        offs_st = gl.arange(0, 4, layout=gl.SliceLayout(0, SL))
        s_ptrs = s_ptr + offs_sn[:, None] * stride_sn + offs_st[None, :]
        rows_x = gl.minimum(gl.arange(0, MP, layout=gl.SliceLayout(1, XL)), M - 1)
        offs_k = gl.arange(0, 128, layout=gl.SliceLayout(0, XL))
        x_ptrs = x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :]
        acc = gl.zeros([BLOCK_N, MP], gl.float32, layout=MMA)
        if PREFETCH:
            t0 = gl.minimum(t_lo, tiles - 1)
            wa = gl.load(w_ptrs + t0 * 16)
            sa = gl.load(s_ptrs + t0 * 4)
            xa = gl.load(x_ptrs + t0 * 128)
            if UNROLL2:
                # two tiles per iteration, alternating register sets (no copies between them);
                # the launcher sets UNROLL2 only where every split has an even tile count
                for t in range(t_lo, t_hi, 2):
                    tb = gl.minimum(t + 1, t_hi - 1)
                    wb = gl.load(w_ptrs + tb * 16)
                    sb = gl.load(s_ptrs + tb * 4)
                    xb = gl.load(x_ptrs + tb * 128)
                    acc = _tile(acc, wa, sa, xa, HALF, BLOCK_N, MP, AL, BL)
                    ta = gl.minimum(t + 2, t_hi - 1)
                    wa = gl.load(w_ptrs + ta * 16)
                    sa = gl.load(s_ptrs + ta * 4)
                    xa = gl.load(x_ptrs + ta * 128)
                    acc = _tile(acc, wb, sb, xb, HALF, BLOCK_N, MP, AL, BL)
            else:
                for t in range(t_lo, t_hi):
                    w = wa
                    sw = sa
                    xw = xa
                    tn = gl.minimum(t + 1, t_hi - 1)
                    wa = gl.load(w_ptrs + tn * 16)
                    sa = gl.load(s_ptrs + tn * 4)
                    xa = gl.load(x_ptrs + tn * 128)
                    acc = _tile(acc, w, sw, xw, HALF, BLOCK_N, MP, AL, BL)
        else:
            for t in range(t_lo, t_hi):
                w = gl.load(w_ptrs + t * 16)
                sw = gl.load(s_ptrs + t * 4)
                xw = gl.load(x_ptrs + t * 128)
                acc = _tile(acc, w, sw, xw, HALF, BLOCK_N, MP, AL, BL)
        _finish(acc, pid_n, pid_k, M, N, g_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym, HAS_BIAS, BLOCK_N, MP,
                SPLIT_K, MMA)

    # ------------------------------------------------------------------------------------
    # pipelined variant (module docstring, "Pipelined variant")
    # ------------------------------------------------------------------------------------

    @gluon.jit
    def _x_u(xt, U: gl.constexpr, MP: gl.constexpr, XR: gl.constexpr, XSL: gl.constexpr, X4: gl.constexpr):
        """bf16 [MP, 4, 16] x of group column u of a staged tile (shared view xt [XR*4, 32]: row
        ``4m + t``, word ``8u + i`` = elements ``2i, 2i+1`` of group ``4t + u``), the layout
        ``_step`` takes. The XR stored rows are broadcast in registers to the MP MMA columns
        (column m gets row m % XR; columns m >= M are never stored)."""
        xw = xt.slice(8 * U, 8, dim=1).load(XSL)
        xw = gl.convert_layout(gl.reshape(xw, [XR, 4, 8]), gl.SliceLayout(0, X4), assert_trivial=True)
        xw, _ = gl.broadcast(gl.expand_dims(xw, 0), gl.full([MP // XR, XR, 4, 8], 0, gl.int32, X4))
        lo, hi = _halves(gl.reshape(xw, [MP, 4, 8]))
        return gl.reshape(gl.join(lo, hi), [MP, 4, 16])

    @gluon.jit
    def _tile_pipe(acc, w, sw, xt, HALF: gl.constexpr, BLOCK_N: gl.constexpr, MP: gl.constexpr,
                   XR: gl.constexpr, XSL: gl.constexpr, X4: gl.constexpr, AL: gl.constexpr, BL: gl.constexpr):
        """``_tile`` with x read per group column from the staged shared tile ``xt``."""
        w0, w1, w2, w3, s0, s1, s2, s3, o0, o1, o2, o3, q0, q1, q2, q3 = _tile_operands(w, sw, HALF, BLOCK_N)
        acc = _step(acc, w0, s0, o0, q0, _x_u(xt, 0, MP, XR, XSL, X4), HALF, BLOCK_N, MP, AL, BL)
        acc = _step(acc, w1, s1, o1, q1, _x_u(xt, 1, MP, XR, XSL, X4), HALF, BLOCK_N, MP, AL, BL)
        acc = _step(acc, w2, s2, o2, q2, _x_u(xt, 2, MP, XR, XSL, X4), HALF, BLOCK_N, MP, AL, BL)
        acc = _step(acc, w3, s3, o3, q3, _x_u(xt, 3, MP, XR, XSL, X4), HALF, BLOCK_N, MP, AL, BL)
        return acc

    # codebook mode (``CB``; lowbit.codegen.triton.codebook_gluon's docstring)
    @gluon.jit
    def _sign_pair(v):
        """[.., 2] bf16 ``{+-1, +-1}`` with the signs of bits 15 and 31 of v (one LOP3:
        ``v & 0x80008000 | 0x3F803F80``, the bits of bf16 1.0 under each sign). The asm packs two
        bf16 per 32-bit result (``pack=2``, element 0 in the low half), so the LOP3 writes the MMA
        operand register itself: splitting it into 16-bit halves and joining them again made
        ptxas add a register move per pair (80 against 18 IMAD.MOV in the kernel; the PTX data
        flow is the same, checked register for register)."""
        return gl.inline_asm_elementwise(asm="lop3.b32 $0, $1, 0x80008000, 0x3F803F80, 0xEA;",
                                         constraints="=r,r,r", args=[gl.join(v, v)], dtype=gl.bfloat16,
                                         is_pure=True, pack=2)

    @gluon.jit
    def _st_shared(byte_off, value):
        """Store int32 ``value`` at byte ``byte_off`` of the kernel's dynamic shared memory
        (``global_smem``), past everything Triton allocates there (the launcher reserves it)."""
        return gl.inline_asm_elementwise(
            asm="""{
            .reg .u32 a;
            mov.u32 a, global_smem;
            add.u32 a, a, $1;
            st.shared.b32 [a], $2;
            mov.u32 $0, 0;
            }""", constraints="=r,r,r", args=[byte_off, value], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _ld_shared(byte_off):
        """The int32 at byte ``byte_off`` of the kernel's dynamic shared memory. Not pure, so that
        it stays after the barrier that follows the table's stores."""
        return gl.inline_asm_elementwise(
            asm="""{
            .reg .u32 a;
            mov.u32 a, global_smem;
            add.u32 a, a, $1;
            ld.shared.b32 $0, [a];
            }""", constraints="=r,r", args=[byte_off], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _ld_shared_v4(byte_off):
        """The four int32 at byte ``byte_off`` (16-byte aligned) of the dynamic shared memory."""
        return gl.inline_asm_elementwise(
            asm="""{
            .reg .u32 a;
            mov.u32 a, global_smem;
            add.u32 a, a, $4;
            ld.shared.v4.b32 {$0, $1, $2, $3}, [a];
            }""", constraints="=r,=r,=r,=r,r", args=[byte_off], dtype=(gl.int32, gl.int32, gl.int32, gl.int32),
            is_pure=False, pack=1)

    _BYTE_PAIR_ASM = """{
            .reg .b32 c;
            mov.b32 c, 0x80808080;
            prmt.b32 $0, $1, c, SELECTOR;
            }"""
    # output bytes (low first): c's 0x80, w's byte 0 / 2, c's 0x80, w's byte 1 / 3
    _BYTE_PAIR_LO = gl.constexpr(_BYTE_PAIR_ASM.replace("SELECTOR", "0x1404"))
    _BYTE_PAIR_HI = gl.constexpr(_BYTE_PAIR_ASM.replace("SELECTOR", "0x3424"))

    @gluon.jit
    def _byte_pair(w, HI: gl.constexpr):
        """[.., 2] bf16 of bytes 0, 1 (``HI``: 2, 3) of w, each the high byte of bf16 +-1 (0x3F or
        0xBF), under the low byte 0x80: one PRMT."""
        if HI:
            asm: gl.constexpr = _BYTE_PAIR_HI
        else:
            asm: gl.constexpr = _BYTE_PAIR_LO
        return gl.inline_asm_elementwise(asm=asm, constraints="=r,r,r", args=[gl.join(w, w)], dtype=gl.bfloat16,
                                         is_pure=True, pack=2)  # packed as in _sign_pair

    @gluon.jit
    def _cb_step(acc, idx, xu, TAB_OFF: gl.constexpr, BLOCK_N: gl.constexpr, MP: gl.constexpr,
                 AL: gl.constexpr, BL: gl.constexpr, BYTES: gl.constexpr = False):
        """acc + one mma_v2 over the 4 vectors (one per lane t) whose codebook indices are idx
        [BLOCK_N, 4]: each index's table word T (bit 8 + i: sign of element 2i, bit 24 + i: of
        element 2i + 1) is read from shared memory, and pair i is ``T << (7 - i)`` made into
        bf16 +-1 by one LOP3."""
        if BYTES:
            # byte table: 16 bytes per codeword, byte e = high byte of bf16 sign(e) (one PRMT per pair)
            q0, q1, q2, q3 = _ld_shared_v4(idx.to(gl.int32) * 16 + TAB_OFF)
            return _mma_pairs(acc, _byte_pair(q0, False), _byte_pair(q0, True), _byte_pair(q1, False),
                              _byte_pair(q1, True), _byte_pair(q2, False), _byte_pair(q2, True),
                              _byte_pair(q3, False), _byte_pair(q3, True), xu, BLOCK_N, MP, AL, BL)
        t = _ld_shared(idx.to(gl.int32) * 4 + TAB_OFF)
        p0 = _sign_pair(t << 7)
        p1 = _sign_pair(t << 6)
        p2 = _sign_pair(t << 5)
        p3 = _sign_pair(t << 4)
        p4 = _sign_pair(t << 3)
        p5 = _sign_pair(t << 2)
        p6 = _sign_pair(t << 1)
        p7 = _sign_pair(t)
        return _mma_pairs(acc, p0, p1, p2, p3, p4, p5, p6, p7, xu, BLOCK_N, MP, AL, BL)

    @gluon.jit
    def _cb_tile_pipe(acc, w, xt, TAB_OFF: gl.constexpr, BLOCK_N: gl.constexpr, MP: gl.constexpr,
                      XR: gl.constexpr, XSL: gl.constexpr, X4: gl.constexpr, AL: gl.constexpr, BL: gl.constexpr,
                      BYTES: gl.constexpr):
        """The codebook tile: int16 indices w [BLOCK_N, 16] (vector g = 4t + u of the tile), x
        read per column u from the staged shared tile ``xt`` as in ``_tile_pipe``."""
        we, wo = gl.split(gl.reshape(w, [BLOCK_N, 4, 2, 2]))
        w0, w2 = gl.split(we)
        w1, w3 = gl.split(wo)
        acc = _cb_step(acc, w0, _x_u(xt, 0, MP, XR, XSL, X4), TAB_OFF, BLOCK_N, MP, AL, BL, BYTES)
        acc = _cb_step(acc, w1, _x_u(xt, 1, MP, XR, XSL, X4), TAB_OFF, BLOCK_N, MP, AL, BL, BYTES)
        acc = _cb_step(acc, w2, _x_u(xt, 2, MP, XR, XSL, X4), TAB_OFF, BLOCK_N, MP, AL, BL, BYTES)
        acc = _cb_step(acc, w3, _x_u(xt, 3, MP, XR, XSL, X4), TAB_OFF, BLOCK_N, MP, AL, BL, BYTES)
        return acc

    @gluon.jit
    def _cb_table_to_shared(t_ptr, TAB_OFF: gl.constexpr, TAB_N: gl.constexpr, num_warps: gl.constexpr):
        """Copy the int32 table words [TAB_N] to bytes [TAB_OFF, TAB_OFF + 4 TAB_N) of the dynamic
        shared memory (16-byte loads), then a CTA barrier."""
        lay: gl.constexpr = gl.BlockedLayout([4], [32], [num_warps], [0])
        offs = gl.arange(0, TAB_N, layout=lay)
        _st_shared(offs * 4 + TAB_OFF, gl.load(t_ptr + offs))
        gl.thread_barrier()

    @gluon.jit
    def _issue_x(pid, tiles, M, x_ptr, stride_xm, x_ring, x_tt, x_m, x_off, SPLIT_K: gl.constexpr,
                 TPI: gl.constexpr):
        """cp.async the x of the program's work item ([XT tiles, XR*4 rows (m, t), 32 words], row
        ``min(m, M - 1)``) into the x tiles. Not committed: it rides with the commit group of
        stream position 0, issued next. Issued exactly once per item: a masked-off cp.async
        still writes its 16 bytes (zero fill, src-size 0), so it may not be issued "masked"
        for the other positions."""
        c = pid % SPLIT_K
        xmask = (x_tt < TPI) & (c * TPI + x_tt < tiles)
        xsrc = x_ptr + gl.minimum(x_m, M - 1) * stride_xm + c * (TPI * 128) + x_off
        cp.async_copy_global_to_shared(x_ring.index(0), xsrc, mask=xmask)

    @gluon.jit
    def _issue(slot, tt, ok, pid, tiles, w_ptr, s_ptr, SWN: gl.constexpr, SSN: gl.constexpr,
               w_ring, s_ring, w_off, s_off, BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr,
               TPI: gl.constexpr, WL: gl.constexpr, SL: gl.constexpr, CB: gl.constexpr):
        """cp.async the words and scale words of stream position ``tt`` (tile tt of the program's
        work item) into ring slot ``slot``; where ``ok`` is false or the tile is past K the copy
        is masked (zero fill into the slot, which is then never read). One commit group per
        position."""
        rb = pid // SPLIT_K
        c = pid - rb * SPLIT_K
        tile = c * TPI + tt
        lim = gl.where(ok & (tile < tiles), 1, 0)
        # splat masks (constant along the 16-byte vectors, so the copies stay 16 / 4 bytes wide)
        wmask = gl.full([BLOCK_N, 16], 0, gl.int32, WL) < lim
        smask = gl.full([BLOCK_N, 4], 0, gl.int32, SL) < lim
        cp.async_copy_global_to_shared(w_ring.index(slot), w_ptr + (rb * BLOCK_N * SWN + tile * 16) + w_off,
                                       mask=wmask)
        if not CB:
            cp.async_copy_global_to_shared(s_ring.index(slot), s_ptr + (rb * BLOCK_N * SSN + tile * 4) + s_off,
                                           mask=smask)
        cp.commit_group()

    @gluon.jit
    def _finish(acc, rb, c, M, N, g_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
                HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, MP: gl.constexpr, SPLIT_K: gl.constexpr,
                MMA: gl.constexpr, CB: gl.constexpr = False):
        """Epilogue of both kernels for row block rb and K share c: the global scale (``CB``: the
        per-row scales, fp32 [N] at g_ptr), then the
        serial split-K reduction (each share stores its fp32 partial in ws, the last to arrive
        sums them in order and resets the counter) and the bias."""
        yn = rb * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        if CB:
            acc = acc * gl.load(g_ptr + yn)[:, None]
        else:
            acc = acc * gl.load(g_ptr)
        ym = gl.arange(0, MP, layout=gl.SliceLayout(0, MMA))
        ymask = (ym < M)[None, :] & (yn < N)[:, None]
        if SPLIT_K > 1:
            tile_mn = ym[None, :] * N + yn[:, None]
            gl.store(ws_ptr + c * M * N + tile_mn, acc, mask=ymask)
            gl.thread_barrier()
            arrived = gl.atomic_add(cnt_ptr + rb, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = gl.zeros([BLOCK_N, MP], gl.float32, layout=MMA)
                for kk in gl.static_range(SPLIT_K):
                    total += gl.load(ws_ptr + kk * M * N + tile_mn, mask=ymask, other=0.0, cache_modifier=".cg")
                gl.atomic_xchg(cnt_ptr + rb, 0)
                if HAS_BIAS:
                    total += gl.load(b_ptr + yn).to(gl.float32)[:, None]
                gl.store(y_ptr + ym[None, :] * stride_ym + yn[:, None], total.to(y_ptr.dtype.element_ty), mask=ymask)
        else:
            if HAS_BIAS:
                acc += gl.load(b_ptr + yn).to(gl.float32)[:, None]
            gl.store(y_ptr + ym[None, :] * stride_ym + yn[:, None], acc.to(y_ptr.dtype.element_ty), mask=ymask)

    @gluon.jit
    def _grid_dependency_wait():
        """``griddepcontrol.wait``: block until the grid this one depends on (under programmatic
        dependent launch) has completed and its writes are visible; a no-op otherwise."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _grid_dependents_may_launch():
        """``griddepcontrol.launch_dependents``: the next grid, if launched with programmatic
        dependent launch, may start once every program of this one has passed here."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _w2a16_pipe_kernel(
        x_ptr, w_ptr, s_ptr, g_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, stride_xm, stride_ym,
        HALF: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, MP: gl.constexpr,
        SPLIT_K: gl.constexpr, SWN: gl.constexpr, SSN: gl.constexpr, TPI: gl.constexpr, STAGES: gl.constexpr,
        XR: gl.constexpr, XT: gl.constexpr, PDL: gl.constexpr,
        WL: gl.constexpr, SL: gl.constexpr, XSL: gl.constexpr, X4: gl.constexpr, XCL: gl.constexpr,
        WSH: gl.constexpr, XSH: gl.constexpr, XSH2: gl.constexpr, MMA: gl.constexpr, AL: gl.constexpr,
        BL: gl.constexpr, CB: gl.constexpr = False, TAB_OFF: gl.constexpr = 0, TAB_N: gl.constexpr = 0,
        TAB_BYTES: gl.constexpr = False,
    ):
        """Pipelined variant (module docstring): program ``pid`` computes work item pid (row block
        ``pid // SPLIT_K``, K share ``pid % SPLIT_K`` of TPI tiles); its words and scale words go
        through a ``STAGES``-deep ring in shared memory (per-thread cp.async), its x through
        shared memory (staged once). ``PDL``: launched with programmatic dependent launch; the
        first STAGES - 1 positions of words and scales (weights: never written by an earlier
        kernel) are requested before waiting for the previous grid, x and every write after it,
        and dependents may launch once the main loop is done.

        ``CB`` (codebook mode, lowbit.codegen.triton.codebook_gluon): ``w_ptr`` holds int16
        codebook indices [N, K/16] (one per vector of 16 weights, in the words' places), ``s_ptr``
        the int32 table words [TAB_N], copied once to bytes ``TAB_OFF ..`` of the dynamic shared
        memory (past Triton's own, reserved by the launcher), ``g_ptr`` fp32 per-row scales;
        no scale ring. ``TAB_BYTES``: the table holds 16 bytes per codeword (one PRMT per pair)
        instead of one sign word (shift + LOP3)."""
        pid = gl.program_id(0)
        tiles = K // 256
        if CB:
            w_ring = gl.allocate_shared_memory(gl.int16, [STAGES, BLOCK_N, 16], WSH)
            s_ring = w_ring  # unused
        else:
            w_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, 16], WSH)
            s_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, 4], WSH)
        x_ring = gl.allocate_shared_memory(gl.int32, [1, XT, XR * 4, 32], XSH)
        # the same bytes as [XT] tiles (same swizzle of the two minor dimensions)
        x_tiles = x_ring._reinterpret(gl.int32, [XT, XR * 4, 32], XSH2)
        # per-thread offsets inside a tile (rows of the row block, words / scale words)
        w_off = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WL))[:, None] * SWN + \
            gl.arange(0, 16, layout=gl.SliceLayout(0, WL))[None, :]
        s_off = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, SL))[:, None] * SSN + \
            gl.arange(0, 4, layout=gl.SliceLayout(0, SL))[None, :]
        x_tt = gl.arange(0, XT, layout=gl.SliceLayout(1, gl.SliceLayout(2, XCL)))[:, None, None]
        x_r = gl.arange(0, XR * 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, XCL)))[None, :, None]
        x_w = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, XCL)))[None, None, :]
        x_m = x_r // 4
        x_off = x_tt * 128 + (x_r % 4) * 32 + x_w
        if not PDL:
            # the item's x, once: committed with position 0 (the first _issue below or in the loop)
            _issue_x(pid, tiles, M, x_ptr, stride_xm, x_ring, x_tt, x_m, x_off, SPLIT_K, TPI)
        acc = gl.zeros([BLOCK_N, MP], gl.float32, layout=MMA)
        if CB:
            _cb_table_to_shared(s_ptr, TAB_OFF, TAB_N, gl.num_warps())
        # prologue: positions 0 .. STAGES-2 (a static_range here crashes Triton 3.6's lowering)
        for p in range(STAGES - 1):
            _issue(p % STAGES, p, p < TPI, pid, tiles, w_ptr, s_ptr, SWN, SSN,
                   w_ring, s_ring, w_off, s_off, BLOCK_N, SPLIT_K, TPI, WL, SL, CB)
        if PDL:
            # x is the previous grid's output: wait for it, then copy it as a group of its own,
            # committed after positions 0 .. STAGES-2 and before position STAGES-1
            _grid_dependency_wait()
            _issue_x(pid, tiles, M, x_ptr, stride_xm, x_ring, x_tt, x_m, x_off, SPLIT_K, TPI)
            cp.commit_group()
        for j in range(0, TPI):
            p = j + STAGES - 1
            _issue(p % STAGES, p, p < TPI, pid, tiles, w_ptr, s_ptr, SWN, SSN,
                   w_ring, s_ring, w_off, s_off, BLOCK_N, SPLIT_K, TPI, WL, SL, CB)
            # groups committed: j + STAGES (+ 1 for x under PDL); leave the STAGES - 1 of
            # positions j + 1 .. p. Under PDL at j = 0 only position STAGES - 1 was committed
            # after x, so leave at most one group.
            if PDL and j == 0:
                if STAGES > 1:
                    cp.wait_group(1)
                else:
                    cp.wait_group(0)
            else:
                cp.wait_group(STAGES - 1)
            if j == 0:
                gl.thread_barrier()  # the item's x (copied by all threads) has landed everywhere
            slot = j % STAGES
            if (pid % SPLIT_K) * TPI + j < tiles:
                w = w_ring.index(slot).load(WL)
                if CB:
                    acc = _cb_tile_pipe(acc, w, x_tiles.index(j), TAB_OFF, BLOCK_N, MP, XR, XSL, X4, AL, BL,
                                        TAB_BYTES)
                else:
                    sw = s_ring.index(slot).load(SL)
                    acc = _tile_pipe(acc, w, sw, x_tiles.index(j), HALF, BLOCK_N, MP, XR, XSL, X4, AL, BL)
        cp.wait_group(0)
        if PDL:
            _grid_dependents_may_launch()
        _finish(acc, pid // SPLIT_K, pid % SPLIT_K, M, N, g_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
                HAS_BIAS, BLOCK_N, MP, SPLIT_K, MMA, CB)

# ----------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------

# H200 sweep (2026-12-01, M=1, docs/benchmarks.md): BLOCK_N=128 with 4 warps beat 64 and 256
# at every shape; split-K 8 was best up to 64 row blocks (N <= 8192: 13.6 us at 8192x8192
# against 17.3 for BLOCK_N=64 / split 4), split-K 4 above (N = 11008 and 28672). STAGES=2: the
# pipelined kernel with a 2-slot cp.async ring (module docstring, "Pipelined variant"; 13.06 us
# at 8192^2 against 13.76 for the classic kernel, STAGES=0, and at most 2% from the best
# correct configuration at every measured shape, H200, 2026-12-01). A second sweep of tiles for
# the pipelined kernel (same day, `python bench/gluon_w2a16.py --configs ...`, M=1): BLOCK_N=64
# with the same split rule (8 up to 64 row blocks, else 4) was the best or within 0.5% of it at
# all six shapes (8192^2 12.71 us against 12.67 for BLOCK_N=128; 4096^2 6.35 against 6.66;
# 4096 -> 11008 10.39 / 10.63; 11008 -> 4096 10.59 / 10.80; 4096 -> 12288 10.51 / 10.85;
# 4096 -> 22016 16.03 / 16.63); BLOCK_N=256 (8 warps) and split 16 were slower everywhere.
# BLOCK_N=64 also lets every N that is a multiple of 64 take this path.
DEFAULTS = dict(BLOCK_N=64, SPLIT_K=0, PREFETCH=True, UNROLL2=True, num_warps=4, STAGES=2, PDL=False)
TILE_K = 256            # K elements per tile (16 groups: one 16-byte word load per row and thread)
MAX_M = 8               # rows routed here by torch.ops.lowbit.qlinear (MP = 8; at M = 16 the
                        # Triton skinny kernel is 2.3x faster)
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one program may use (sm_90)


def default_config(m: int, n: int, k: int, defaults: dict | None = None, **over) -> dict:
    """Tile sizes. ``SPLIT_K=0``: 8 up to 64 row blocks, 4 above (measured; at least one tile
    per split); ``MP`` (the padded M of the MMA: 8 or 16) from M; ``UNROLL2`` (two tiles per
    loop iteration of the classic kernel) only where every split has an even number of tiles;
    ``STAGES`` (default 2: the pipelined kernel) falls back to 0 (the classic kernel) where the
    pipelined kernel's shared memory (x of a K share staged whole) would exceed
    :data:`SMEM_LIMIT`, unless STAGES was asked for. ``defaults``: in place of :data:`DEFAULTS`."""
    unknown = set(over) - set(DEFAULTS) - {"MP"}
    if unknown:
        raise ValueError(f"unknown Gluon W2A16 config keys {sorted(unknown)} (known: {sorted(set(DEFAULTS) | {'MP'})})")
    cfg = dict(DEFAULTS if defaults is None else defaults)
    cfg.update({a: b for a, b in over.items() if b is not None})
    if cfg.get("MP") is None:
        cfg["MP"] = 8 if m <= 8 else 16
    tiles = max(k // TILE_K, 1)
    if not cfg["SPLIT_K"]:
        cfg["SPLIT_K"] = max(1, min(tiles, 8 if n // cfg["BLOCK_N"] <= 64 else 4))
    split = cfg["SPLIT_K"]
    cfg["UNROLL2"] = bool(cfg["UNROLL2"] and cfg["PREFETCH"] and tiles % split == 0 and (tiles // split) % 2 == 0)
    if over.get("STAGES") is None and cfg["STAGES"] and pipe_plan(m, n, k, cfg)["smem"] > SMEM_LIMIT:
        cfg["STAGES"] = 0
    return cfg


def _p2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def pipe_plan(m: int, n: int, k: int, cfg: dict) -> dict:
    """Launch plan of the pipelined kernel for a :func:`default_config` result: ``TPI`` tiles per
    work item (= per K share), ``G`` programs (one per work item), ``XR`` stored x rows (M
    rounded up to a power of two), ``XT`` x tiles (TPI rounded up), ``smem`` bytes."""
    bn, split, stages = cfg["BLOCK_N"], cfg["SPLIT_K"], cfg["STAGES"]
    tiles = max(k // TILE_K, 1)
    tpi = -(-tiles // split)
    xr = _p2(max(m, 1))
    if xr > cfg["MP"]:
        raise ValueError(f"M ({m}) > MP ({cfg['MP']})")
    xt = _p2(tpi)
    smem = stages * bn * (16 + 4) * 4 + xt * xr * 4 * 32 * 4
    return dict(TPI=tpi, G=(n // bn) * split, XR=xr, XT=xt, smem=smem)


@functools.lru_cache(maxsize=256)
def _pipe_launch_plan(m: int, n: int, k: int, config: tuple, defaults: tuple):
    """``(cfg, plan, constexpr keyword arguments)`` of the pipelined kernel for a call shape, a
    config and the :data:`DEFAULTS` in force (both as sorted items), computed once: the per-call
    work of an eager decode step is then a dictionary lookup instead of the config, plan and
    layout objects (whose hashing alone cost ~10 us per launch)."""
    cfg = default_config(m, n, k, dict(defaults), **dict(config))
    if not cfg["STAGES"]:
        return cfg, None, None
    if cfg["STAGES"] < 0:
        raise ValueError(f"STAGES must be >= 0, got {cfg['STAGES']}")
    plan = pipe_plan(m, n, k, cfg)
    if plan["smem"] > SMEM_LIMIT:
        raise ValueError(f"pipelined config needs {plan['smem']} bytes of shared memory (> {SMEM_LIMIT})")
    bn, mp, nw = cfg["BLOCK_N"], cfg["MP"], cfg["num_warps"]
    w_l, s_l, x_l, mma, a_l, b_l = _cached_layouts(bn, mp, nw)
    xs_l, x4_l, xc_l, flat, xsw, xsw2 = _cached_pipe_layouts(bn, mp, plan["XR"], plan["XT"], nw)
    constexprs = dict(
        BLOCK_N=bn, MP=mp, SPLIT_K=cfg["SPLIT_K"], TPI=plan["TPI"], STAGES=cfg["STAGES"], XR=plan["XR"],
        XT=plan["XT"], PDL=bool(cfg["PDL"]), WL=w_l, SL=s_l, XSL=xs_l, X4=x4_l, XCL=xc_l, WSH=flat, XSH=xsw,
        XSH2=xsw2, MMA=mma, AL=a_l, BL=b_l, CB=False, TAB_OFF=0, TAB_N=0, TAB_BYTES=False)
    return cfg, plan, constexprs


# Compiled pipelined kernels by specialization (see _launch_pipe): key -> (CompiledKernel,
# constexpr values in parameter order)
_COMPILED: dict = {}


def _specialization(a) -> tuple:
    """What Triton specializes a launch on for one runtime argument: a tensor's 16-byte
    alignment, an integer's value 1 and divisibility by 16."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    return (a == 1, a % 16 == 0, -2**31 <= a < 2**31)


def _compile_codebook(args: tuple, constexprs: dict, num_warps: int, pdl: bool):
    """Compile the pipelined kernel in codebook mode (``CB``) without launching it, with its
    table placed past all of Triton's shared memory: a first build (``TAB_OFF=0``) gives
    Triton's own size, a second puts the table at that offset (rounded to 16 bytes; the table
    is reached through inline PTX only, so the two builds allocate the same), and the compiled
    kernel's shared-memory size is raised to cover the table before its first load (so that
    Triton's loader also opts in to more than 48 KB where needed, and every launch reserves it).
    Returns (compiled kernel, TAB_OFF)."""
    first = _w2a16_pipe_kernel.warmup(*args, **{**constexprs, "TAB_OFF": 0}, grid=(1,), num_warps=num_warps,
                                      launch_pdl=pdl)
    off = -(-first.metadata.shared // 16) * 16
    total = off + 4 * constexprs["TAB_N"]
    if total > SMEM_LIMIT:
        raise ValueError(f"codebook Gluon kernel: {total} bytes of shared memory with the table (> {SMEM_LIMIT})")
    compiled = _w2a16_pipe_kernel.warmup(*args, **{**constexprs, "TAB_OFF": off}, grid=(1,),
                                         num_warps=num_warps, launch_pdl=pdl)
    if getattr(compiled, "_lowbit_table_shared", None) == total:
        return compiled, off  # the same build, reserved already (another grid or argument key)
    packed = getattr(compiled, "packed_metadata", None)
    if compiled.metadata.shared != first.metadata.shared or getattr(compiled, "module", 0) is not None or not (
            isinstance(packed, tuple) and len(packed) == 3 and packed[2] == compiled.metadata.shared):
        raise RuntimeError("codebook Gluon kernel: this Triton version's compiled-kernel metadata is not the "
                           "expected one (an unloaded kernel, (num_warps, num_ctas, shared)); the table cannot "
                           "be placed")
    compiled.metadata = compiled.metadata._replace(shared=total)
    compiled.packed_metadata = (packed[0], packed[1], total)
    compiled._lowbit_table_shared = total
    return compiled, off


def _launch_pipe(grid: int, args: tuple, constexprs: dict, num_warps: int, pdl: bool, key_extra: tuple):
    """``_w2a16_pipe_kernel[(grid,)](*args, **constexprs)``. The first launch of a
    specialization goes through Triton's JIT (which compiles or finds the kernel); later ones
    call the compiled kernel's launcher directly, skipping the JIT's argument binding and cache
    key (~50 us of CPU per call, measured on the eager decode path). The key holds everything
    the JIT's own key depends on: the constexprs (through ``key_extra``, the plan's inputs),
    the options, and each runtime argument's specialization."""
    key = (key_extra, grid, num_warps, pdl, tuple(_specialization(a) for a in args))
    hit = _COMPILED.get(key)
    if hit is not None:
        compiled, tail = hit
        compiled[(grid, 1, 1)](*args, *tail)
        return
    if constexprs.get("CB"):
        # codebook mode: never launched through the JIT (its launch would not reserve the table)
        compiled, off = _compile_codebook(args, constexprs, num_warps, pdl)
        constexprs = {**constexprs, "TAB_OFF": off}
        names = list(_w2a16_pipe_kernel.arg_names)
        tail = tuple(constexprs[nm] for nm in names[len(args):])
        _COMPILED[key] = (compiled, tail)
        compiled[(grid, 1, 1)](*args, *tail)
        return
    compiled = _w2a16_pipe_kernel[(grid,)](*args, **constexprs, num_warps=num_warps, launch_pdl=pdl)
    if not (hasattr(compiled, "run") and hasattr(compiled, "__getitem__")):
        return  # not a compiled kernel (another Triton version): always through the JIT
    names = list(getattr(_w2a16_pipe_kernel, "arg_names", ()))
    if len(names) == len(args) + len(constexprs) and set(names[len(args):]) == set(constexprs):
        _COMPILED[key] = (compiled, tuple(constexprs[nm] for nm in names[len(args):]))


@functools.lru_cache(maxsize=64)
def _cached_layouts(block_n, mp, num_warps):
    return _layouts(block_n, mp, num_warps)


@functools.lru_cache(maxsize=64)
def _cached_pipe_layouts(block_n, mp, xr, xt, num_warps):
    return _pipe_layouts(block_n, mp, xr, xt, num_warps)


def _x_rows(x: torch.Tensor):
    """(x as [M, K] rows the kernels read: unit stride, 16-byte aligned rows; M), M <= 16."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    if x2.shape[0] > 16:
        raise ValueError(f"the Gluon kernel handles M <= 16 rows, got {x2.shape[0]}")
    return x2, x2.shape[0]


def _split_k_buffers(y: torch.Tensor, split: int, block_n: int, unused: torch.Tensor):
    """(fp32 partials [split, M, N], arrival counters per row block) of the serial split-K
    reduction; with one split the kernel reads neither (placeholders)."""
    if split == 1:
        return y, unused
    from lowbit.codegen.triton.w2a16 import _tile_counters

    m, n = y.shape
    return torch.empty((split, m, n), device=y.device, dtype=torch.float32), _tile_counters(y.device, n // block_n)


def w2a16_gluon(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                bias: torch.Tensor | None = None, grid: str = "int", out_dtype: torch.dtype | None = None,
                **config) -> torch.Tensor:
    """``x @ dequant(W)^T + bias`` for bf16 x [..., K] (M <= 16 rows after flattening).

    ``packed``: the repacked int32 words [N, Kp/16] of :func:`repack_w2a16` (pass these: a
    uint8 lowbit-packed weight is accepted too but is then repacked on every call, in torch);
    ``scales``: ``float8_e4m3fn`` [N, Kp/16] (lowbit's, unchanged); ``global_scale``: fp32
    (one element); ``bias``: [N] (any float dtype, added in fp32); ``grid``: "int" or "half";
    ``out_dtype``: x's by default (fp32 returns the accumulator, for tests). ``config``:
    BLOCK_N (16 * num_warps * 2^r), SPLIT_K (0: automatic), PREFETCH, UNROLL2, num_warps, MP
    (8 or 16); STAGES (default 2) >= 1 selects the pipelined kernel (module docstring) with a
    STAGES-slot cp.async ring; STAGES=0 the classic kernel; PDL (pipelined kernel only):
    programmatic dependent launch (module docstring).
    The kernel needs N % BLOCK_N == 0 and K % 256 == 0.
    """
    if not HAVE_GLUON:
        raise RuntimeError("w2a16_gluon needs triton.experimental.gluon")
    if x.dtype != torch.bfloat16:
        raise TypeError(f"the Gluon kernel takes bf16 activations, got {x.dtype}")
    if grid not in ("int", "half"):
        raise ValueError(f"grid must be 'int' or 'half', got {grid!r}")
    if packed.dtype == torch.uint8:
        packed = repack_w2a16(packed)
    n, gp = scales.shape
    if packed.shape != (n, gp) or packed.dtype != torch.int32:
        raise ValueError(f"repacked weight {tuple(packed.shape)} {packed.dtype} does not match scales "
                         f"{tuple(scales.shape)} (expected int32 [{n}, {gp}])")
    if scales.dtype != torch.float8_e4m3fn:
        raise TypeError(f"expected E4M3 group scales, got {scales.dtype}")
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2, m = _x_rows(x)
    out_dtype = out_dtype or x.dtype
    if m == 0:
        return x.new_empty((*lead, n), dtype=out_dtype)
    config_key = (tuple(sorted(config.items())), tuple(sorted(DEFAULTS.items())))
    cfg, plan, constexprs = _pipe_launch_plan(m, n, k, *config_key)
    bn, split, nw, mp = cfg["BLOCK_N"], cfg["SPLIT_K"], cfg["num_warps"], cfg["MP"]
    if n % bn or k % TILE_K or k > gp * 16:
        raise ValueError(f"N ({n}) must be a multiple of BLOCK_N ({bn}) and K ({k}) of {TILE_K}")
    if m > mp:
        raise ValueError(f"M ({m}) > MP ({mp})")
    if max(m, split) * max(n, k) * 16 >= 2**31 or n * gp >= 2**31:
        raise ValueError("too large for 32-bit indexing")
    words = packed if packed.stride(-1) == 1 else packed.contiguous()
    sc = scales if scales.stride(-1) == 1 else scales.contiguous()
    if words.stride(0) % 4 or words.data_ptr() % 16 or sc.stride(0) % 4 or sc.data_ptr() % 4:
        raise ValueError("the words need 16-byte aligned rows and the scales 4-byte aligned rows")
    s32 = sc.view(torch.uint8).view(torch.int32)   # four E4M3 bytes per word
    x32 = x2.view(torch.int32)                      # bf16 pairs
    g = global_scale.reshape(1).float()
    y = torch.empty((m, n), device=x.device, dtype=out_dtype)
    ws, cnt = _split_k_buffers(y, split, bn, g)
    if plan is not None:
        half, has_bias, swn, ssn = grid == "half", bias is not None, words.stride(0), s32.stride(0)
        _launch_pipe(plan["G"], (x32, words, s32, g, bias if has_bias else g, y, ws, cnt,
                                 m, n, k, x32.stride(0), y.stride(0)),
                     dict(HALF=half, HAS_BIAS=has_bias, SWN=swn, SSN=ssn, **constexprs), nw, bool(cfg["PDL"]),
                     (m, n, k, config_key, half, has_bias, swn, ssn))
        return y.reshape(*lead, n)
    w_l, s_l, x_l, mma, a_l, b_l = _cached_layouts(bn, mp, nw)
    _w2a16_gluon_kernel[(n // bn, split)](
        x32, words, s32, g, bias if bias is not None else g, y, ws, cnt,
        m, n, k, x32.stride(0), words.stride(0), s32.stride(0), y.stride(0),
        HALF=grid == "half", HAS_BIAS=bias is not None, BLOCK_N=bn, MP=mp,
        SPLIT_K=split, PREFETCH=bool(cfg["PREFETCH"]), UNROLL2=cfg["UNROLL2"], WL=w_l, SL=s_l, XL=x_l, MMA=mma, AL=a_l, BL=b_l,
        num_warps=nw)
    return y.reshape(*lead, n)


def gluon_unsupported(x: torch.Tensor, packed: torch.Tensor, max_m: int = MAX_M) -> str | None:
    """Why ``torch.ops.lowbit.qlinear`` does not route this W2A16 call to the Gluon kernel, or
    None: it takes CUDA bf16 x with at most ``max_m`` rows, K a multiple of 256 and N of the
    default BLOCK_N (the caller has already checked the 2-bit packed format)."""
    return runtime_problem(x) or _shape_problem(x, packed, max_m)


def runtime_problem(x: torch.Tensor) -> str | None:
    """Why no Gluon kernel can run on x here (no Gluon, Triton's interpreter, not CUDA), or None."""
    from .w2a16 import _interpreting

    if not HAVE_GLUON:
        return "no triton.experimental.gluon"
    if _interpreting():
        return "Triton's interpreter does not run Gluon"
    if x.device.type != "cuda":
        return f"{x.device.type} activations (Gluon path: CUDA)"
    return None


def activation_problem(x: torch.Tensor, max_m: int) -> str | None:
    """Why the Gluon kernels do not take these activations (not bf16, more than ``max_m`` rows),
    or None."""
    if x.dtype != torch.bfloat16:
        return f"{x.dtype} activations (Gluon path: bf16)"
    m = x.numel() // max(x.shape[-1], 1)
    if m > max_m:
        return f"{m} rows (Gluon path: at most {max_m})"
    return None


def _shape_problem(x: torch.Tensor, packed: torch.Tensor, max_m: int) -> str | None:
    why = activation_problem(x, max_m)
    if why:
        return why
    n, k = packed.shape[0], x.shape[-1]
    if k % TILE_K or n % DEFAULTS["BLOCK_N"]:
        return f"K={k}, N={n} (Gluon path: K a multiple of {TILE_K}, N of {DEFAULTS['BLOCK_N']})"
    if packed.dim() != 2 or packed.shape[1] % 16:
        return "packed rows not a multiple of 64 codes (16-byte aligned repacked rows)"
    return None


def cached_conversion(cache: dict, key, sources: tuple, compute):
    """``compute()`` once per ``key`` while every tensor of ``sources`` lives and none is modified
    in place (checked through identity and version counters); the entry leaves ``cache`` when
    the first source is freed. Offline weight conversions use it so that inference converts each
    weight on its first call only (before any CUDA-graph capture that replays it)."""
    import weakref

    versions = tuple(t._version for t in sources)
    hit = cache.get(key)
    if hit is not None:
        refs, vers, out = hit
        if vers == versions and all(r() is t for r, t in zip(refs, sources)):
            return out
    out = compute()
    cache[key] = (tuple(weakref.ref(t) for t in sources), versions, out)
    weakref.finalize(sources[0], cache.pop, key, None)
    return out


_REPACKED: dict = {}


def repacked(packed: torch.Tensor) -> torch.Tensor:
    """:func:`repack_w2a16` of a weight, computed once and kept while that tensor lives and is
    not modified in place (:func:`cached_conversion`, keyed by the tensor's identity)."""
    return cached_conversion(_REPACKED, id(packed), (packed,), lambda: repack_w2a16(packed))


# ----------------------------------------------------------------------------------------
# pure-torch emulations (CPU tests: tests/test_gluon_repack.py)
# ----------------------------------------------------------------------------------------

def decode_scale_bits(b: torch.Tensor) -> torch.Tensor:
    """float64 values of E4M3 bytes b (int64), as the scale PTX computes them: bf16 bits
    ``(b & 0x7F) << 4 | (b & 0x80) << 8`` (sign-replicated prmt, shift, AND 0x87F0) times 2^120."""
    bits = (((b & 0xFF) | torch.where((b & 0x80) != 0, 0xFF00, 0)) << 4) & 0x87F0
    v = (bits.to(torch.int32) << 16).view(torch.float32).double()  # a bf16 is the top half of an fp32
    return v * 2.0 ** 120


def _shift_emul(w: torch.Tensor, sh: int) -> torch.Tensor:
    """int64 32-bit pattern of the kernel's ``w >> sh`` (arithmetic) / ``w << -sh``."""
    w = w.to(torch.int64)
    w = torch.where(w >= 2**31, w - 2**32, w)  # signed view
    v = (w << -sh) if sh < 0 else (w >> sh)
    return v & 0xFFFFFFFF


def _pair_emul(v: torch.Tensor, s: torch.Tensor, c16: bool, half: bool) -> torch.Tensor:
    """[.., 2] float64 ``(C + f) s - (C + 2 - h) s`` of the two fields the lop3 picks from v."""
    pos, c = (3, 16) if c16 else (5, 4)
    h = 0.5 if half else 0.0
    f = torch.stack([(v >> pos) & 3, (v >> (16 + pos)) & 3], -1).double()
    return (c + f) * s.unsqueeze(-1) - (c + 2 - h) * s.unsqueeze(-1)


def _pairs_of_step(w: torch.Tensor, s: torch.Tensor, half: bool) -> list:
    """The eight [.., 2] pair tiles of ``_step`` (same shifts and C as the kernel)."""
    if half:
        return [_pair_emul(_shift_emul(w, 2 * i - 5), s, False, True) for i in range(8)]
    out = []
    for sh in (-3, 1, 5, 9):
        v = _shift_emul(w, sh)
        out += [_pair_emul(v, s, True, False), _pair_emul(v, s, False, False)]
    return out


def emulate_tile_ops(w: torch.Tensor, sw: torch.Tensor, xw: torch.Tensor, mp: int, half: bool = False):
    """Replay ``_tile`` / ``_step`` on whole tensors with the torch equivalents of the Gluon ops
    (``gl.join`` = stack on a new last dim, ``gl.split`` = unbind the last dim, reshape and
    permute as in torch): w int32 [BN, 16] words, sw int32 [BN, 4] scale words, xw int32
    [MP, 128] x words (bf16 pairs). Returns the four (A [BN, 64], B [64, MP]) operand pairs of
    the tile's ``mma_v2`` calls, float64."""
    bn = w.shape[0]
    sb = torch.stack([(sw.to(torch.int64) >> (8 * u)) & 0xFF for u in range(4)], -1)  # [BN, 4(t), 4(u)]
    scales = decode_scale_bits(sb)
    we, wo = torch.reshape(w.to(torch.int64) & 0xFFFFFFFF, (bn, 4, 2, 2)).unbind(-1)
    w0, w2 = we.unbind(-1)
    w1, w3 = wo.unbind(-1)
    ws = [w0, w1, w2, w3]
    x16 = torch.stack([xw.to(torch.int64) & 0xFFFF, (xw.to(torch.int64) >> 16) & 0xFFFF], -1)  # join(lo, hi)
    xt = (x16.to(torch.int32) << 16).view(torch.float32).double().reshape(mp, 256)
    xr = xt.reshape(mp, 4, 4, 16).permute(0, 1, 3, 2)
    xe, xo = xr.reshape(mp, 4, 16, 2, 2).unbind(-1)
    x0, x2 = xe.unbind(-1)
    x1, x3 = xo.unbind(-1)
    xs = [x0, x1, x2, x3]
    out = []
    for u in range(4):
        p = _pairs_of_step(ws[u], scales[..., u], half)
        j = lambda a, b: torch.stack([a, b], -1)  # noqa: E731
        a = j(j(j(p[0], p[1]), j(p[2], p[3])), j(j(p[4], p[5]), j(p[6], p[7])))
        a = a.permute(0, 5, 4, 3, 1, 2).reshape(bn, 64)
        xb = xs[u].reshape(mp, 4, 8, 2).permute(0, 2, 1, 3).reshape(mp, 64).permute(1, 0)
        out.append((a, xb))
    return out


def _coord(bases: dict, reg: int, lane: int, warp: int) -> list:
    """Tensor coordinate held by (register, lane, warp) in a linear layout: the XOR of the
    bases of the set bits (module docstring / :func:`layout_bases`)."""
    coord = [0] * len(bases["shape"])
    for level, idx in (("reg", reg), ("lane", lane), ("warp", warp)):
        for b, basis in enumerate(bases[level]):
            if (idx >> b) & 1:
                coord = [c ^ v for c, v in zip(coord, basis)]
    return coord


def emulate_fragments(words: torch.Tensor, scale_bytes: torch.Tensor, x: torch.Tensor, n0: int, tile: int,
                      block_n: int = 64, mp: int = 8, num_warps: int = 4, half: bool = False):
    """Replay one tile of one program thread by thread, from the layout reasoning of the module
    docstring and independently of Triton: each thread's registers of the loaded tiles (their
    coordinates from :func:`layout_bases`), the values its inline PTX makes of them, the
    ``mma.sync.m16n8k16`` A and B fragment registers they are claimed to be (A register
    ``4 i0 + 2 h + j`` of step ``i >> 1`` from pair i of word u, row half h; B register ``2 i0 + j``
    from x pair i of group u), and the products as PTX defines the fragments.

    ``words`` int32 [N, G] (repacked), ``scale_bytes`` uint8 [N, G] (E4M3 bits), ``x`` bf16
    [M, K]. Returns the float64 [BLOCK_N, MP] tile of sum_k A B over the tile's 256 K (rows
    n0.., x rows clamped to M - 1 as in the kernel). Raises if the two operands of a product
    disagree on the actual K of a logical k, or if a thread would hold a word or x element
    its fragments do not need.
    """
    bases = layout_bases(block_n, mp, num_warps)
    wb, sbs, xb = bases["w"], bases["s"], bases["x"]
    g0, kw0 = tile * 16, tile * 128
    m_rows = x.shape[0]
    x32 = x.contiguous().view(torch.int32)
    acc = torch.zeros(block_n, mp, dtype=torch.float64)
    rb = block_n // (16 * num_warps)
    for warp in range(num_warps):
        afr, akk, bfr, bkk = {}, {}, {}, {}
        for lane in range(32):
            gid, t = lane >> 2, lane & 3
            sc = {}  # (row, u) -> scale from this thread's scale words
            for r in range(1 << len(sbs["reg"])):
                row, tt = _coord(sbs, r, lane, warp)
                assert tt == t and row % 8 == gid
                for u in range(4):
                    sc[(row, u)] = float(decode_scale_bits(torch.tensor(int(scale_bytes[n0 + row, g0 + 4 * tt + u]))))
            for r in range(1 << len(wb["reg"])):
                row, g = _coord(wb, r, lane, warp)
                tt, u = divmod(g, 4)
                assert tt == t and row % 8 == gid, "a word outside the thread's fragments"
                h, rep = (row >> 3) & 1, row // (16 * num_warps)
                assert row == gid + 8 * h + 16 * warp + 16 * num_warps * rep
                word = torch.tensor([int(words[n0 + row, g0 + g]) & 0xFFFFFFFF])
                vals = _pairs_of_step(word, torch.tensor([sc[(row, u)]], dtype=torch.float64), half)
                for i in range(8):
                    key = (rep, u, i >> 1)
                    fr = afr.setdefault((lane,) + key, [None] * 8)
                    kk = akk.setdefault((lane,) + key, [None] * 8)
                    for j in range(2):
                        e = 4 * (i & 1) + 2 * h + j
                        fr[e] = float(vals[i][0, j])
                        kk[e] = 16 * (g0 + g) + 2 * i + j
            for r in range(1 << len(xb["reg"])):
                mcol, kw = _coord(xb, r, lane, warp)
                tt, rest = divmod(kw, 32)
                u, i = divmod(rest, 8)
                assert tt == t and mcol % 8 == gid, "an x word outside the thread's fragments"
                v = int(x32[min(mcol, m_rows - 1), kw0 + kw]) & 0xFFFFFFFF
                for j in range(2):
                    bits = torch.tensor([(v >> (16 * j)) & 0xFFFF], dtype=torch.int32) << 16
                    key = (lane, u, i >> 1, mcol // 8)
                    bfr.setdefault(key, [None] * 4)[2 * (i & 1) + j] = float(bits.view(torch.float32))
                    bkk.setdefault(key, [None] * 4)[2 * (i & 1) + j] = 16 * (g0 + 4 * tt + u) + 2 * i + j
        for rep in range(rb):
            for u in range(4):
                for step in range(4):
                    for nt in range(mp // 8):
                        A = torch.zeros(16, 16, dtype=torch.float64)
                        Ak = torch.full((16, 16), -1, dtype=torch.int64)
                        B = torch.zeros(16, 8, dtype=torch.float64)
                        Bk = torch.full((16, 8), -2, dtype=torch.int64)
                        for lane in range(32):
                            gid, t = lane >> 2, lane & 3
                            apos = [(gid, 2 * t), (gid, 2 * t + 1), (gid + 8, 2 * t), (gid + 8, 2 * t + 1),
                                    (gid, 2 * t + 8), (gid, 2 * t + 9), (gid + 8, 2 * t + 8), (gid + 8, 2 * t + 9)]
                            for e, (rr, cc) in enumerate(apos):
                                A[rr, cc] = afr[(lane, rep, u, step)][e]
                                Ak[rr, cc] = akk[(lane, rep, u, step)][e]
                            bpos = [(2 * t, gid), (2 * t + 1, gid), (2 * t + 8, gid), (2 * t + 9, gid)]
                            for e, (kk, cc) in enumerate(bpos):
                                B[kk, cc] = bfr[(lane, u, step, nt)][e]
                                Bk[kk, cc] = bkk[(lane, u, step, nt)][e]
                        if not bool((Ak == Bk[:, 0].unsqueeze(0)).all()) or not bool((Bk == Bk[:, :1]).all()):
                            raise AssertionError(f"A and B disagree on K (warp {warp}, rep {rep}, u {u}, step {step})")
                        r0 = 16 * warp + 16 * num_warps * rep
                        acc[r0:r0 + 16, 8 * nt:8 * nt + 8] += A @ B
    return acc
