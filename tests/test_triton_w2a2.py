"""Triton W2A2 prologue and GEMM, and the codebook GEMV, on the CPU through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1). Full-size checks: tests/gpu/test_triton_gpu.py.

References are independent of the kernels: ``lowbit.formats`` (through the reference ops) for
the codes and scales, which must match bit for bit, and float64 products of the dequantized
operands for the GEMMs, which round only in their fp32 accumulation.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

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
