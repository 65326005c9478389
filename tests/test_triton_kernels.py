"""Triton W2A16 kernels on the CPU through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before Triton is imported).

References are independent of the kernels: a float64 product of the operands dequantized by
``lowbit.formats`` (the kernels only round in their fp32 accumulation, so the fp32 output must
match to ~1e-6), and the reference op ``torch.ops.lowbit.qlinear`` for the low-precision output.
The same checks run at full size on a GPU in tests/gpu/test_triton_gpu.py.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

import lowbit.codegen.triton as lt  # noqa: E402
import triton.language as tl  # noqa: E402
from lowbit.codegen.triton.w2a16 import _decode_e4m3  # noqa: E402
from lowbit.formats import QFormat, pack_codes, quantize_weight_rtn  # noqa: E402
from lowbit.ops import dequantize_weight  # noqa: E402
from lowbit.quant_linear import QuantLinear  # noqa: E402

SMALL = {  # tiles small enough for the interpreter
    "gemv": dict(BLOCK_N=16, BLOCK_G=4),
    "skinny": dict(BLOCK_N=16, BLOCK_G=4),
    "gemm": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_G=4),
    "dequant": dict(),
}


def _stress_weight(n, k, seed):
    """Random codes (all four values) and stored E4M3 scales drawn from every finite code,
    subnormals and zero included, so that the in-kernel E4M3 decoding is exercised."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-2, 2, (n, k), generator=g, dtype=torch.int8)
    bits = torch.randint(0, 127, (n, k // 16), generator=g, dtype=torch.uint8)  # 0x00..0x7E: finite, >= 0
    stored = bits.view(torch.float8_e4m3fn)
    return pack_codes(codes, 2), stored, torch.tensor(0.37)


def _rtn_weight(n, k, grid, seed):
    g = torch.Generator().manual_seed(seed)
    qt = quantize_weight_rtn(torch.randn(n, k, generator=g), QFormat(2, grid))
    return pack_codes(qt.codes, 2), qt.scales, qt.global_scale


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


CASES = [  # path, M, K, N, grid, dtype, weight kind
    ("gemv", 1, 128, 48, "int", torch.bfloat16, "rtn"),
    ("gemv", 3, 64, 16, "half", torch.float16, "stress"),
    ("skinny", 1, 128, 48, "int", torch.bfloat16, "stress"),
    ("skinny", 3, 64, 48, "half", torch.bfloat16, "rtn"),
    ("skinny", 16, 128, 16, "int", torch.float16, "rtn"),
    ("skinny", 5, 128, 48, "half", torch.float16, "stress"),
    ("gemm", 17, 128, 48, "int", torch.bfloat16, "rtn"),
    ("gemm", 17, 64, 16, "half", torch.float16, "stress"),
    ("gemm", 3, 128, 16, "int", torch.float16, "stress"),
    ("dequant", 20, 128, 48, "int", torch.bfloat16, "stress"),
    ("dequant", 3, 64, 16, "half", torch.float16, "rtn"),
    # N and K off the tiles (the masked, non-EVEN kernels)
    ("gemv", 2, 96, 40, "half", torch.bfloat16, "stress"),
    ("skinny", 2, 96, 40, "int", torch.bfloat16, "stress"),
    ("gemm", 18, 96, 40, "half", torch.float16, "rtn"),
]


@pytest.mark.parametrize("path,m,k,n,grid,dtype,kind", CASES)
def test_w2a16_against_float64_and_reference_op(path, m, k, n, grid, dtype, kind):
    packed, stored, gscale = _stress_weight(n, k, seed=m * k + n) if kind == "stress" else _rtn_weight(n, k, grid, m)
    w = dequantize_weight(packed, stored, gscale, QFormat(2, grid))  # lowbit.formats numerics, fp32
    gen = torch.Generator().manual_seed(k + n)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen)
    ref = x.double() @ w.double().T + bias.double()

    y32 = lt.w2a16_linear(x, packed, stored, gscale, bias, grid=grid, path=path, out_dtype=torch.float32,
                          **SMALL[path])
    assert y32.shape == (m, n) and y32.dtype == torch.float32
    assert _rel(y32, ref) < 1e-5  # exact products, fp32 accumulation (the kernels must reach 1e-3)

    y = lt.w2a16_linear(x, packed, stored, gscale, bias, grid=grid, path=path, **SMALL[path])
    assert y.dtype == dtype
    y_op = torch.ops.lowbit.qlinear(x, packed, stored, gscale, bias, 2, grid, 16, "e4m3", 0, "int", 16, "e4m3")
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10  # one rounding step apart at most
    torch.testing.assert_close(y.float(), y_op.float(), rtol=ulp, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("variant", [dict(SPLIT_K=2), dict(XPERM=False), dict(SPLIT_K=3, XPERM=False), dict(EVEN=False),
                                     dict(ONE_DOT=True), dict(ONE_DOT=True, SPLIT_K=2)])
def test_dot_kernel_variants(variant):
    """Split-K, the host-permuted x operand and the one-product-per-tile form give the same product."""
    packed, stored, gscale = _stress_weight(48, 192, seed=5)
    w = dequantize_weight(packed, stored, gscale, QFormat(2))
    x = torch.randn(2, 192).to(torch.bfloat16)
    ref = x.double() @ w.double().T
    cfg = dict(SMALL["skinny"], **variant)
    y = lt.w2a16_linear(x, packed, stored, gscale, path="skinny", out_dtype=torch.float32, **cfg)
    assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("grid,dtype", [("int", torch.bfloat16), ("half", torch.float16)])
def test_one_dot_tile_half_grid_and_fp16(grid, dtype):
    """ONE_DOT (all 16 codes of a group in one product, x permuted to the joined K order) on
    both grids and activation dtypes, with a ragged K."""
    packed, stored, gscale = _stress_weight(32, 160, seed=11)
    w = dequantize_weight(packed, stored, gscale, QFormat(2, grid))
    x = torch.randn(3, 150).to(dtype)
    ref = x.double() @ w[:, :150].double().T
    y = lt.w2a16_linear(x, packed, stored, gscale, grid=grid, path="skinny", out_dtype=torch.float32,
                        ONE_DOT=True, **SMALL["skinny"])
    assert _rel(y, ref) < 1e-5


def test_serial_split_k_leaves_counters_at_zero():
    """The last program of each output tile sums the partial tiles (in a fixed order) and resets
    the tile's arrival counter, so repeated launches stay correct and deterministic."""
    from lowbit.codegen.triton.w2a16 import _COUNTERS

    packed, stored, gscale = _stress_weight(40, 256, seed=8)
    x = torch.randn(3, 256).to(torch.float16)
    cfg = dict(SMALL["skinny"], SPLIT_K=4)
    y1 = lt.w2a16_linear(x, packed, stored, gscale, path="skinny", **cfg)
    y2 = lt.w2a16_linear(x, packed, stored, gscale, path="skinny", **cfg)
    assert torch.equal(y1, y2)
    assert all(int(buf.abs().sum()) == 0 for buf in _COUNTERS.values())


@pytest.mark.parametrize("dtype,cfg", [(torch.float16, dict(SPLIT_K=3)), (torch.bfloat16, dict(SPLIT_K=2)),
                                       (torch.bfloat16, dict(SPLIT_K=2, PAIRS=False, FPS=2)),
                                       (torch.bfloat16, dict(SPLIT_K=5, BLOCK_G=2))])
def test_gemv_split_k(dtype, cfg):
    """The CUDA-core GEMV's serial split-K (x rows and row blocks reduced separately), with x
    read in bf16 pairs or element by element, and splits that get no tile (K = 256 has 8 tiles
    of 2 groups for 5 splits)."""
    packed, stored, gscale = _stress_weight(32, 256, seed=6)
    w = dequantize_weight(packed, stored, gscale, QFormat(2))
    x = torch.randn(3, 256).to(dtype)
    bias = torch.randn(32)
    ref = x.double() @ w.double().T + bias.double()
    y = lt.w2a16_linear(x, packed, stored, gscale, bias, path="gemv", out_dtype=torch.float32,
                        **dict(dict(BLOCK_N=16, BLOCK_G=4), **cfg))
    assert _rel(y, ref) < 1e-5
    y2 = lt.w2a16_linear(x, packed, stored, gscale, bias, path="gemv", out_dtype=torch.float32,
                         **dict(dict(BLOCK_N=16, BLOCK_G=4), **cfg))
    assert torch.equal(y, y2)  # deterministic


@pytest.mark.parametrize("grid", ["int", "half"])
def test_padded_weight_and_leading_dims(grid):
    """A site whose K (100) is not a multiple of 16: the stored weight is padded to 112 columns
    (on the half grid the padding codes are worth +-s/2, not 0) and only K columns count."""
    torch.manual_seed(0)
    ql = QuantLinear.from_weight(torch.randn(24, 100), torch.randn(24), QFormat(2, grid))
    assert ql.weight_scales.shape[1] * 16 == 112
    x = torch.randn(2, 3, 100).to(torch.bfloat16)
    ref = x.double() @ ql.dequantized_weight().double().T + ql.bias.double()
    for path in ("skinny", "gemm", "gemv", "dequant"):
        y = lt.w2a16_linear(x, ql.weight_packed, ql.weight_scales, ql.weight_global, ql.bias, grid=grid, path=path,
                            out_dtype=torch.float32, **SMALL[path])
        assert y.shape == (2, 3, 24)
        assert _rel(y, ref) < 1e-5, path


def test_default_configs_run():
    """The launcher's default (H100) tile sizes, as the registered op uses them."""
    packed, stored, gscale = _rtn_weight(40, 96, "int", 9)
    w = dequantize_weight(packed, stored, gscale, QFormat(2))
    for m in (1, 20):
        x = torch.randn(m, 96).to(torch.bfloat16)
        y = lt.w2a16_linear(x, packed, stored, gscale, out_dtype=torch.float32)
        assert _rel(y, x.double() @ w.double().T) < 1e-5


@pytest.mark.parametrize("grid,dtype", [("int", torch.bfloat16), ("half", torch.float16), ("int", torch.float32)])
def test_weight_values_are_exact(grid, dtype):
    """The "dequant" path's W values ``(q + h) * e4m3(S)`` equal lowbit.formats' dequantization
    (without the global scale) exactly, in every output dtype, on stress weights whose scales
    cover every finite E4M3 code."""
    from lowbit.codegen.triton.w2a16 import weight_values

    packed, stored, _ = _stress_weight(24, 160, seed=3)
    one = torch.tensor(1.0)
    w = dequantize_weight(packed, stored, one, QFormat(2, grid))
    v = weight_values(packed, stored, grid, dtype)
    assert v.dtype == dtype and v.shape == (24, 160)
    assert torch.equal(v.float(), w)


def test_default_path_by_rows():
    from lowbit.codegen.triton.w2a16 import DEQUANT_MIN_M, SKINNY_MAX_M

    assert lt.default_path(1) == "skinny" and lt.default_path(SKINNY_MAX_M) == "skinny"
    assert lt.default_path(SKINNY_MAX_M + 1, cuda=False) == "gemm"   # the interpreter: no cuBLAS
    assert lt.default_path(DEQUANT_MIN_M) == "dequant" and lt.default_path(4096) == "dequant"
    assert lt.default_path(4096, cuda=False) == "gemm"
    if DEQUANT_MIN_M - 1 > SKINNY_MAX_M:
        assert lt.default_path(DEQUANT_MIN_M - 1) == "gemm"


def test_permute_pairs_layout():
    x = torch.arange(2 * 40, dtype=torch.float32).reshape(2, 40)  # K=40: padded to 48 (3 groups)
    xp = lt.permute_pairs(x)
    assert xp.shape == (8, 2, 6) and xp.is_contiguous()
    xpad = torch.nn.functional.pad(x, (0, 8))
    for i in range(8):
        for g in range(3):
            for j in range(2):
                assert torch.equal(xp[i, :, 2 * g + j], xpad[:, 16 * g + i + 8 * j])


@triton.jit
def _decode_kernel(b_ptr, o_ptr):
    offs = tl.arange(0, 256)
    tl.store(o_ptr + offs, _decode_e4m3(tl.load(b_ptr + offs).to(tl.int32)))


def test_e4m3_decoding_is_exact_for_every_code():
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    out = torch.empty(256)
    _decode_kernel[(1,)](bits, out)
    expected = bits.view(torch.float8_e4m3fn).float()
    finite = ~torch.isnan(expected)
    assert finite.sum() == 254
    assert torch.equal(out[finite], expected[finite])


def test_registered_cuda_kernel_and_dispatch():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lowbit::qlinear", "CUDA")
    packed, stored, gscale = _rtn_weight(32, 64, "int", 3)
    x = torch.randn(4, 64).to(torch.bfloat16)
    args = (packed, stored, gscale, None, 2, "int", 16, "e4m3")
    # the W2A16 case runs the kernel (on CPU tensors only under the interpreter)
    assert lt.w2a16_unsupported(x, *args[:8], 0) is None
    assert torch.equal(lt.qlinear_triton(x, *args, 0, "int", 16, "e4m3"), lt.w2a16_linear(x, *args[:4]))
    # everything else answers with the reference implementation, bit for bit
    for case in [(x, *args, 2, "int", 16, "e4m3"),                        # W2A2
                 (x.float(), *args, 0, "int", 16, "e4m3")]:               # fp32 activations
        assert lt.w2a16_unsupported(case[0], *case[1:9], case[9]) is not None
        assert torch.equal(lt.qlinear_triton(*case), torch.ops.lowbit.qlinear(*case))
    qt4 = quantize_weight_rtn(torch.randn(32, 64), QFormat(4))
    case4 = (x, pack_codes(qt4.codes, 4), qt4.scales, qt4.global_scale, None, 4, "int", 16, "e4m3", 0, "int", 16,
             "e4m3")
    assert "weight format" in lt.w2a16_unsupported(*case4[:10])
    assert torch.equal(lt.qlinear_triton(*case4), torch.ops.lowbit.qlinear(*case4))


def test_launcher_rejects_bad_inputs():
    packed, stored, gscale = _rtn_weight(16, 64, "int", 1)
    with pytest.raises(TypeError):
        lt.w2a16_linear(torch.randn(1, 64), packed, stored, gscale)  # fp32 activations
    with pytest.raises(ValueError):
        lt.w2a16_linear(torch.randn(1, 80).half(), packed, stored, gscale)  # K beyond the weight
    with pytest.raises(TypeError):
        lt.w2a16_linear(torch.randn(1, 64).half(), packed, stored.float().half(), gscale)  # not E4M3
