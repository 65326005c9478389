"""Outlier channel splitting: float identity, rounding-aware halves, activation splitting."""
import copy
import math

import pytest
import torch

import lowbit
from lowbit.formats import QFormat, quantize_weight_rtn
from lowbit.passes.split_outliers import SplitOutliersPass, rounding_aware_halves, split_width
from lowbit.prologue import ChannelSplitPrologue, PrologueLinear


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_split_width_rounds_to_group_multiple():
    assert split_width(64, 0.05, 16) == 80
    assert split_width(172, 0.05, 16) == 192
    assert split_width(1536, 0.05, 16) == 1616
    assert split_width(1536, 0.05, 16) % 16 == 0


def test_channel_split_op_matches_indexing_and_exports():
    x = torch.randn(3, 5, 8)
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 2, 6])
    sc = torch.tensor([1, 1, 0.5, 1, 1, 1, 1, 1, 0.5, 1])
    y = torch.ops.lowbit.channel_split(x, idx, sc)
    ref = torch.stack([x[..., int(i)] * float(s) for i, s in zip(idx, sc)], -1)
    assert torch.equal(y, ref)
    p = ChannelSplitPrologue(8, 10, idx, sc)
    ep = torch.export.export(p, (x,))
    assert any("channel_split" in str(n.target) for n in ep.graph.nodes)
    assert torch.equal(ep.module()(x), y)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("grid", ["int", "half"])
def test_rounding_aware_halves_against_brute_force(bits, grid):
    """Independent float64 brute force: among first-half codes within 1.5 steps of w/2,
    with the second half rounded to its own grid, take the smallest quantized-sum error."""
    fmt = QFormat(bits, grid)
    off = 0.5 if grid == "half" else 0.0
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(400, generator=g, dtype=torch.float64)
    s1 = torch.rand(400, generator=g, dtype=torch.float64) + 0.4
    s2 = torch.rand(400, generator=g, dtype=torch.float64) + 0.4
    w1 = rounding_aware_halves(w, s1, s2, fmt)

    def q(v, s):  # the format's rounding of a value to the s grid, clamped
        r = math.floor(v / s) if grid == "half" else round(v / s)
        return min(max(r, fmt.qmin), fmt.qmax)

    def err(a, x, u1, u2):
        return abs((a + off) * u1 + (q(x - (a + off) * u1, u2) + off) * u2 - x)

    beaten = 0
    for i in range(400):
        x, u1, u2 = w[i].item(), s1[i].item(), s2[i].item()
        assert abs(w1[i].item() / u1 - off - round(w1[i].item() / u1 - off)) < 1e-9  # on the grid
        got = err(round(w1[i].item() / u1 - off), x, u1, u2)
        cands = [a for a in range(fmt.qmin, fmt.qmax + 1) if abs((a + off) - x / 2 / u1) <= 1.5]
        if cands:
            assert got <= min(err(a, x, u1, u2) for a in cands) + 1e-12
        plain = abs((q(x / 2, u1) + off) * u1 + (q(x / 2, u2) + off) * u2 - x)
        assert got <= plain + 1e-12
        beaten += got < plain - 1e-12
    assert beaten > 40  # it really improves on plain halving for many weights


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("mode", ["weight", "activation"])
@pytest.mark.parametrize("rounding_aware", [False, True])
def test_split_is_a_float_identity(mode, rounding_aware):
    model = _model()
    ids = torch.randint(0, 256, (2, 16))
    fresh = torch.randint(0, 256, (3, 21))
    ref = model(fresh, use_cache=False).logits
    ctx = lowbit.CompileContext(calibration=[(ids,)], recipe=lowbit.get_recipe("w2a2"), progress=False)
    gm = SplitOutliersPass(ctx, mode=mode, rounding_aware=rounding_aware)(lowbit.capture(copy.deepcopy(model), (ids,)).graph_module).graph_module
    site = gm.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(site, PrologueLinear) and site.weight.shape == (64, 144)
    split = site.prologue[-1]
    assert isinstance(split, ChannelSplitPrologue)
    assert torch.equal(split.index[:128], torch.arange(128))
    if mode == "activation":
        assert set(split.scale.unique().tolist()) == {0.5, 1.0}
    assert _rel(gm(fresh).logits, ref) < 1e-5


