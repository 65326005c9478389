"""GPU checks of the Gluon W2A16 kernel (codegen/triton/w2a16_gluon.py), skipped without CUDA.

    TRITON_INTERPRET=0 python -m pytest tests/gpu/test_gluon_w2a16.py -q

Each case compares the kernel's fp32 output with a float64 product on lowbit's dequantized
weights (``dequantize_weight``) and with the existing Triton skinny kernel
(``lowbit.codegen.triton.w2a16``).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y"):
    pytest.skip("Triton's interpreter is on: run with TRITON_INTERPRET=0", allow_module_level=True)
if torch.cuda.get_device_capability()[0] < 8:
    pytest.skip("mma.sync bf16 needs sm_80 or newer", allow_module_level=True)

from lowbit.codegen.triton import w2a16 as w2a16_mod  # noqa: E402
from lowbit.codegen.triton import w2a16_gluon as wg  # noqa: E402
from lowbit.formats import QFormat, pack_codes  # noqa: E402
from lowbit.ops import dequantize_weight  # noqa: E402

if not wg.HAVE_GLUON:
    pytest.skip("this Triton has no Gluon", allow_module_level=True)

DEV = "cuda"


def _weight(n, k, grid, seed):
    """Random codes and E4M3 scales of a valid 2-bit tensor (every code and many scale values
    occur, subnormal and negative scales included)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    codes = torch.randint(-2, 2, (n, k), generator=g, device=DEV, dtype=torch.int8)
    stored = (torch.rand(n, k // 16, generator=g, device=DEV) * 224).to(torch.float8_e4m3fn)
    sb = stored.view(torch.uint8)
    sb[:, ::7] = torch.randint(0, 0x7E, (n, sb[:, ::7].shape[1]), generator=g, device=DEV, dtype=torch.uint8)
    sb[::5, 3::11] |= 0x80  # negative scales
    gscale = torch.tensor(3e-4, device=DEV)
    packed = pack_codes(codes, 2)
    w = dequantize_weight(packed, stored, gscale, QFormat(2, grid))
    return packed, stored, gscale, w


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


SHAPES = [  # (M, K, N, grid)
    (1, 8192, 8192, "int"),
    (16, 8192, 8192, "int"),
    (1, 4096, 4096, "int"),
    (16, 4096, 4096, "half"),
    (1, 8192, 28672, "int"),
    (5, 4096, 4096, "half"),
    (9, 4096, 11008, "int"),   # MP = 16, split K with an odd tile count (no UNROLL2)
    (1, 11008, 4096, "int"),   # 43 tiles of K
]


@pytest.mark.parametrize("m,k,n,grid", SHAPES)
def test_gluon_against_float64_and_skinny(m, k, n, grid):
    packed, stored, gscale, w = _weight(n, k, grid, seed=m + k + n)
    words = wg.repack_w2a16(packed)
    x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
    ref = x.double() @ w.double().T
    y = wg.w2a16_gluon(x, words, stored, gscale, grid=grid, out_dtype=torch.float32)
    assert torch.isfinite(y).all()
    err = _rel(y, ref)
    assert err < 1e-5, err  # exact products, fp32 accumulation (the brief asks for 1e-3)
    ys = w2a16_mod.w2a16_linear(x, packed, stored, gscale, grid=grid, path="skinny", out_dtype=torch.float32)
    assert _rel(y, ys.double()) < 1e-5
    yb = wg.w2a16_gluon(x, words, stored, gscale, grid=grid)  # bf16 output
    assert yb.dtype == torch.bfloat16 and _rel(yb, ref) < 4e-3


@pytest.mark.parametrize("config", [
    dict(BLOCK_N=128), dict(BLOCK_N=32, num_warps=2), dict(BLOCK_N=128, num_warps=8), dict(PREFETCH=False),
    dict(UNROLL2=False), dict(SPLIT_K=1), dict(SPLIT_K=3), dict(SPLIT_K=16), dict(MP=16), dict(BLOCK_N=256),
])
def test_gluon_variants(config):
    m, k, n = 3, 4096, 4096
    packed, stored, gscale, w = _weight(n, k, "int", seed=11)
    words = wg.repack_w2a16(packed)
    x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
    bias = torch.randn(n, device=DEV)
    ref = x.double() @ w.double().T + bias.double()
    y = wg.w2a16_gluon(x, words, stored, gscale, bias, out_dtype=torch.float32, **config)
    assert _rel(y, ref) < 1e-5


def test_gluon_uint8_weight_and_leading_dims():
    """A lowbit-packed uint8 weight is repacked on the fly; x with leading dims."""
    k, n = 2048, 1024
    packed, stored, gscale, w = _weight(n, k, "int", seed=5)
    x = torch.randn(2, 3, k, device=DEV).to(torch.bfloat16)
    y = wg.w2a16_gluon(x, packed, stored, gscale, out_dtype=torch.float32)
    assert y.shape == (2, 3, n)
    assert _rel(y.reshape(6, n), x.reshape(6, k).double() @ w.double().T) < 1e-5


def test_gluon_deterministic_and_graph_replay():
    """The serial split-K reduction leaves its counters at zero: repeated calls and CUDA graph
    replays give bit-identical results."""
    m, k, n = 1, 8192, 8192
    packed, stored, gscale, w = _weight(n, k, "int", seed=3)
    words = wg.repack_w2a16(packed)
    x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
    y0 = wg.w2a16_gluon(x, words, stored, gscale, out_dtype=torch.float32)
    y1 = wg.w2a16_gluon(x, words, stored, gscale, out_dtype=torch.float32)
    assert torch.equal(y0, y1)
    out = torch.empty_like(y0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out.copy_(wg.w2a16_gluon(x, words, stored, gscale, out_dtype=torch.float32))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(wg.w2a16_gluon(x, words, stored, gscale, out_dtype=torch.float32))
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, y0)


@pytest.mark.parametrize("m,k,n,grid", [(1, 4096, 4096, "int"), (8, 11008, 4096, "half"), (12, 4096, 4096, "int"),
                                        (1, 4080, 4096, "int")])
def test_qlinear_routes_decode_calls_to_gluon(m, k, n, grid):
    """torch.ops.lowbit.qlinear on CUDA: calls of at most GLUON_MAX_M rows (K % 256, N % 128)
    run the Gluon kernel on a cached repack, bit for bit what w2a16_gluon gives; the others
    the Triton kernels; both against float64."""
    import lowbit.codegen.triton  # noqa: F401  (registers the CUDA kernels)
    from lowbit.codegen.triton import dispatch

    packed, stored, gscale, w = _weight(n, k, grid, seed=m + k)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    bias = torch.randn(n, device=DEV)
    y = torch.ops.lowbit.qlinear(x, packed, stored, gscale, bias, 2, grid, 16, "e4m3", 0, "int", 16, "e4m3")
    ref = x.double() @ w[:, :k].double().T + bias.double()
    assert _rel(y, ref) < 5e-3  # bf16 output
    routed = wg.gluon_unsupported(x, packed) is None
    assert routed == (m <= dispatch.GLUON_MAX_M and k % 256 == 0)
    if routed:
        assert wg.repacked(packed) is wg.repacked(packed)
        direct = wg.w2a16_gluon(x, wg.repack_w2a16(packed), stored, gscale, bias, grid=grid)
        assert torch.equal(y, direct)
