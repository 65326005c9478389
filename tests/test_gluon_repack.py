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
    N % 128 == 0 to the Gluon kernel; on this machine (interpreter, CPU tensors) never."""
    _, packed, _, _ = _weight(128, 256, seed=4)
    assert wg.gluon_unsupported(torch.randn(1, 256, dtype=torch.bfloat16), packed) is not None
    # the shape and dtype rules on their own
    for m, k, n, ok in [(1, 256, 128, True), (8, 4096, 4096, True), (9, 256, 128, False), (1, 4080, 128, False),
                        (1, 256, 192, False)]:
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