def test_split_channels_are_the_outliers():
    model = _model()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 7] *= 50
    ids = torch.randint(0, 256, (1, 8))
    ctx = lowbit.CompileContext(recipe=lowbit.get_recipe("w2a16"), progress=False)
    gm = SplitOutliersPass(ctx)(lowbit.capture(model, (ids,)).graph_module).graph_module
    split = gm.get_submodule("model.layers.0.mlp.down_proj").prologue[-1]
    assert 7 in split.index[128:].tolist()


def test_rounding_aware_beats_plain_halving_on_weight_error():
    """Quantization error of the split site (what the layer computes), measured against
    the original weight, is lower with rounding-aware halves, at 2 bits."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g) * torch.exp(torch.randn(256, generator=g))  # heavy columns
    fmt = QFormat(2)
    errs = {}
    for ra in (False, True):
        lin = torch.nn.Linear(256, 64, bias=False)
        lin.weight.data = w.clone()
        gm = torch.fx.symbolic_trace(torch.nn.Sequential(lin))
        ctx = lowbit.CompileContext(recipe=lowbit.Recipe("x", fmt), progress=False)
        out = SplitOutliersPass(ctx, rounding_aware=ra, expand_ratio=0.1)(gm).graph_module
        site = out.get_submodule("0")
        qt = getattr(site, "weight_qtensor", None) or quantize_weight_rtn(site.weight.detach(), fmt)
        deq = qt.dequantize().double()
        # fold the split back: sum the columns that copy the same input channel
        folded = torch.zeros(64, 256, dtype=torch.float64).index_add_(1, site.prologue[-1].index, deq)
        errs[ra] = ((folded - w.double()).norm() / w.double().norm()).item()
    assert errs[True] < errs[False] * 0.97


def test_compile_with_split_and_rotation_roundtrips(tmp_path):
    model = _model()
    calib = torch.randint(0, 256, (2, 16))
    recipe = lowbit.get_recipe("w2a2").with_passes({"name": "rotate"}, {"name": "split_outliers"})
    q = lowbit.compile_quantized(model, recipe, calibration=calib, progress=False)
    down = q.model.layers[1].mlp.down_proj
    assert [type(p).__name__ for p in down.prologue] == ["HadamardPrologue", "ChannelSplitPrologue"]
    assert q.lowbit_report.sites["model.layers.1.mlp.down_proj"]["split_channels"] == 16
    lowbit.save(q, tmp_path / "a")
    back = lowbit.load(tmp_path / "a")
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)


@pytest.mark.parametrize("grid", ["int", "half"])
def test_gptq_quantizes_the_split_sites(grid):
    """With a GPTQ recipe the split sites are GPTQ-quantized on their split inputs (not given the
    splitting pass's rounding-aware codes, which know nothing of the calibration activations):
    the report names GPTQ for them, and their output error on the calibration inputs is lower
    than with the split-aware codes."""
    from dataclasses import replace

    model = _model()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    base = lowbit.get_recipe("w2a16")
    base = replace(base, weight=replace(base.weight, grid=grid)).with_passes({"name": "split_outliers"})
    reports = {}
    for gptq in (False, True):
        recipe = base.with_gptq() if gptq else base
        q = lowbit.compile_quantized(copy.deepcopy(model), recipe, calibration=calib, progress=False)
        reports[gptq] = {n: s for n, s in q.lowbit_report.sites.items() if s.get("split_channels")}
    assert reports[True] and reports[True].keys() == reports[False].keys()
    assert {s["method"] for s in reports[False].values()} == {"split-aware"}
    assert {s["method"] for s in reports[True].values()} == {"gptq"}
    err = {g: sum(s["rel_error"] for s in r.values()) / len(r) for g, r in reports.items()}
    assert err[True] < err[False]
