"""GPU checks of the Triton W2A16, W2A2 and codebook kernels at full size (skipped without CUDA).

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
from gpu_weights import random_2bit_weight, rel_error  # noqa: E402  (tests/gpu/gpu_weights.py)

DEV = "cuda"


@pytest.mark.parametrize("path,m,grid,dtype", [
    ("gemv", 1, "int", torch.bfloat16),
    ("skinny", 1, "int", torch.bfloat16),
    ("skinny", 16, "int", torch.bfloat16),
    ("skinny", 5, "half", torch.bfloat16),
    ("skinny", 5, "half", torch.float16),
    ("skinny", 2, "int", torch.float16),
    ("gemm", 300, "int", torch.bfloat16),
    ("dequant", 300, "int", torch.bfloat16),
    ("dequant", 200, "half", torch.float16),
])
def test_w2a16_paths_against_float64(path, m, grid, dtype):
    n, k = 4096 + 48, 4096
    packed, stored, gscale, w = random_2bit_weight(n, k, grid, seed=m)
    x = torch.randn(m, k - 8, device=DEV).to(dtype)  # K not a multiple of 16: masked tail
    bias = torch.randn(n, device=DEV)
    ref = x.double() @ w[:, : k - 8].double().T + bias.double()
    y = lt.w2a16_linear(x, packed, stored, gscale, bias, grid=grid, path=path, out_dtype=torch.float32)
    assert torch.isfinite(y).all()
    assert rel_error(y, ref) < 1e-3


@pytest.mark.parametrize("asm", [True, False])
def test_asm_and_plain_dequantization_agree(asm):
    """The inline-PTX pair dequantization and the plain Triton one give the same products."""
    n, k = 1024, 2048
    packed, stored, gscale, w = random_2bit_weight(n, k, "int", seed=7)
    x = torch.randn(16, k, device=DEV, dtype=torch.bfloat16)
    ref = x.double() @ w.double().T
    y = lt.w2a16_linear(x, packed, stored, gscale, path="skinny", out_dtype=torch.float32, ASM=asm)
    assert rel_error(y, ref) < 1e-5  # exact products, fp32 accumulation


@pytest.mark.parametrize("m,grid,dtype,config", [
    (1, "int", torch.bfloat16, dict(BLOCK_G=16)), (16, "half", torch.float16, dict(BLOCK_G=16)),
    (3, "int", torch.bfloat16, dict(BLOCK_G=32, SPLIT_K=3)), (1, "half", torch.bfloat16, dict(BLOCK_G=8, ASM=False)),
])
def test_one_dot_tile_against_float64(m, grid, dtype, config):
    """ONE_DOT (all codes of a group in one tensor-core product per tile) on the GPU, ragged K."""
    n, k = 4096 + 48, 4096
    packed, stored, gscale, w = random_2bit_weight(n, k, grid, seed=m + 3)
    x = torch.randn(m, k - 8, device=DEV).to(dtype)
    ref = x.double() @ w[:, : k - 8].double().T
    y = lt.w2a16_linear(x, packed, stored, gscale, grid=grid, path="skinny", out_dtype=torch.float32, ONE_DOT=True,
                        **config)
    assert rel_error(y, ref) < 1e-5


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
    assert rel_error(y, ref) < 1e-2
    # a format without a kernel (4-bit weights) runs the reference implementation
    wq4 = quantize_weight_rtn(torch.randn(n, k, device=DEV), QFormat(4))
    args4 = (pack_codes(wq4.codes, 4), wq4.scales, wq4.global_scale, None, 4, "int", 16, "e4m3")
    y4 = torch.ops.lowbit.qlinear(x, *args4, 0, "int", 16, "e4m3")
    assert torch.equal(y4, lt.dispatch._reference_qlinear(x, *args4, 0, "int", 16, "e4m3"))


@pytest.mark.parametrize("m,act", [(1, None), (5, None), (3, QFormat(2))])
def test_eager_quant_linear_takes_the_registered_kernel_directly(monkeypatch, m, act):
    """Plain eager QuantLinear calls on CUDA skip the dispatcher (lowbit.ops.eager_kernel) and
    give bit for bit what the op gives; under torch.compile the op is called instead."""
    from lowbit import ops
    from lowbit.quant_linear import QuantLinear

    taken = []
    real = ops._EAGER_KERNELS[("qlinear", "cuda")]
    monkeypatch.setitem(ops._EAGER_KERNELS, ("qlinear", "cuda"), lambda *a: taken.append(1) or real(*a))
    torch.manual_seed(m)
    site = QuantLinear.from_weight(torch.randn(512, 1024, device=DEV), torch.randn(512, device=DEV), QFormat(2), act)
    x = torch.randn(m, 1024, device=DEV, dtype=torch.bfloat16)
    w, a = site.weight_format, site.act_format
    via_op = torch.ops.lowbit.qlinear(x, site.weight_packed, site.weight_scales, site.weight_global, site.bias,
                                      w.bits, w.grid, w.group_size, w.scale_dtype, a.bits if a else 0,
                                      a.grid if a else "int", a.group_size if a else 16, a.scale_dtype if a else "e4m3")
    assert torch.equal(site(x), via_op) and taken == [1]
    compiled = torch.compile(site, fullgraph=True)
    assert torch.equal(compiled(x), via_op) and taken == [1]


def test_cuda_graph_capture():
    n, k = 2048, 2048
    packed, stored, gscale, w = random_2bit_weight(n, k, "int", seed=3)
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


# -- W2A2 --------------------------------------------------------------------------------------

from lowbit import ops as lowbit_ops  # noqa: E402
from lowbit.codegen.triton import w2a2 as k2  # noqa: E402


def _activation(m, k, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=DEV) * torch.logspace(-4, 2, k, device=DEV)[torch.randperm(k, generator=g, device=DEV)]
    x[: m // 3, :48] = 0  # all-zero groups
    return x.to(dtype)


@pytest.mark.parametrize("bits,grid,dtype,clip", [(2, "int", torch.bfloat16, 1.0), (2, "half", torch.float16, 1.0),
                                                  (4, "int", torch.bfloat16, 1.0), (2, "int", torch.float32, 1.0),
                                                  (2, "int", torch.bfloat16, 0.7), (2, "half", torch.bfloat16, 0.55)])
def test_prologue_bit_exact(bits, grid, dtype, clip):
    x = _activation(1024, 8192, dtype, seed=bits)
    ref = lowbit_ops.quantize_act._init_fn(x, bits, grid, 16, "e4m3", clip)
    got = k2.act_quant(x, bits, grid, clip=clip)
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1].view(torch.uint8) & 0x7F, ref[1].view(torch.uint8) & 0x7F)  # +-0: see CPU test
    assert torch.equal(got[2], ref[2])
    reg = torch.ops.lowbit.quantize_act(x, bits, grid, 16, "e4m3", clip)  # the registered CUDA kernel
    assert torch.equal(reg[0], ref[0]) and torch.equal(reg[2], ref[2])


def _planted(m, k, dtype, seed):
    """_activation's values, rows whose global is 2^p (224 2^p * fl(1/224) rounds to 2^p, so
    T * e is exact in 16 bits), a tiny row (global below 2^-90: the scaled path) and, in every
    group, values of x's format on and next to T * e (T = 1/2, -1/2, -3/2) for the reference's
    own effective scales e (only between the group's max and min: the scales stay)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = _activation(m, k, torch.float32, seed)
    p = torch.randint(-12, 8, (m,), generator=g, device=DEV).float()
    nice = torch.arange(m, device=DEV) % 3 == 2
    scaled = x / x.abs().amax(-1, keepdim=True).clamp(min=1e-30) * 200 * torch.exp2(p)[:, None]
    x = torch.where(nice[:, None], scaled, x)
    x[:, 5] = torch.where(nice, 224 * torch.exp2(p), x[:, 5])
    # groups with subnormal E4M3 scales (and codes -2: the doubled subnormal codes)
    x[1::5, 64:96] = (torch.linspace(-2, 1, 32, device=DEV) * x[1::5].abs().amax(-1, keepdim=True)
                      * torch.tensor([2.0 ** -14, 2.0 ** -17], device=DEV).repeat_interleave(16))
    if dtype != torch.float16:
        x[3] = x[3] / x[3].abs().max() * 1e-38
    x = x.to(dtype)
    _, sc, gs = lowbit_ops.quantize_act._init_fn(x, 2, "int", 16, "e4m3")
    eff = sc.float() * gs
    xf = x.float().view(m, k // 16, 16)
    cands = []
    for t in (0.5, -0.5, -1.5):
        v = (eff * t).to(dtype).cpu()
        inf = torch.full_like(v, float("inf"))
        up, down = v, v
        cands.append(v)
        for _ in range(2):
            up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
            cands += [up, down]
    cands = torch.stack(cands, -1).float().to(DEV)
    pick = cands.gather(-1, torch.randint(0, cands.shape[-1], xf.shape, generator=g, device=DEV))
    pos = torch.arange(16, device=DEV)
    extreme = (pos == xf.argmax(-1, keepdim=True)) | (pos == xf.argmin(-1, keepdim=True))
    ok = ((pick <= xf.amax(-1, keepdim=True)) & (pick >= xf.amin(-1, keepdim=True)) & ~extreme
          & (torch.rand(xf.shape, generator=g, device=DEV) < 0.4) & (eff[..., None] > 0))
    return torch.where(ok, pick, xf).view(m, k).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_prologue_planted_decision_points_bit_exact(dtype):
    """The 2-bit codes decided by thresholds (module docstring of lowbit.codegen.triton.w2a2) at
    values on and next to every decision point, bit for bit against the reference, as int8
    codes and as E4M3 values; for 16-bit x the packed PTX path equals the plain Triton one."""
    m, k = 1024, 8192
    x = _planted(m, k, dtype, seed=11)
    codes, sc, gs = lowbit_ops.quantize_act._init_fn(x, 2, "int", 16, "e4m3")
    e = (sc.float() * gs).repeat_interleave(16, 1)
    assert min(int(((x.float() == t * e) & (e > 0)).sum()) for t in (0.5, -0.5, -1.5)) > 100
    for fp8 in (False, True):
        got = k2.act_quant(x, 2, "int", fp8_values=fp8)
        if fp8:
            assert torch.equal(got[0].float(), (codes.float().view(m, -1, 16) * sc.float().unsqueeze(-1)).view(m, k))
            assert not (got[0].view(torch.uint8)[codes == 0] != 0).any()  # q = 0 is the byte 0
        else:
            assert torch.equal(got[0], codes)
        assert torch.equal(got[1].view(torch.uint8) & 0x7F, sc.view(torch.uint8) & 0x7F)
        assert torch.equal(got[2], gs)
        if k2._packed16(x):
            packed16 = k2._packed16
            k2._packed16 = lambda t: False
            try:
                plain = k2.act_quant(x, 2, "int", fp8_values=fp8)
            finally:
                k2._packed16 = packed16
            assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, plain))


