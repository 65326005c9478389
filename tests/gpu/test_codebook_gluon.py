"""GPU checks of the Gluon codebook GEMV (codegen/triton/codebook_gluon.py), skipped without CUDA.

    TRITON_INTERPRET=0 python -m pytest tests/gpu/test_codebook_gluon.py -q

Each case compares the kernel's fp32 output with a float64 product on lowbit's dequantized
codebook weight (``dequantize_codebook_weight``).
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

import lowbit.codegen.triton  # noqa: E402,F401  (registers the CUDA kernels of the lowbit ops)
from lowbit.codebook import dequantize_codebook_weight  # noqa: E402
from lowbit.codegen.triton import codebook as kc  # noqa: E402
from lowbit.codegen.triton import codebook_gluon as cg  # noqa: E402
from gpu_weights import rel_error  # noqa: E402  (tests/gpu/gpu_weights.py)

if not cg._g.HAVE_GLUON:
    pytest.skip("this Triton has no Gluon", allow_module_level=True)

DEV = "cuda"


def _weight(n, k, c, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    idx = torch.randint(0, 256, (n, -(-(k // 16 * c) // 8)), generator=g, device=DEV, dtype=torch.uint8)
    cb = torch.randint(0, 256, ((1 << c) * 2,), generator=g, device=DEV, dtype=torch.uint8)
    sc = (torch.rand(n, 1, generator=g, device=DEV) * 200).to(torch.float8_e4m3fn)
    gs = torch.tensor(1e-3, device=DEV)
    return idx, cb, sc, gs


@pytest.mark.parametrize("m,n,k,c,bias,config", [
    (1, 8192, 8192, 11, False, {}),
    (1, 4096, 4096, 11, True, {}),
    (3, 4096, 11008, 11, True, {}),
    (8, 11008, 4096, 12, False, {}),
    (5, 1024, 2048, 8, True, {}),
    (1, 2048, 256, 11, False, {}),                       # one tile: most K shares empty
    (2, 4096, 4096, 11, False, dict(BLOCK_N=128)),
    (1, 4096, 4096, 11, False, dict(SPLIT_K=1)),
    (1, 4096, 4096, 11, True, dict(STAGES=3)),
    (4, 4096, 4096, 11, False, dict(PDL=True)),
    (12, 1024, 1024, 11, False, dict(MP=16)),
    (1, 8192, 8192, 11, False, dict(BYTE_TABLE=True)),
    (3, 4096, 4096, 11, True, dict(BYTE_TABLE=True, BLOCK_N=128)),
    (8, 4096, 8192, 11, False, dict(BYTE_TABLE=True)),    # x of 8 rows + the byte table: over 48 KB
    (2, 2048, 2048, 5, True, dict(BYTE_TABLE=True)),      # a byte table smaller than one load's layout
])
def test_codebook_gluon_against_float64(m, n, k, c, bias, config):
    idx, cb, sc, gs = _weight(n, k, c, seed=m + n + c)
    b = torch.randn(n, device=DEV) if bias else None
    w = dequantize_codebook_weight(idx, cb, sc, gs, 16, c, k, "e4m3")
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    del w
    config = dict(config)
    byte_table = config.pop("BYTE_TABLE", False)
    ops = cg.prepared(idx, cb, sc, gs, c, k, byte_table)
    assert ops.byte_table == byte_table and ops.table.numel() == (4 if byte_table else 1) << c
    y = cg.codebook_gluon(x, ops, b, out_dtype=torch.float32, **config)
    assert rel_error(y, ref) < 1e-5
    y2 = cg.codebook_gluon(x, ops, b, out_dtype=torch.float32, **config)
    assert torch.equal(y, y2)  # the split-K counters were left at zero, same order of sums


def test_codebook_gemv_routes_bf16_decode_to_gluon():
    """codebook_gemv(path=None) and torch.ops.lowbit.codebook_linear take the Gluon kernel for bf16
    x of at most 8 rows (the same bits as calling it), the Triton paths otherwise."""
    n = k = 4096
    c = 11
    idx, cb, sc, gs = _weight(n, k, c, seed=7)
    x = torch.randn(2, k, device=DEV, dtype=torch.bfloat16)
    assert cg.unsupported(x, idx, c, k) is None
    assert cg.unsupported(x.half(), idx, c, k) is not None
    assert cg.unsupported(torch.randn(9, k, device=DEV, dtype=torch.bfloat16), idx, c, k) is not None
    y = kc.codebook_gemv(x, idx, cb, sc, gs, None, c, k)
    assert torch.equal(y, cg.codebook_gluon(x, cg.prepared(idx, cb, sc, gs, c, k)))
    byte_table = kc.codebook_gemv(x, idx, cb, sc, gs, None, c, k, out_dtype=torch.float32, BYTE_TABLE=True)
    assert torch.equal(byte_table, kc.codebook_gemv(x, idx, cb, sc, gs, None, c, k, out_dtype=torch.float32))
    assert torch.equal(torch.ops.lowbit.codebook_linear(x, idx, cb, sc, gs, None, 16, c, k, "e4m3"), y)
    w = dequantize_codebook_weight(idx, cb, sc, gs, 16, c, k, "e4m3")
    assert rel_error(y.float(), x.double() @ w.double().T) < 1e-2


def test_codebook_gluon_in_a_cuda_graph():
    """Two chained codebook GEMVs captured in a CUDA graph replay to the eager bits."""
    n = k = 2048
    c = 11
    a = cg.prepared(*_weight(n, k, c, seed=11), c, k)
    b = cg.prepared(*_weight(n, k, c, seed=12), c, k)
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    eager = cg.codebook_gluon(cg.codebook_gluon(x, a), b)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cg.codebook_gluon(cg.codebook_gluon(x, a), b)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cg.codebook_gluon(cg.codebook_gluon(x, a), b)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
