"""CPU checks of the Gluon W2A16 kernel's repacked format and of its layout reasoning
(codegen/triton/w2a16_gluon.py), pure torch: no GPU and no Triton compile involved.

* the repacked words unpack to the original codes (and match lowbit's packed format);
* the scale decoding of the inline PTX equals the E4M3 values;
* the tensor-level replay of the kernel's reshape / permute / split / join chain pairs each A
  operand element with the x element of the same actual K;
* the thread-by-thread replay (load layouts -> registers -> PTX mma fragments) reproduces the
  float64 product of lowbit's dequantized tile.
"""
import pytest
import torch

from lowbit.codegen.triton import w2a16_gluon as wg
from lowbit.formats import QFormat, pack_codes
from lowbit.ops import dequantize_weight


def _weight(n, k, seed, grid="int"):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-2, 2, (n, k), generator=g, dtype=torch.int8)
    stored = (torch.rand(n, k // 16, generator=g) * 224).to(torch.float8_e4m3fn)
    # a few negative and subnormal scales as well (the decoding handles every non-NaN code)
    stored.view(torch.uint8)[0, :8] = torch.tensor([0x01, 0x07, 0x08, 0x81, 0x85, 0xB3, 0x7E, 0xFE], dtype=torch.uint8)
    packed = pack_codes(codes, 2)
    w = dequantize_weight(packed, stored, torch.tensor(1.0), QFormat(2, grid)).double()  # (q + h) * S
    return codes, packed, stored, w


def test_repack_roundtrip_and_fields():
    codes, packed, _, _ = _weight(48, 256, seed=0)
    words = wg.repack_w2a16(packed)
    assert words.dtype == torch.int32 and words.shape == (48, 16)
    assert torch.equal(wg.unpack_repacked(words), codes)
    assert torch.equal(words, wg.repack_codes(codes))
    # field i holds code 2i + 2, field i + 8 holds code 2i + 1 + 2
    w = words.to(torch.int64) & 0xFFFFFFFF
    for i in range(8):
        assert torch.equal((w >> (2 * i)) & 3, codes[:, 2 * i::16].to(torch.int64) + 2)
        assert torch.equal((w >> (16 + 2 * i)) & 3, codes[:, 2 * i + 1::16].to(torch.int64) + 2)


def test_repack_rejects_bad_codes():
    with pytest.raises(ValueError):
        wg.repack_codes(torch.full((2, 16), 2, dtype=torch.int8))
    with pytest.raises(ValueError):
        wg.repack_codes(torch.zeros(2, 8, dtype=torch.int8))


def test_scale_decoding_matches_e4m3():
    b = torch.arange(256, dtype=torch.int64)
    ok = (b & 0x7F) != 0x7F  # NaN codes excluded
    ref = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(torch.float8_e4m3fn).double()
    got = wg.decode_scale_bits(b)
    assert torch.equal(got[ok], ref[ok])


def _tile_operands(packed, stored, x, n0, tile, bn, mp):
    words = wg.repack_w2a16(packed)
    w = words[n0:n0 + bn, 16 * tile:16 * tile + 16]
    sw = stored.view(torch.uint8)[n0:n0 + bn, 16 * tile:16 * tile + 16].contiguous().view(torch.int32)
    rows = torch.clamp(torch.arange(mp), max=x.shape[0] - 1)
    xw = x[rows].contiguous().view(torch.int32)[:, 128 * tile:128 * tile + 128]
    return words, w, sw, xw


@pytest.mark.parametrize("grid,mp,m", [("int", 8, 1), ("int", 16, 11), ("half", 8, 3), ("half", 16, 16)])
def test_tile_op_chain_pairs_the_same_k(grid, mp, m):
    """The Gluon op chain of _tile/_step (replayed with torch ops) gives operands whose products
    sum to the float64 product of the dequantized tile."""
    n, k, bn, tile, n0 = 128, 768, 64, 1, 64
    _, packed, stored, w = _weight(n, k, seed=1, grid=grid)
    x = torch.randn(m, k).to(torch.bfloat16)
    _, wt, sw, xw = _tile_operands(packed, stored, x, n0, tile, bn, mp)
    ops = wg.emulate_tile_ops(wt, sw, xw, mp, half=grid == "half")
    got = sum(a @ b for a, b in ops)  # [BN, MP]
    ks = slice(256 * tile, 256 * tile + 256)
    ref = w[n0:n0 + bn, ks] @ x[:, ks].double().T  # [BN, M]
    assert torch.allclose(got[:, :m], ref, rtol=1e-12, atol=1e-9)  # exact products, float64 sums
    # each step's operands: a [BN, 64] slice of the dequantized tile and the matching x rows
    for a, b in ops:
        assert a.shape == (bn, 64) and b.shape == (64, mp)


@pytest.mark.parametrize("grid,mp,m,bn,nw", [("int", 8, 1, 64, 4), ("half", 16, 13, 64, 2), ("int", 8, 5, 128, 4),
                                              ("int", 16, 16, 64, 4)])
def test_thread_fragments_reproduce_the_tile(grid, mp, m, bn, nw):
    """Per thread and register (load layouts -> PTX fragments), independent of Triton."""
    n, k, tile, n0 = 256, 512, 1, 128
    _, packed, stored, w = _weight(n, k, seed=2, grid=grid)
    x = torch.randn(m, k).to(torch.bfloat16)
    words = wg.repack_w2a16(packed)
    acc = wg.emulate_fragments(words, stored.view(torch.uint8), x, n0, tile, block_n=bn, mp=mp, num_warps=nw,
                               half=grid == "half")
    ks = slice(256 * tile, 256 * tile + 256)
    ref = w[n0:n0 + bn, ks] @ x[:, ks].double().T
    assert torch.allclose(acc[:, :m], ref, rtol=1e-12, atol=1e-9)


def test_layout_bases_cover_each_tile_once():
    """Every (register, lane, warp) of a load layout maps to a distinct element (no element
    twice, none missing), except the x tile's warp dimension (every warp reads all of x)."""
    for bn, mp, nw in [(64, 8, 4), (128, 16, 4), (64, 8, 2), (256, 8, 8)]:
        b = wg.layout_bases(bn, mp, nw)
        for key in ("w", "s", "x"):
            lay = b[key]
            warps = 1 if key == "x" else 1 << len(lay["warp"])
            seen = set()
            for warp in range(warps):
                for lane in range(32):
                    for r in range(1 << len(lay["reg"])):
                        seen.add(tuple(wg._coord(lay, r, lane, warp)))
            total = lay["shape"][0] * lay["shape"][1]
            assert len(seen) == total == warps * 32 * (1 << len(lay["reg"])), (key, bn, mp, nw)


def test_routing_rule_for_the_gluon_path():
    """qlinear sends only CUDA bf16 calls of at most MAX_M rows with K % 256 == 0 and
    N a multiple of the default BLOCK_N (64) to the Gluon kernel; on this machine (interpreter, CPU
    tensors) never."""
    _, packed, _, _ = _weight(128, 256, seed=4)
    assert wg.gluon_unsupported(torch.randn(1, 256, dtype=torch.bfloat16), packed) is not None
    # the shape and dtype rules on their own
    for m, k, n, ok in [(1, 256, 128, True), (8, 4096, 4096, True), (9, 256, 128, False), (1, 4080, 128, False),
                        (1, 256, 192, True), (1, 256, 160, False)]:
        pk = torch.zeros(n, max(k, 256) // 4, dtype=torch.uint8)
        why = wg._shape_problem(torch.empty(m, k, dtype=torch.bfloat16), pk, wg.MAX_M)
        assert (why is None) == ok, (m, k, n, why)
    assert wg._shape_problem(torch.empty(1, 256, dtype=torch.float16), packed, 8) is not None
    assert wg._shape_problem(torch.empty(1, 256, dtype=torch.bfloat16), packed, 0) is not None


def test_repacked_weights_are_cached_per_tensor_and_version():
    _, packed, _, _ = _weight(64, 256, seed=5)
    a = wg.repacked(packed)
    assert wg.repacked(packed) is a and torch.equal(a, wg.repack_w2a16(packed))
    packed[0, 0] ^= 0xFF  # an in-place change invalidates the cached words
    b = wg.repacked(packed)
    assert b is not a and torch.equal(b, wg.repack_w2a16(packed)) and not torch.equal(a, b)
    key = id(packed)
    del packed
    assert key not in wg._REPACKED


# ----------------------------------------------------------------------------------------
# pipelined variant (STAGES >= 1): the x path through shared memory and the launch plan
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bn,mp,xr,xt,nw", [(128, 8, 1, 4, 4), (64, 8, 2, 2, 4), (128, 8, 8, 16, 4), (64, 16, 16, 1, 2),
                                            (256, 8, 4, 8, 8), (128, 8, 1, 64, 4)])
def test_pipe_x_layouts_feed_the_b_fragments(bn, mp, xr, xt, nw):
    """The shared-memory x path of the pipelined kernel gives every thread the x elements of its
    B fragments: for each (register, lane, warp), the staged word it loads (row 4m + t, word i of
    group column u) is x row m of pair i of group 4t + u, with t = lane & 3 and m = the B column
    of the lane (gid, plus 8 for the MP = 16 register) modulo XR (columns >= M are never stored,
    so any finite row will do there; rows < M are exact because XR >= M). The 4-D layout after
    the register broadcast names the same (m, t, i) per register."""
    b = wg.pipe_layout_bases(bn, mp, xr, xt, nw)
    xs, x4 = b["xs"], b["x4"]
    assert len(xs["reg"]) == len(x4["reg"]) and xs["shape"] == [xr * 4, 8] and x4["shape"] == [mp // xr, xr, 4, 8]
    for warp in range(nw):
        for lane in range(32):
            gid, t = lane >> 2, lane & 3
            for r in range(1 << len(xs["reg"])):
                row, i = wg._coord(xs, r, lane, warp)
                col = gid + 8 * (r >> 3)  # B column of this register (MP = 16: the 4th register bit)
                assert row % 4 == t and row // 4 == col % xr and 0 <= i < 8
                d0, d1, t4, i4 = wg._coord(x4, r, lane, warp)
                assert (d0 * xr + d1, t4, i4) == (col, t, i)


@pytest.mark.parametrize("bn,mp,xr,xt,nw", [(128, 8, 1, 4, 4), (64, 8, 2, 2, 4), (128, 8, 8, 16, 4), (64, 16, 16, 1, 2),
                                            (128, 8, 1, 1, 4)])
def test_pipe_x_copy_layout_covers_the_staged_tiles(bn, mp, xr, xt, nw):
    """The cp.async staging copy writes every word of [XT, XR*4, 32] in 16-byte pieces (four
    consecutive words of a row per thread and copy); threads beyond the tile only duplicate."""
    xc = wg.pipe_layout_bases(bn, mp, xr, xt, nw)["xc"]
    seen = set()
    for warp in range(nw):
        for lane in range(32):
            for r in range(1 << len(xc["reg"])):
                c = tuple(wg._coord(xc, r, lane, warp))
                if r & 3 == 0:
                    assert c[2] % 4 == 0  # 16-byte aligned start
                    assert [tuple(wg._coord(xc, r + v, lane, warp)) for v in range(4)] == \
                        [(c[0], c[1], c[2] + v) for v in range(4)]
                seen.add(c)
    assert len(seen) == xt * xr * 4 * 32


def test_pipe_x_tile_words_are_the_classic_x_words():
    """Staged tile word (row 4m + t, column 8u + i) = the classic kernel's x word 32t + 8u + i of
    row m (bf16 pair of elements 16(4t + u) + 2i + (0, 1)), i.e. the chunk the pipelined kernel
    copies (``x_off = tile * 128 + t * 32 + w``) is a plain reshape of x's words."""
    m, k, tile = 3, 1024, 2
    x = torch.randn(m, k).to(torch.bfloat16)
    xw = x.view(torch.int32)  # [M, K/2]
    staged = xw[:, 128 * tile:128 * tile + 128].reshape(m, 4, 32)  # [m, t, w] -> row 4m + t
    for t in range(4):
        for u in range(4):
            for i in range(8):
                pair = x[:, 16 * (4 * t + u) + 2 * i + 256 * tile:16 * (4 * t + u) + 2 * i + 2 + 256 * tile]
                assert torch.equal(staged[:, t, 8 * u + i], pair.contiguous().view(torch.int32)[:, 0])


@pytest.mark.parametrize("k,n,cfg", [
    (8192, 8192, dict()), (8192, 8192, dict(STAGES=4)), (4096, 4096, dict(STAGES=3, SPLIT_K=8)),
    (11008, 4096, dict(STAGES=6, SPLIT_K=4)), (4096, 11008, dict(STAGES=8, SPLIT_K=16)),
    (4096, 22016, dict(STAGES=2, SPLIT_K=1)), (2816, 4096, dict(STAGES=5, SPLIT_K=3)),
    (4096, 2048, dict(SPLIT_K=5)), (1280, 512, dict(STAGES=4, SPLIT_K=1)),
])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_pipe_plan_covers_every_tile_once(k, n, cfg, m):
    """Replays the pipelined kernel's schedule per program (``pipe_plan`` and the loop of
    ``_w2a16_pipe_kernel``): every (row block, tile) is computed exactly once, shares with a
    tile count that is not a multiple of STAGES (or one tile, or none) included; the ring slot
    a position is copied into was last read STAGES positions earlier (a step before the copy),
    and the x tiles a program reads were all copied (once, with position 0)."""
    cfg = wg.default_config(m, n, k, **cfg)
    plan = wg.pipe_plan(m, n, k, cfg)
    bn, split, stages = cfg["BLOCK_N"], cfg["SPLIT_K"], cfg["STAGES"]
    tpi = plan["TPI"]
    tiles = k // 256
    assert stages >= 1 and plan["G"] == (n // bn) * split and plan["XR"] >= m and plan["XT"] >= tpi
    done = {}
    for pid in range(plan["G"]):
        rb, c = divmod(pid, split)
        slot_pos = {}
        for p in range(stages - 1):
            slot_pos[p % stages] = p
        for j in range(tpi):
            p = j + stages - 1
            prev = slot_pos.get(p % stages)
            assert prev is None or prev <= j - 1  # its last reader was an earlier step
            slot_pos[p % stages] = p
            assert slot_pos[j % stages] == j
            tile = c * tpi + j
            assert 0 <= j < plan["XT"]
            if tile < tiles:
                assert (rb, tile) not in done
                done[(rb, tile)] = pid
    assert len(done) == (n // bn) * tiles
    assert plan["smem"] == stages * bn * 80 + plan["XT"] * plan["XR"] * 512


def test_default_config_is_the_two_stage_pipeline_with_a_classic_fallback():
    """The default runs the pipelined kernel with STAGES=2 (routed by qlinear); STAGES=0 is the
    classic kernel; where the staged x of a K share would not fit in shared memory the default
    falls back to the classic kernel (same N % BLOCK_N, K % 256 constraints: gluon_unsupported
    stays valid), while an explicit STAGES is kept (the launcher then raises)."""
    assert wg.default_config(1, 8192, 8192)["STAGES"] == 2
    assert wg.default_config(1, 8192, 8192, STAGES=0)["STAGES"] == 0
    big = wg.default_config(8, 28672, 131072)  # split 4: TPI 128, 8 x rows: 256 KB of x
    assert wg.pipe_plan(8, 28672, 131072, dict(big, STAGES=2))["smem"] > wg.SMEM_LIMIT
    assert big["STAGES"] == 0
    assert wg.default_config(8, 28672, 131072, STAGES=2)["STAGES"] == 2
    for m in (1, 8, 16):
        for k in (256, 4096, 11008, 28672):
            cfg = wg.default_config(m, 4096, k)
            assert cfg["STAGES"] == 2 and wg.pipe_plan(m, 4096, k, cfg)["smem"] <= wg.SMEM_LIMIT


def test_default_config_rejects_unknown_keys():
    """A stale or misspelt tile option is an error, not silently ignored."""
    assert wg.default_config(1, 8192, 8192, STAGES=3)["STAGES"] == 3
    with pytest.raises(ValueError, match="unknown Gluon W2A16 config keys"):
        wg.default_config(1, 8192, 8192, RING2=True)