def test_prologue_split_gather_and_e4m3_values():
    x = _activation(64, 1000, torch.bfloat16, seed=5)
    index = torch.cat([torch.arange(1000), torch.randint(0, 1000, (24,))]).to(DEV)
    scale = torch.where(torch.arange(1024) % 7 == 0, 0.5, 1.0).to(DEV)
    xs = torch.ops.lowbit.channel_split(x, index, scale)
    codes, sc, gs = lowbit_ops.quantize_act._init_fn(torch.nn.functional.pad(xs, (0, 32)), 2, "int", 16, "e4m3")
    a8, sc2, gs2 = k2.act_quant(x, 2, "int", 1056, index, scale, fp8_values=True)
    assert torch.equal(sc2.view(torch.uint8) & 0x7F, sc.view(torch.uint8) & 0x7F) and torch.equal(gs2, gs)
    assert torch.equal(a8.float(), (codes.float().view(64, -1, 16) * sc.float().unsqueeze(-1)).view(64, -1))


@pytest.mark.parametrize("k,split,dtype", [(8192, False, torch.bfloat16), (1024, True, torch.bfloat16),
                                           (4096, False, torch.float16), (256, False, torch.float32)])
def test_prologue_with_online_hadamard_bit_exact(k, split, dtype):
    """act_quant(hadamard=True): codes, scales and globals of the reference ops composed as a
    rotated (and split) site's prologue runs them on CUDA, bit for bit."""
    x = _activation(512, k, dtype, seed=k)
    h = torch.ops.lowbit.hadamard(x)
    kp, index, scale = k, None, None
    if split:
        index = torch.cat([torch.arange(k), torch.randint(0, k, (24,))]).to(DEV)
        scale = torch.where(torch.arange(k + 24) % 7 == 0, 0.5, 1.0).to(DEV)
        h, kp = torch.ops.lowbit.channel_split(h, index, scale), k + 32
    ref = lowbit_ops.quantize_act._init_fn(torch.nn.functional.pad(h, (0, kp - h.shape[-1])), 2, "int", 16, "e4m3")
    got = k2.act_quant(x, 2, "int", kp, index, scale, hadamard=True)
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1].view(torch.uint8) & 0x7F, ref[1].view(torch.uint8) & 0x7F)
    assert torch.equal(got[2], ref[2])


