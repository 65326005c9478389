"""Triton W2A2 prologue and GEMM, and the codebook GEMV, on the CPU through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1). Full-size checks: tests/gpu/test_triton_gpu.py.

References are independent of the kernels: ``lowbit.formats`` (through the reference ops) for
the codes and scales, which must match bit for bit, and float64 products of the dequantized
operands for the GEMMs, which round only in their fp32 accumulation.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from lowbit import ops as lowbit_ops  # noqa: E402
from lowbit.codebook import CodebookFormat, CodebookLinear  # noqa: E402
from lowbit.codegen.triton import codebook as kc  # noqa: E402
from lowbit.codegen.triton import w2a2 as k2  # noqa: E402
from lowbit.formats import QFormat, pack_codes, quantize_weight_rtn  # noqa: E402


def _activation(m, k, seed, dtype=torch.bfloat16):
    """Magnitudes over six decades (subnormal and clamped E4M3 scales) and all-zero groups."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-4, 2, k)[torch.randperm(k, generator=g)]
    x[: max(1, m // 3), :16] = 0
    return x.to(dtype)


def _same(a, b):
    """Bit-identical, except that an E4M3 zero scale may be +0 or -0: the reference takes
    ``torch.maximum(+0.0, -0.0)`` for an all-zero group, whose sign PyTorch's CPU kernels
    leave to the code path (vectorized body or scalar tail)."""
    if a.dtype != b.dtype:
        return False
    if a.dtype != torch.float8_e4m3fn:
        return torch.equal(a, b)
    ab, bb = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(ab & 0x7F, bb & 0x7F) and torch.equal(torch.where((ab & 0x7F) == 0, 0, ab),
                                                              torch.where((bb & 0x7F) == 0, 0, bb))


@pytest.mark.parametrize("bits,grid,dtype", [(2, "int", torch.bfloat16), (2, "half", torch.float16),
                                             (4, "int", torch.float32), (8, "int", torch.bfloat16)])
def test_prologue_codes_and_scales_bit_exact(bits, grid, dtype):
    x = _activation(6, 96, seed=bits, dtype=dtype)
    ref = lowbit_ops.quantize_act._init_fn(x, bits, grid, 16, "e4m3")
    got = k2.act_quant(x, bits, grid)
    assert all(_same(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("bits,grid,dtype,hadamard", [
    (2, "int", torch.bfloat16, False), (2, "half", torch.float16, False),
    (4, "int", torch.float32, False), (2, "int", torch.bfloat16, True)])
# 0.55: a preset's ratio (not an fp32 value); 0.6837 in fp32: a ratio learned in training (act_clip_lr)
@pytest.mark.parametrize("clip", [0.55, float(torch.tensor(0.6837))])
def test_prologue_with_activation_clipping_bit_exact(bits, grid, dtype, hadamard, clip):
    """A clipped activation format: the kernel's codes, scales and (clipped) global equal the
    reference op's, and the codes follow the definition written out in float64: the stored
    scales of clip = 1, the global times clip, elements beyond the end levels clamped."""
    x = _activation(6, 128, seed=7, dtype=dtype)
    xin = torch.ops.lowbit.hadamard(x) if hadamard else x
    ref = lowbit_ops.quantize_act._init_fn(xin, bits, grid, 16, "e4m3", clip)
    got = k2.act_quant(x, bits, grid, hadamard=hadamard, clip=clip)
    assert all(_same(a, b) for a, b in zip(got, ref))
    codes, stored, gscale = ref
    unclipped = lowbit_ops.quantize_act._init_fn(xin, bits, grid, 16, "e4m3")
    assert _same(stored, unclipped[1]) and torch.equal(gscale, (unclipped[2] * torch.tensor(clip)).float())
    fmt = QFormat(bits, grid)
    eff = (stored.double() * gscale.double()).repeat_interleave(16, -1)
    r = xin.double() / torch.where(eff == 0, 1.0, eff)
    q = (torch.floor(r) if grid == "half" else torch.round(r)).clamp(fmt.qmin, fmt.qmax)
    assert torch.equal(codes.double(), torch.where(eff == 0, 0.0, q))
    assert (codes == fmt.qmax).sum() > (unclipped[0] == fmt.qmax).sum()  # clipping saturates more elements
    if bits == 2 and grid == "int":  # the E4M3 values of the FP8 GEMM: q * stored, the clip in the global
        a8, s8, g8 = k2.act_quant(x, 2, "int", hadamard=hadamard, fp8_values=True, clip=clip)
        assert torch.equal(g8, gscale)
        assert torch.equal(a8.float(), (codes.float().view(6, 8, 16) * stored.float().unsqueeze(-1)).view(6, 128))


def test_prologue_split_gather_padding_and_e4m3_values():
    x = _activation(5, 70, seed=3)
    index = torch.tensor(list(range(70)) + [3, 9, 60, 0, 41, 5, 5, 69, 1, 2])
    scale = torch.where(torch.arange(80) % 3 == 0, 0.5, 1.0)
    xs = torch.ops.lowbit.channel_split(x, index, scale)                  # [5, 80]
    codes, sc, gs = lowbit_ops.quantize_act._init_fn(torch.nn.functional.pad(xs, (0, 16)), 2, "int", 16, "e4m3")
    a8, sc2, gs2 = k2.act_quant(x, 2, "int", 96, index, scale, fp8_values=True)
    assert _same(sc2, sc) and torch.equal(gs2, gs)
    # the E4M3 activation values are q * stored exactly, so the codes come back bit for bit
    assert torch.equal(a8.float(), (codes.float().view(5, 6, 16) * sc.float().unsqueeze(-1)).view(5, 96))
    c2, _, _ = k2.act_quant(x, 2, "int", 96, index, scale)
    assert torch.equal(c2, codes)


def test_weight_e4m3_values_exact():
    qt = quantize_weight_rtn(torch.randn(24, 64), QFormat(2))
    w8 = k2.weight_e4m3(pack_codes(qt.codes, 2), qt.scales)
    assert torch.equal(w8.float(), qt.codes.float() * qt.scales.float().repeat_interleave(16, 1))


@pytest.mark.parametrize("m,config", [
    (17, dict(PAIRS=False, BLOCK_M=16, BLOCK_N=16, BLOCK_G=4)),
    (3, dict(PAIRS=True, BLOCK_M=16, BLOCK_N=16, BLOCK_G=4, SPLIT_K=2)),
])
def test_w2a2_gemm_against_float64(m, config):
    n, k = 40, 120  # K not a multiple of 16: the weight is padded to 128
    qt = quantize_weight_rtn(torch.randn(n, 128), QFormat(2))
    packed = pack_codes(qt.codes, 2)
    x = _activation(m, k, seed=m)
    bias = torch.randn(n)
    a8, _, ga = k2.act_quant(x, 2, "int", 128, fp8_values=True)
    ref = (a8.double() * ga.double()) @ qt.dequantize().double().T + bias.double()
    y = k2.w2a2_linear(x, packed, qt.scales, qt.global_scale, bias, out_dtype=torch.float32, **config)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    # and the reference op's output (which quantizes x the same way) in x's dtype
    yr = lowbit_ops.qlinear_reference(x, packed, qt.scales, qt.global_scale, bias, 2, "int", 16, "e4m3",
                                      2, "int", 16, "e4m3")
    assert torch.allclose(y.to(x.dtype).float(), yr.float(), rtol=2e-2, atol=1e-2 * yr.abs().max().item())


def test_w2a2_linear_with_clipped_activations_against_float64():
    """The FP8 GEMM consumes clipped activations unchanged (q * stored in E4M3; the clip ratio
    rides in the activation's global scale): float64 product of the dequantized operands, and
    the reference op with the same clip ratio; through the CUDA dispatch function too."""
    from lowbit.codegen.triton.dispatch import qlinear_triton

    n, k, m = 40, 128, 5
    qt = quantize_weight_rtn(torch.randn(n, k), QFormat(2))
    packed = pack_codes(qt.codes, 2)
    x = _activation(m, k, seed=11)
    a8, _, ga = k2.act_quant(x, 2, "int", k, fp8_values=True, clip=0.6)
    ref = (a8.double() * ga.double()) @ qt.dequantize().double().T
    y = k2.w2a2_linear(x, packed, qt.scales, qt.global_scale, None, out_dtype=torch.float32, clip=0.6,
                       PAIRS=False, BLOCK_M=16, BLOCK_N=16, BLOCK_G=4)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    yr = lowbit_ops.qlinear_reference(x.float(), packed, qt.scales, qt.global_scale, None, 2, "int", 16, "e4m3",
                                      2, "int", 16, "e4m3", 0.6)
    assert ((yr.double() - ref).norm() / ref.norm()).item() < 1e-5
    unclipped = lowbit_ops.qlinear_reference(x.float(), packed, qt.scales, qt.global_scale, None, 2, "int", 16,
                                             "e4m3", 2, "int", 16, "e4m3")
    assert ((unclipped.double() - ref).norm() / ref.norm()).item() > 1e-3  # the clip ratio matters
    # a half-grid activation has no exact FP8 path: the dispatch falls back to the reference op
    yh = qlinear_triton(x.float(), packed, qt.scales, qt.global_scale, None, 2, "int", 16, "e4m3",
                        2, "half", 16, "e4m3", 0.6)
    assert torch.equal(yh, lowbit_ops.qlinear_reference(x.float(), packed, qt.scales, qt.global_scale, None, 2,
                                                        "int", 16, "e4m3", 2, "half", 16, "e4m3", 0.6))


def test_w2a2_linear_with_the_online_hadamard_is_the_rotated_site():
    """w2a2_linear(hadamard=True) computes, bit for bit, what it computes on hadamard(x); and
    against float64 it is the rotated site: hadamard(x) quantized, times the weight."""
    n, k = 24, 64
    qt = quantize_weight_rtn(torch.randn(n, k), QFormat(2))
    packed = pack_codes(qt.codes, 2)
    x = _activation(5, k, seed=21)
    cfg = dict(PAIRS=False, BLOCK_M=16, BLOCK_N=16, BLOCK_G=4, out_dtype=torch.float32)
    y = k2.w2a2_linear(x, packed, qt.scales, qt.global_scale, hadamard=True, **cfg)
    h = torch.ops.lowbit.hadamard(x)
    assert torch.equal(y, k2.w2a2_linear(h, packed, qt.scales, qt.global_scale, **cfg))
    codes, sc, gs = lowbit_ops.quantize_act._init_fn(h, 2, "int", 16, "e4m3")
    xq = (codes.double().view(5, -1, 16) * sc.double().unsqueeze(-1)).view(5, k) * gs.double()
    ref = xq @ qt.dequantize().double().T
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("c,config", [
    (4, dict(path="table", R=16, BLOCK_N=16)),
    (6, dict(path="table", R=4, BLOCK_N=16)),
    (6, dict(path="table", R=8, BLOCK_N=16, TABLE="gather")),  # tl.gather of the table at every block
    (11, dict(path="table", R=4, BLOCK_N=16, SPLIT_N=2, RED=2)),  # two row slices, 3 chunks, 2-deep reduction
    (4, dict(path="decode", BLOCK_N=16, BLOCK_V=8, SPLIT_K=2)),               # index words, codewords from memory
    (6, dict(path="decode", BLOCK_N=16, BLOCK_V=8, SPLIT_K=1, GATHER=True)),  # index bytes, table via tl.gather
    (11, dict(path="decode", BLOCK_N=32, BLOCK_V=8, SPLIT_K=3, WORDS=False)),
    (11, dict(path="decode", BLOCK_N=16, BLOCK_V=8, SPLIT_K=2, ONE_DOT=False)),  # eight pair products per tile
])
def test_codebook_gemv_against_float64(c, config):
    torch.manual_seed(c)
    lin = CodebookLinear.from_weight(torch.randn(40, 136), torch.randn(40), CodebookFormat(16, c, 0, "e4m3"))
    x = torch.randn(3, 136).to(torch.bfloat16)
    ref = x.double() @ lin.dequantized_weight().double().T + lin.bias.double()
    y = kc.codebook_gemv(x, lin.indices_packed, lin.codebook_packed, lin.weight_scales, lin.weight_global, lin.bias,
                         c, lin.packed_in_features, out_dtype=torch.float32, **config)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


def _codebook_operands(n, mv, c, seed):
    """Random btc-like operands: index bytes, codebook, E4M3 row scales, global scale, bias."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (n, -(-mv * c // 8)), generator=g, dtype=torch.uint8)
    cb = torch.randint(0, 256, ((1 << c) * 2,), generator=g, dtype=torch.uint8)
    sc = (torch.rand(n, 1, generator=g) * 200 + 1).to(torch.float8_e4m3fn)
    return idx, cb, sc, torch.tensor(1e-3), torch.randn(n, generator=g)


# (N, vectors per row, K of x, M, c, config): N not a multiple of BLOCK_N, K past the last whole
# vector (padded width), index rows not a whole number of words (byte loads), several rows of x;
# the first case also runs twice (same bits: the first launch left its counters at zero)
_TABLE_FUZZ = [
    (40, 9, 140, 3, 11, dict(R=4, BLOCK_N=16, TABLE="global")),  # 13-byte rows: words, rows off word bounds
    (50, 6, 96, 2, 8, dict(R=8, BLOCK_N=32, SPLIT_N=1, RED=1, TABLE="gather", WORDS=False)),  # 1 chunk, bytes
    (33, 12, 190, 1, 6, dict(R=2, BLOCK_N=16, SPLIT_N=3, SWZ=False)),  # 9-byte rows: byte loads
    (64, 8, 128, 2, 4, dict(R=4, BLOCK_N=32, SPLIT_N=1, LOADS="rotated")),  # lane-rotated word loads
    (21, 5, 80, 4, 11, dict(R=8, BLOCK_N=8, SPLIT_N=2, TABLE="gather", RED=4)),  # 7-byte rows: byte loads
]


@pytest.mark.parametrize("n,mv,k,m,c,config", _TABLE_FUZZ)
def test_codebook_table_path_fuzzed(n, mv, k, m, c, config):
    """path="table" against float64 on the dequantized weight: shapes off every tile, all index
    loads (words, lane-rotated words, bytes), all table modes ("shared" runs as "global" in the
    interpreter), bias."""
    from lowbit.codebook import dequantize_codebook_weight

    idx, cb, sc, gs, bias = _codebook_operands(n, mv, c, seed=n + k)
    w = dequantize_codebook_weight(idx, cb, sc, gs, 16, c, 16 * mv, "e4m3", k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    ref = x.double() @ w.double().T + bias.double()
    args = (x, idx, cb, sc, gs, bias, c, 16 * mv)
    y = kc.codebook_gemv(*args, out_dtype=torch.float32, path="table", **config)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    if (n, mv, k, m, c, config) == _TABLE_FUZZ[0]:
        assert torch.equal(y, kc.codebook_gemv(*args, out_dtype=torch.float32, path="table", **config))


def test_codebook_table_path_defaults_and_leading_dims():
    """The default table configuration (R=16, shared-memory table, L2 prefetch off in the
    interpreter) on fp16 x with leading dims, fp16 output and no bias."""
    from lowbit.codebook import dequantize_codebook_weight

    n, mv, c = 45, 20, 11
    idx, cb, sc, gs, _ = _codebook_operands(n, mv, c, seed=3)
    w = dequantize_codebook_weight(idx, cb, sc, gs, 16, c, 16 * mv, "e4m3")
    x = torch.randn(2, 1, 16 * mv, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    ref = x.double() @ w.double().T
    y = kc.codebook_gemv(x, idx, cb, sc, gs, None, c, 16 * mv, path="table", BLOCK_N=16)
    assert y.shape == (2, 1, n) and y.dtype == torch.float16
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_codebook_table_shared_guards():
    """TABLE="shared": BLOCK_N above 32 * num_warps is refused before launch, and the TTGIR check
    refuses a compiled kernel with a shared-memory op between the barrier after the table
    stores and the one after the lookup loop (the layout conversion that Triton 3.6 put there
    for R=16 BLOCK_N=512 overwrote the table on the H200); path=None routes by shape."""
    import types

    idx, cb, sc, gs, _ = _codebook_operands(8, 4, 11, seed=1)
    x = torch.randn(1, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="BLOCK_N <= 32"):
        kc.codebook_gemv(x, idx, cb, sc, gs, None, 11, 64, path="table", BLOCK_N=128, num_warps=2)
    asm = "\n".join(['%t = tt.elementwise_inline_asm "{ st.shared.b32 [a], $2; }"', "gpu.barrier",
                     "scf.for {", "%v = tt.elementwise_inline_asm \"{ ld.shared.b32 $0, [a]; }\"", "%c", "}",
                     "gpu.barrier", "%r = ttg.convert_layout %x"])
    ok = types.SimpleNamespace(hash="ok", metadata=types.SimpleNamespace(shared=4096), asm={"ttgir": asm})
    kc._check_shared_table(ok, 4096)
    bad = types.SimpleNamespace(hash="bad", metadata=ok.metadata,
                                asm={"ttgir": asm.replace("%c", "%c = ttg.convert_layout %acc")})
    with pytest.raises(RuntimeError, match="lookup loop"):
        kc._check_shared_table(bad, 4096)
    with pytest.raises(RuntimeError, match="shared memory"):
        kc._check_shared_table(types.SimpleNamespace(hash="small", metadata=types.SimpleNamespace(shared=1024),
                                                     asm=ok.asm), 4096)
    assert kc._table_route(1, 8192, 8192, 11) and not kc._table_route(1, 4096, 4096, 11)
    assert not kc._table_route(16, 8192, 8192, 11) and not kc._table_route(1, 8192, 8192, 8)


def test_codebook_auto_route_falls_back_to_decode_when_the_table_guard_refuses(monkeypatch):
    """path=None: a table build refused by the compiled-kernel guard is recomputed by the
    decode path (with a warning), so the default never returns a suspect result; an explicit
    path="table" raises."""
    from lowbit.codebook import dequantize_codebook_weight

    idx, cb, sc, gs, _ = _codebook_operands(8, 4, 11, seed=2)
    w = dequantize_codebook_weight(idx, cb, sc, gs, 16, 11, 64, "e4m3", 64)
    x = torch.randn(1, 64).to(torch.bfloat16)

    def refused(*args, **kwargs):
        raise RuntimeError("codebook table kernel, TABLE='shared': refused (test)")

    monkeypatch.setattr(kc, "_table_route", lambda *a: True)
    monkeypatch.setattr(kc, "_table_gemv", refused)
    kc._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="falls back to path='decode'"):
        y = kc.codebook_gemv(x, idx, cb, sc, gs, None, 11, 64, out_dtype=torch.float32)
    assert torch.equal(y, kc.codebook_gemv(x, idx, cb, sc, gs, None, 11, 64, out_dtype=torch.float32,
                                           path="decode"))
    ref = x.double() @ w.double().T
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    with pytest.raises(RuntimeError, match="refused"):
        kc.codebook_gemv(x, idx, cb, sc, gs, None, 11, 64, path="table")


@pytest.mark.parametrize("n,dtype,bits,grid", [(16, torch.bfloat16, 2, "int"), (64, torch.float16, 2, "half"),
                                               (256, torch.float32, 4, "int"), (1024, torch.bfloat16, 2, "int")])
def test_prologue_with_online_hadamard_bit_exact(n, dtype, bits, grid):
    """hadamard=True: the codes and scales of quantize_act(hadamard(x)), the reference ops
    composed as a rotated site's prologue runs them, bit for bit."""
    x = _activation(5, n, seed=n, dtype=dtype)
    ref = lowbit_ops.quantize_act._init_fn(torch.ops.lowbit.hadamard(x), bits, grid, 16, "e4m3")
    got = k2.act_quant(x, bits, grid, hadamard=True)
    assert all(_same(a, b) for a, b in zip(got, ref))


def test_prologue_with_online_hadamard_then_split_and_e4m3_values():
    """The full prologue of a rotated and split site (hadamard, then channel_split, padded):
    scales bit for bit and E4M3 values equal to codes x stored scales."""
    n = 64
    x = _activation(7, n, seed=11)
    index = torch.tensor(list(range(n)) + [3, 9, 60, 0, 41, 5, 5, 63, 1, 2])
    scale = torch.where(torch.arange(n + 10) % 3 == 0, 0.5, 1.0)
    xs = torch.ops.lowbit.channel_split(torch.ops.lowbit.hadamard(x), index, scale)   # [7, 74]
    codes, sc, gs = lowbit_ops.quantize_act._init_fn(torch.nn.functional.pad(xs, (0, 6)), 2, "int", 16, "e4m3")
    a8, sc2, gs2 = k2.act_quant(x, 2, "int", 80, index, scale, fp8_values=True, hadamard=True)
    assert _same(sc2, sc) and torch.equal(gs2, gs)
    assert torch.equal(a8.float(), (codes.float().view(7, 5, 16) * sc.float().unsqueeze(-1)).view(7, 80))
    c2, _, _ = k2.act_quant(x, 2, "int", 80, index, scale, hadamard=True)
    assert torch.equal(c2, codes)
    with pytest.raises(ValueError, match="power-of-two"):
        k2.act_quant(x[:, :48], 2, "int", hadamard=True)


# -- the 2-bit thresholds (module docstring of lowbit.codegen.triton.w2a2) ------------------------

def _q_reference(x32, e32):
    """clamp(round_half_even(fl32(x / e)), -2, 1), 0 where e == 0 (lowbit.formats.quantize_codes)."""
    r = x32 / torch.where(e32 == 0, torch.ones_like(e32), e32)
    return torch.where(e32 == 0, 0.0, torch.round(r).clamp(-2, 1))


def _hard_scales(g):
    """fp32 effective scales: random E4M3 value times random global over many binades, the
    extremes, powers of two and e = E 2^k with 3E = 1 mod 2^17 (a bf16 number then lies in
    [y, 1.5 e), y = (1.5 - 2^-24) e: the smallest bf16 above y is not the one above 1.5 e)."""
    stored = torch.tensor([2.0 ** -9, 3 * 2.0 ** -9, 2.0 ** -6, 0.875, 1.0, 1.125, 13.0, 224.0])
    stored = stored[torch.randint(0, 8, (40,), generator=g)]
    glob = torch.exp2(torch.randint(-99, 100, (40,), generator=g).float()) * (1 + torch.rand(40, generator=g))
    e = (stored * glob).float()
    mant = [(1 + (1 << 17) * j) // 3 for j in range(1, 400) if (1 + (1 << 17) * j) % 3 == 0]
    mant = [m for m in mant if (1 << 23) <= m < (1 << 24)][:8]
    special = [float(m) * 2.0 ** p for m, p in zip(mant, (-23, -30, -10, 0, 5, -60, 40, -90))]
    special += [2.0 ** -100, 2.0 ** -99 * 1.5, 1.0, 2.0 ** 100, 3.0e38, 2.2e38, 1e-3, 0.0]
    return torch.cat([e, torch.tensor(special)]).float()


def _probe_values(e, dtype):
    """x of ``dtype`` around T e for the thresholds T = 1/2, -1/2, -3/2 (and 3/2, -5/2): the
    nearest values of the format and three neighbours on each side, plus +-0."""
    vals = [torch.zeros_like(e), -torch.zeros_like(e)]
    inf = torch.full_like(e, float("inf")).to(dtype)
    for t in (0.5, -0.5, -1.5, 1.5, -2.5):
        v = (e * t).to(dtype)
        up, down = v, v
        vals.append(v.float())
        for _ in range(3):
            up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
            vals += [up.float(), down.float()]
    return torch.stack(vals, -1)  # [n, 37] fp32 values of the format


@triton.jit
def _threshold_probe(e_ptr, x_ptr, out_ptr, N: tl.constexpr, M: tl.constexpr, MODE: tl.constexpr):
    """q of x[n, :] for e[n]: MODE 0 fp32 thresholds, 1 bf16, 2 fp16 (16-bit bits, fp32 compare)."""
    n = tl.arange(0, N)
    j = tl.arange(0, M)
    e = tl.load(e_ptr + n)
    x = tl.load(x_ptr + n[:, None] * M + j[None, :])
    if MODE == 0:
        t1, t3 = k2._int2_thresholds(e)
        t2 = -t1
    else:
        u1, u2, u3 = k2._int2_thresholds16(e, MODE == 2)
        t1 = k2._from16(u1, MODE == 2)
        t2 = k2._from16(u2, MODE == 2)
        t3 = k2._from16(u3, MODE == 2)
    q = tl.where(x >= t2[:, None], tl.where(x > t1[:, None], 1, 0), tl.where(x > t3[:, None], -1, -2))
    if MODE != 0:  # a 16-bit group with e == 0 gets zero bytes, not thresholds
        q = tl.where(e[:, None] == 0.0, 0, q)
    tl.store(out_ptr + n[:, None] * M + j[None, :], q)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # fl(1.5 e) = inf: meant
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int2_thresholds_decide_round_half_even_of_the_ieee_quotient(dtype):
    """The kernel's thresholds give, for every x next to a decision point T e (ties included),
    the code of the IEEE division: the fp32 thresholds for any e (fp32 x), the 16-bit ones for
    16-bit x (e finite: 16-bit x give finite scales)."""
    g = torch.Generator().manual_seed(7)
    e = _hard_scales(g)
    if dtype != torch.float32:  # what 16-bit x give: finite e, above 2^-100 outside tiny rows
        e = e[(e == 0) | ((e > 2.0 ** -100) & (e < (3.39e38 if dtype == torch.bfloat16 else 65504.0)))]
    n = 64
    e = torch.cat([e, torch.full((n - e.numel() % n,), 1.0)]) if e.numel() % n else e
    mode = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]
    for chunk in e.split(n):
        x = _probe_values(chunk, dtype)
        x = torch.cat([x, torch.zeros(n, 64 - x.shape[1])], 1).contiguous()
        out = torch.empty(n, 64, dtype=torch.int32)
        _threshold_probe[(1,)](chunk.contiguous(), x, out, N=n, M=64, MODE=mode)
        ref = _q_reference(x, chunk[:, None])
        bad = out.float() != ref
        assert not bad.any(), (chunk[bad.any(1)][:4], x[bad][:4], out[bad][:4], ref[bad][:4])


@triton.jit
def _bytes_probe(c_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    c, b1, b0 = k2._int2_group_bytes(tl.load(c_ptr + i), True)
    tl.store(out_ptr + i * 3, c)
    tl.store(out_ptr + i * 3 + 1, b1)
    tl.store(out_ptr + i * 3 + 2, b0)


def test_int2_fp8_bytes_are_the_e4m3_codes_of_q_times_stored():
    """Every nonzero 2-bit scale code c (stored up to 224, subnormals included): the bytes the
    kernel writes for q = 1, -1, -2 are the E4M3 codes of q * stored."""
    c = torch.arange(1, 0x77, dtype=torch.int32)  # 0x76 = 224
    n = 128
    out = torch.empty(n, 3, dtype=torch.int32)
    _bytes_probe[(1,)](torch.nn.functional.pad(c, (0, n - c.numel()), value=1), out, N=n)
    stored = c.to(torch.uint8).view(torch.float8_e4m3fn).float()
    for j, q in enumerate((1, -1, -2)):
        want = (q * stored).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
        assert torch.equal(out[: c.numel(), j], want), q


# -- adversarial activations: planted decision points, zeros, subnormals, tiny and huge rows ----

def _neighbours(v, steps):
    inf = torch.full_like(v, float("inf"))
    out = [v]
    up, down = v, v
    for _ in range(steps):
        up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
        out += [up, down]
    return out


def _plant_ties(x, eff, gen, frac=0.6):
    """x [M, K] with, in every group of effective scale eff [M, K/16] > 0, about ``frac`` of the
    elements (never the group's max or min, and only values between them, so the scales stay)
    replaced by the values of x's format nearest T * e (T = 1/2, -1/2, -3/2) or two steps away."""
    m, k = x.shape
    xf = x.float().view(m, k // 16, 16)
    cands = []
    for t in (0.5, -0.5, -1.5):
        cands += _neighbours((eff * t).to(x.dtype), 2)
    cands = torch.stack(cands, -1).float()  # [M, G, 15]
    pick = cands.gather(-1, torch.randint(0, cands.shape[-1], xf.shape, generator=gen))
    pos = torch.arange(16)
    extreme = (pos == xf.argmax(-1, keepdim=True)) | (pos == xf.argmin(-1, keepdim=True))
    ok = ((pick <= xf.amax(-1, keepdim=True)) & (pick >= xf.amin(-1, keepdim=True)) & ~extreme
          & (torch.rand(xf.shape, generator=gen) < frac) & (eff[..., None] > 0))
    return torch.where(ok, pick, xf).view(m, k).to(x.dtype)


def _adversarial(m, k, dtype, seed):
    """Rows of every kind, then decision points planted against the reference's scales:
    rows whose largest group scale is 224 2^p (global 2^p, on the CPU and on CUDA: so T e is
    exact in 16 bits and the ties are exact), random rows over six decades with zero groups,
    subnormal values, a zero row, tiny rows (global below 2^-90: scaled path) and huge ones."""
    g = torch.Generator().manual_seed(seed)
    big = 65504.0 if dtype == torch.float16 else 3.0e38
    x = torch.randn(m, k, generator=g) * torch.logspace(-4, 2, k)[torch.randperm(k, generator=g)]
    for r in range(m):
        kind = r % 6
        if kind in (0, 5):  # the global a power of two
            p = int(torch.randint(-20, 8, (1,), generator=g)) if dtype == torch.float16 else \
                int(torch.randint(-60, 60, (1,), generator=g))
            x[r] = x[r] / x[r].abs().max() * 200 * 2.0 ** p
            x[r, 0] = 224 * 2.0 ** p
        elif kind == 1:  # zero groups, subnormals of the format, groups with subnormal E4M3 scales
            x[r, :16] = 0
            x[r, 16:20] = torch.tensor([-0.0, 0.0, 1.0, -1.0]) * torch.finfo(dtype).tiny / 4
            x[r, 32:64] = torch.linspace(-2, 1, 32) * x[r].abs().max() * torch.tensor([2.0 ** -14, 2.0 ** -17]
                                                                                        ).repeat_interleave(16)
        elif kind == 2 and dtype != torch.float16:  # tiny rows: the scaled path
            x[r] = x[r] / x[r].abs().max() * 1e-38
            x[r, 3] = 224 * 2.0 ** -130
        elif kind == 3:
            x[r] = x[r] / x[r].abs().max() * big / 4
        elif kind == 4:
            x[r] = 0
    x = x.to(dtype)
    _, sc, gs = lowbit_ops.quantize_act._init_fn(x, 2, "int", 16, "e4m3")
    return _plant_ties(x, sc.float() * gs, g)


def _check_prologue(got, ref, fp8, k):
    codes, sc, gs = ref
    assert _same(got[1], sc) and torch.equal(got[2], gs)
    if fp8:
        m = codes.shape[0]
        assert torch.equal(got[0].float(), (codes.float().view(m, -1, 16) * sc.float().unsqueeze(-1)).view(m, -1))
        zero = codes == 0  # q = 0 is the byte 0 (never -0)
        assert torch.equal(got[0].view(torch.uint8)[zero], torch.zeros_like(got[0].view(torch.uint8)[zero]))
    else:
        assert torch.equal(got[0], codes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fp8", [False, True])
def test_prologue_planted_decision_points_bit_exact(dtype, fp8):
    x = _adversarial(12, 128, dtype, seed=5)
    ref = lowbit_ops.quantize_act._init_fn(x, 2, "int", 16, "e4m3")
    # the planting kept most groups' scales: many elements sit exactly on T * e
    e = (ref[1].float() * ref[2]).repeat_interleave(16, 1)
    ties = [int((x.float() == t * e).logical_and(e > 0).sum()) for t in (0.5, -0.5, -1.5)]
    assert min(ties) >= 4, ties
    _check_prologue(k2.act_quant(x, 2, "int", fp8_values=fp8), ref, fp8, 128)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fp8", [False, True])
def test_prologue_planted_decision_points_split_and_hadamard(dtype, fp8):
    """The same values through the split (a permutation with scale 1 gives them back, plus
    halved duplicates) and through the fused Hadamard (on hadamard(x): the transform is its own
    inverse up to rounding, so its input is x's neighbourhood again)."""
    k = 128
    xs = _adversarial(12, k, dtype, seed=6)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(k, generator=g)
    x = torch.empty_like(xs)
    x[:, perm] = xs
    index = torch.cat([perm, perm[:9]])
    scale = torch.cat([torch.ones(k), torch.full((9,), 0.5)])
    pad = torch.nn.functional.pad(torch.ops.lowbit.channel_split(x, index, scale), (0, 7))
    assert torch.equal(pad[:, :k], xs)
    got = k2.act_quant(x, 2, "int", k + 16, index, scale, fp8_values=fp8)
    _check_prologue(got, lowbit_ops.quantize_act._init_fn(pad, 2, "int", 16, "e4m3"), fp8, k + 16)
    if dtype == torch.float16:
        return  # the huge fp16 rows overflow in the transform
    xh = torch.ops.lowbit.hadamard(xs[torch.arange(12) % 6 != 3])  # no huge rows: the sums overflow
    got = k2.act_quant(xh, 2, "int", fp8_values=fp8, hadamard=True)
    ref = lowbit_ops.quantize_act._init_fn(torch.ops.lowbit.hadamard(xh), 2, "int", 16, "e4m3")
    _check_prologue(got, ref, fp8, k)
