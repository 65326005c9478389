"""torch.ops.lowbit ops: reference numerics, fake implementations, export and compile."""
import pytest
import torch

import lowbit.ops  # noqa: F401
from lowbit.formats import QFormat, dequantize_codes, effective_scales, quantize, quantize_weight_rtn, pack_codes
from lowbit.quant_linear import QuantLinear


def _act_codes_f64(x, fmt):
    """Independent per-row activation quantization in float64 (E4M3 via the torch cast)."""
    xg = x.double().reshape(*x.shape[:-1], -1, fmt.group_size)
    s = torch.maximum(xg.amax(-1).clamp(min=0) / fmt.level_hi, xg.amin(-1).clamp(max=0) / fmt.level_lo)
    gmax = s.amax(-1, keepdim=True) / fmt.scale_max
    stored = ((s / gmax).float() * 1.0625).clamp(max=fmt.scale_max).to(torch.float8_e4m3fn)
    eff = stored.double() * gmax.float().double()
    q = torch.clamp(torch.round(xg / eff[..., None]), fmt.qmin, fmt.qmax)
    return q.reshape(x.shape), stored


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_act_against_float64(bits):
    fmt = QFormat(bits, "int", 16, "e4m3")
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(bits)) * torch.logspace(-2, 2, 64)
    codes, scales, gscale = torch.ops.lowbit.quantize_act(x, bits, "int", 16, "e4m3")
    assert codes.shape == x.shape and codes.dtype == torch.int8
    assert scales.shape == (3, 5, 4) and scales.dtype == torch.float8_e4m3fn
    assert gscale.shape == (3, 5, 1)
    ref_q, ref_s = _act_codes_f64(x, fmt)
    assert torch.equal(scales.float(), ref_s.float())
    # fp32 and float64 division can disagree only next to a rounding tie
    eff = (scales.double() * gscale.double()).repeat_interleave(16, dim=-1)
    ratio = x.double() / eff
    near_tie = (ratio - ratio.floor() - 0.5).abs() < 1e-5
    assert torch.all((codes.double() == ref_q) | near_tie)


def test_qlinear_matches_float64_on_dequantized_operands():
    torch.manual_seed(0)
    wfmt, afmt = QFormat(2, "int"), QFormat(2, "int")
    w = torch.randn(24, 64)
    b = torch.randn(24)
    x = torch.randn(2, 7, 64)
    qt = quantize_weight_rtn(w, wfmt)
    packed = pack_codes(qt.codes, 2)
    y = torch.ops.lowbit.qlinear(x, packed, qt.scales, qt.global_scale, b, 2, "int", 16, "e4m3", 2, "int", 16, "e4m3")
    wd = qt.dequantize().double()
    xq = quantize(x, afmt, per_row=True)
    xd = xq.dequantize().double()
    ref = xd @ wd.T + b.double()
    assert y.shape == (2, 7, 24)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
    # W2A16 path: activations untouched
    y16 = torch.ops.lowbit.qlinear(x, packed, qt.scales, qt.global_scale, None, 2, "int", 16, "e4m3", 0, "int", 16, "e4m3")
    assert torch.allclose(y16.double(), x.double() @ wd.T, rtol=1e-5, atol=1e-5)


def _small_quant_linear():
    torch.manual_seed(0)
    return QuantLinear.from_weight(torch.randn(32, 64), torch.randn(32), QFormat(2), QFormat(4))


def test_ops_under_torch_export():
    ql = _small_quant_linear()
    x = torch.randn(3, 64)
    ep = torch.export.export(ql, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "lowbit.qlinear.default" in targets
    x2 = torch.randn(3, 64)
    assert torch.equal(ep.module()(x2), ql(x2))


def test_quantize_act_under_export_and_compile():
    class M(torch.nn.Module):
        def forward(self, x):
            c, s, g = torch.ops.lowbit.quantize_act(x, 2, "int", 16, "e4m3")
            return c.float() * 2 + g

    x = torch.randn(4, 32)
    ep = torch.export.export(M(), (x,))
    assert any("quantize_act" in str(n.target) for n in ep.graph.nodes)
    assert torch.equal(ep.module()(x), M()(x))
    compiled = torch.compile(M(), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), M()(x))


def test_qlinear_under_torch_compile():
    ql = _small_quant_linear()
    x = torch.randn(5, 64)
    compiled = torch.compile(ql, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), ql(x))


def test_eager_calls_reach_the_registered_kernel_without_the_dispatcher(monkeypatch):
    """QuantLinear.forward calls the kernel recorded with register_eager_kernel directly only in
    plain eager mode; export, FX tracing, torch.compile and autograd see the op."""
    from lowbit import ops

    calls = []

    def kernel(*args):
        calls.append(args[0].shape)
        return ops.qlinear_reference(*args)

    monkeypatch.setitem(ops._EAGER_KERNELS, ("qlinear", "cpu"), kernel)
    ql = _small_quant_linear()
    x = torch.randn(3, 64)
    ref = ops.qlinear_reference(x, ql.weight_packed, ql.weight_scales, ql.weight_global, ql.bias,
                                2, "int", 16, "e4m3", 4, "int", 16, "e4m3")
    assert torch.equal(ql(x), ref) and calls == [x.shape]
    with torch.no_grad():
        assert torch.equal(ql(x.clone().requires_grad_()), ref) and len(calls) == 2
    calls.clear()
    ql(x.clone().requires_grad_())  # autograd on: the op
    ep = torch.export.export(ql, (x,))
    assert "lowbit.qlinear.default" in {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    gm = torch.fx.symbolic_trace(ql)
    assert any("qlinear" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    compiled = torch.compile(ql, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), ref)
    assert calls == []  # none of these went around the op
    assert torch.equal(ep.module()(x), ref)  # the exported graph runs the op (its CPU kernel)


@pytest.mark.parametrize("grid", ["int", "half"])
def test_quant_linear_pads_widths_that_are_not_a_group_multiple(grid):
    """K = 60 is stored padded to 64; the product must ignore the padding exactly
    (with the half grid a padded zero would quantize to +-0.5*s, not zero)."""
    torch.manual_seed(0)
    w, x = torch.randn(8, 60), torch.randn(5, 60)
    ql = QuantLinear.from_weight(w, None, QFormat(2, grid), QFormat(4, grid))
    assert ql.weight_packed.shape == (8, 16) and ql.weight_scales.shape == (8, 4)
    wd = ql.dequantized_weight().double()
    assert wd.shape == (8, 60)
    xq = quantize(torch.nn.functional.pad(x, (0, 4)), QFormat(4, grid), per_row=True).dequantize().double()[:, :60]
    assert torch.allclose(ql(x).double(), xq @ wd.T, rtol=1e-5, atol=1e-5)
    assert ql.bits_per_weight() == pytest.approx((64 * 8 * 2 + 4 * 8 * 8 + 32) / (60 * 8))