@pytest.mark.parametrize("m,config", [(4096, {}), (300, dict(PAIRS=True, BLOCK_G=16)), (1, {}), (16, dict(SPLIT_K=1)),
                                      (5, dict(PAIRS=False, BLOCK_G=8)), (200, dict(path="scaled_mm")),
                                      (200, dict(path="scaled_mm", fast_accum=True)),
                                      (4096, dict(path="scaled_mm", fast_accum=False))])
def test_w2a2_gemm_against_float64(m, config):
    n, k = 4096 + 48, 4096
    packed, stored, gscale, w = random_2bit_weight(n, k, "int", seed=m)
    x = _activation(m, k - 8, torch.bfloat16, seed=m)
    bias = torch.randn(n, device=DEV)
    a8, _, ga = k2.act_quant(x, 2, "int", k, fp8_values=True)
    r = min(m, 512)
    ref = (a8[:r].double() * ga[:r].double()) @ w.double().T + bias.double()
    y = k2.w2a2_linear(x, packed, stored, gscale, bias, out_dtype=torch.float32, **config)
    assert rel_error(y[:r], ref) < 1e-3
    # the registered op: same numbers as the reference op (bf16 output)
    args = (packed, stored, gscale, bias, 2, "int", 16, "e4m3", 2, "int", 16, "e4m3")
    yo = torch.ops.lowbit.qlinear(x, *args)
    yr = lt.dispatch._reference_qlinear(x, *args)
    assert rel_error(yo.float(), yr.double()) < 1e-2


