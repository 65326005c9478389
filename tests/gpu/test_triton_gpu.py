"""GPU checks of the Triton W2A16 kernels at full size (skipped without CUDA).

Run on a GPU machine with compiled (not interpreted) kernels:

    TRITON_INTERPRET=0 python -m pytest tests/gpu -q

(``tests/conftest.py`` turns the interpreter on for the CPU suite; these tests need it off.)
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y"):
    pytest.skip("Triton's interpreter is on: run with TRITON_INTERPRET=0", allow_module_level=True)

import lowbit.codegen.triton as lt  # noqa: E402  (registers the CUDA kernel of lowbit::qlinear)
from lowbit.formats import QFormat, pack_codes, quantize_weight_rtn  # noqa: E402
from lowbit.ops import dequantize_weight  # noqa: E402

DEV = "cuda"


def _random_weight(n, k, grid, seed):
    """Random codes and E4M3 scales of a valid 2-bit tensor (all code and scale values occur)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    codes = torch.randint(-2, 2, (n, k), generator=g, device=DEV, dtype=torch.int8)
    stored = (torch.rand(n, k // 16, generator=g, device=DEV) * 224).to(torch.float8_e4m3fn)
    gscale = torch.tensor(3e-4, device=DEV)
    packed = pack_codes(codes, 2)
    w = dequantize_weight(packed, stored, gscale, QFormat(2, grid))
    return packed, stored, gscale, w


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("path,m,grid,dtype", [
    ("gemv", 1, "int", torch.bfloat16),
    ("skinny", 1, "int", torch.bfloat16),
    ("skinny", 16, "int", torch.bfloat16),
    ("skinny", 5, "half", torch.bfloat16),
    ("skinny", 5, "half", torch.float16),
    ("skinny", 2, "int", torch.float16),
    ("gemm", 300, "int", torch.bfloat16),
])
def test_w2a16_paths_against_float64(path, m, grid, dtype):
    n, k = 4096 + 48, 4096
    packed, stored, gscale, w = _random_weight(n, k, grid, seed=m)
    x = torch.randn(m, k - 8, device=DEV).to(dtype)  # K not a multiple of 16: masked tail
    bias = torch.randn(n, device=DEV)
    ref = x.double() @ w[:, : k - 8].double().T + bias.double()
    y = lt.w2a16_linear(x, packed, stored, gscale, bias, grid=grid, path=path, out_dtype=torch.float32)
    assert torch.isfinite(y).all()
    assert _rel(y, ref) < 1e-3


@pytest.mark.parametrize("asm", [True, False])
def test_asm_and_plain_dequantization_agree(asm):
    """The inline-PTX pair dequantization and the plain Triton one give the same products."""
    n, k = 1024, 2048
    packed, stored, gscale, w = _random_weight(n, k, "int", seed=7)
    x = torch.randn(16, k, device=DEV, dtype=torch.bfloat16)
    ref = x.double() @ w.double().T
    y = lt.w2a16_linear(x, packed, stored, gscale, path="skinny", out_dtype=torch.float32, ASM=asm)
    assert _rel(y, ref) < 1e-5  # exact products, fp32 accumulation


def test_registered_op_dispatches_to_triton_and_falls_back():
    torch.manual_seed(0)
    n, k = 512, 1024
    wq = quantize_weight_rtn(torch.randn(n, k, device=DEV), QFormat(2))
    packed = pack_codes(wq.codes, 2)
    x = torch.randn(3, 7, k, device=DEV, dtype=torch.bfloat16)
    args = (packed, wq.scales, wq.global_scale, None, 2, "int", 16, "e4m3")
    y = torch.ops.lowbit.qlinear(x, *args, 0, "int", 16, "e4m3")
    assert torch.equal(y, lt.w2a16_linear(x, packed, wq.scales, wq.global_scale))
    ref = x.double() @ wq.dequantize().double().T
    assert _rel(y, ref) < 1e-2
    # W2A2 is not a Triton kernel yet: the reference implementation answers
    y2 = torch.ops.lowbit.qlinear(x, *args, 2, "int", 16, "e4m3")
    assert torch.equal(y2, lt.dispatch._reference_qlinear(x, *args, 2, "int", 16, "e4m3"))


def test_cuda_graph_capture():
    n, k = 2048, 2048
    packed, stored, gscale, w = _random_weight(n, k, "int", seed=3)
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    y0 = lt.w2a16_linear(x, packed, stored, gscale)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lt.w2a16_linear(x, packed, stored, gscale)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, lt.w2a16_linear(x, packed, stored, gscale))
    assert not torch.equal(y, y0)