# -- codebook -----------------------------------------------------------------------------------

_DEC = dict(path="decode")
_TAB = dict(path="table")  # R=16 chunks, BLOCK_N=256, table in shared memory (inline PTX), L2 prefetch


@pytest.mark.parametrize("m,c,config", [
    (1, 11, {}), (1, 11, _DEC), (16, 11, _DEC), (3, 11, dict(_DEC, GATHER=True)), (1, 11, dict(_DEC, WORDS=False)),
    (1, 11, dict(_DEC, ONE_DOT=False)), (1, 8, dict(_DEC, BLOCK_V=32)),
    pytest.param(1, 11, _TAB, id="table-default"), pytest.param(16, 11, _TAB, id="table-m16"),
    pytest.param(3, 11, dict(_TAB, R=8), id="table-r8-m3"),
    # more rows than threads: legal with the table in global memory (Triton's layout conversion in the
    # loop has its own shared memory there); TABLE="shared" refuses it (test below)
    pytest.param(3, 11, dict(_TAB, BLOCK_N=512, TABLE="global"), id="table-r16-bn512-global"),
    pytest.param(1, 8, dict(_TAB, R=4, BLOCK_N=256, SPLIT_N=1, RED=64), id="table-c8-r4"),
    pytest.param(1, 8, dict(_TAB, R=4, BLOCK_N=128, num_warps=4, SPLIT_N=1, RED=64), id="table-c8-r4-w4"),
    pytest.param(1, 11, dict(_TAB, TABLE="global"), id="table-global"),
    pytest.param(1, 11, dict(_TAB, R=8, TABLE="gather"), id="table-gather"),
    pytest.param(1, 11, dict(_TAB, PREFETCH=0, SWZ=False, WORDS=False), id="table-bytes"),
    pytest.param(1, 11, dict(_TAB, R=8, LOADS="rotated"), id="table-r8-rotated"),
    pytest.param(2, 11, dict(_TAB, LOADS="rotated"), id="table-r16-rotated")])
def test_codebook_gemv_against_float64(m, c, config):
    from lowbit.codebook import dequantize_codebook_weight
    from lowbit.codegen.triton import codebook as kc

    n, k = 4096 + 40, 4096
    g = torch.Generator(device=DEV).manual_seed(c)
    idx = torch.randint(0, 256, (n, k // 16 * c // 8), generator=g, device=DEV, dtype=torch.uint8)
    cb = torch.randint(0, 256, ((1 << c) * 2,), generator=g, device=DEV, dtype=torch.uint8)
    sc = (torch.rand(n, 1, generator=g, device=DEV) * 200).to(torch.float8_e4m3fn)
    gs = torch.tensor(1e-3, device=DEV)
    bias = torch.randn(n, device=DEV)
    w = dequantize_codebook_weight(idx, cb, sc, gs, 16, c, k, "e4m3")
    x = torch.randn(m, k - 16, device=DEV, dtype=torch.bfloat16)
    ref = x.double() @ w[:, : k - 16].double().T + bias.double()
    y = kc.codebook_gemv(x, idx, cb, sc, gs, bias, c, k, out_dtype=torch.float32, **config)
    assert rel_error(y, ref) < 1e-5
    yo = torch.ops.lowbit.codebook_linear(x, idx, cb, sc, gs, bias, 16, c, k, "e4m3")
    assert rel_error(yo.float(), ref) < 1e-2


def test_codebook_table_shared_refuses_more_rows_than_threads():
    """TABLE="shared" with BLOCK_N > 32 * num_warps is refused at launch: Triton would convert the
    row sums' layout through shared memory inside the lookup loop, over the table (R=16
    BLOCK_N=512 and R=4 BLOCK_N=1024 gave relative errors 0.47 and 5.3 on the H200)."""
    from lowbit.codegen.triton import codebook as kc

    n, k, c = 1024, 1024, 11
    idx = torch.zeros(n, k // 16 * c // 8, device=DEV, dtype=torch.uint8)
    cb = torch.zeros((1 << c) * 2, device=DEV, dtype=torch.uint8)
    sc = torch.ones(n, 1, device=DEV).to(torch.float8_e4m3fn)
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="BLOCK_N <= 32"):
        kc.codebook_gemv(x, idx, cb, sc, torch.tensor(1.0, device=DEV), None, c, k, path="table", BLOCK_N=512)


def test_codebook_m1_8192_table_path_and_default():
    """Among the Triton paths, M=1, K = N = 8192, c = 11 routes to the table path (R=16,
    TABLE="shared"; its compiled kernel passes the shared-memory check); it matches float64, and
    so do path=None (the Gluon kernel for bf16 x) and codebook_linear."""
    from lowbit.codebook import dequantize_codebook_weight
    from lowbit.codegen.triton import codebook as kc

    n = k = 8192
    c = 11
    assert kc._table_route(1, k, n, c) and not kc._table_route(2, k, n, c)
    g = torch.Generator(device=DEV).manual_seed(5)
    idx = torch.randint(0, 256, (n, k // 16 * c // 8), generator=g, device=DEV, dtype=torch.uint8)
    cb = torch.randint(0, 256, ((1 << c) * 2,), generator=g, device=DEV, dtype=torch.uint8)
    sc = (torch.rand(n, 1, generator=g, device=DEV) * 200).to(torch.float8_e4m3fn)
    gs = torch.tensor(1e-3, device=DEV)
    w = dequantize_codebook_weight(idx, cb, sc, gs, 16, c, k, "e4m3")
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    ref = x.double() @ w.double().T
    del w
    y = kc.codebook_gemv(x, idx, cb, sc, gs, None, c, k, out_dtype=torch.float32, path="table")
    assert rel_error(y, ref) < 1e-5
    assert rel_error(kc.codebook_gemv(x, idx, cb, sc, gs, None, c, k, out_dtype=torch.float32), ref) < 1e-5
    yo = torch.ops.lowbit.codebook_linear(x, idx, cb, sc, gs, None, 16, c, k, "e4m3")
    assert rel_error(yo.float(), ref) < 1e-2


@pytest.mark.parametrize("table,loads", [("shared", "words"), ("shared", "rotated"), ("global", "words"),
                                         ("gather", "words")])
def test_codebook_table_path_rows_off_word_bounds(table, loads):
    """path="table" where the index rows (255 vectors of 11 bits: 351 bytes) start off 4-byte
    boundaries (word loads of the flat stream, per-row shifts), N off every block, M = 3,
    launched twice (the same bits: the counters are left at zero)."""
    from lowbit.codebook import dequantize_codebook_weight
    from lowbit.codegen.triton import codebook as kc

    n, mv, c = 4096 + 40, 255, 11
    g = torch.Generator(device=DEV).manual_seed(7)
    idx = torch.randint(0, 256, (n, -(-mv * c // 8)), generator=g, device=DEV, dtype=torch.uint8)
    cb = torch.randint(0, 256, ((1 << c) * 2,), generator=g, device=DEV, dtype=torch.uint8)
    sc = (torch.rand(n, 1, generator=g, device=DEV) * 200).to(torch.float8_e4m3fn)
    gs = torch.tensor(1e-3, device=DEV)
    bias = torch.randn(n, device=DEV)
    w = dequantize_codebook_weight(idx, cb, sc, gs, 16, c, 16 * mv, "e4m3")
    x = torch.randn(3, 16 * mv - 5, device=DEV, dtype=torch.bfloat16)
    ref = x.double() @ w[:, : 16 * mv - 5].double().T + bias.double()
    cfg = dict(path="table", TABLE=table, LOADS=loads)
    y = kc.codebook_gemv(x, idx, cb, sc, gs, bias, c, 16 * mv, out_dtype=torch.float32, **cfg)
    assert rel_error(y, ref) < 1e-5
    assert torch.equal(y, kc.codebook_gemv(x, idx, cb, sc, gs, bias, c, 16 * mv, out_dtype=torch.float32, **cfg))


@pytest.mark.parametrize("rows,n,dtype", [(4096, 1536, torch.bfloat16), (3, 576, torch.float32),
                                          (2, 8192, torch.bfloat16), (100, 64, torch.float16),
                                          (5, 16384, torch.bfloat16)])
def test_hadamard_op_runs_the_exact_butterfly_kernel(rows, n, dtype):
    """With lowbit.codegen.triton imported, the Hadamard op's butterfly stages run in the Triton
    kernel on CUDA (p up to 8192; torch beyond): the output equals the torch stages' bit for bit."""
    import lowbit.hadamard as lh
    from lowbit.hadamard import _fwht_last, hadamard_transform

    assert lh._FWHT_KERNELS.get("cuda") is lt.dispatch.fwht_cuda
    x = torch.randn(rows, n, device="cuda").to(dtype)
    got = torch.ops.lowbit.hadamard(x)
    assert torch.equal(got, hadamard_transform(x, fwht=_fwht_last))
    # the autograd form (a float32 copy first, the scaling in float32, then the cast) gives the same bits
    assert torch.equal(got, hadamard_transform(x.clone().requires_grad_(True)).detach())
    ref = hadamard_transform(x.cpu().double())
    assert torch.allclose(got.double().cpu(), ref, rtol=2e-2, atol=2e-2)
