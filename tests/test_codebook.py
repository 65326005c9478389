"""Binary codebook format (lowbit.codebook) and CodebookPass (lowbit.passes.codebook)."""
import copy
import math

import pytest
import torch
from torch import nn

from lowbit.capture import capture
from lowbit.codebook import (
    CodebookFormat,
    CodebookLinear,
    binarize_weight,
    encode_binary_scales,
    hamming_kmeans,
    ls_scales,
    pack_codebook,
    pack_indices,
    quantize_codebook,
    unpack_codebook,
    unpack_indices,
)
from lowbit.formats import QFormat
from lowbit.pass_manager import CompileContext, CompileReport, run_passes
from lowbit.passes.codebook import BTC_OPTIONS, CodebookPass, make_codebook_pass
from lowbit.passes.weights import get_attr_path


def _random_module(n=24, k=96, fmt=None, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = fmt or CodebookFormat(16, 6, 32, "e4m3")
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    return CodebookLinear.from_weight(w, b, fmt), w, b


# -- storage and bits per weight --------------------------------------------------------------

def test_bits_per_weight_hand_computed():
    # N=48, K=128, v=16, c=6, G=32: rows of 8 indices * 6 bits = 48 bits = 6 bytes (no byte padding)
    n, k = 48, 128
    m = CodebookLinear(k, n, CodebookFormat(16, 6, 32, "e4m3"))
    assert m.indices_packed.shape == (48, 6) and m.codebook_packed.shape == (64 * 16 // 8,)
    expected = 6 / 16 + 8 / 32 + 64 * 16 / (n * k) + 32 / (n * k)
    assert m.bits_per_weight() == pytest.approx(expected, rel=1e-12)
    # fp16 scales: no global scale
    m16 = CodebookLinear(k, n, CodebookFormat(16, 6, 32, "fp16"))
    assert m16.bits_per_weight() == pytest.approx(6 / 16 + 16 / 32 + 64 * 16 / (n * k), rel=1e-12)
    # byte padding of a row's index stream and zero-padded columns: K=40 -> Kp=48 (v=16, per-row scales),
    # 3 indices x 5 bits = 15 bits -> 2 bytes per row; codebook 32 x 16 bits = 64 bytes; 1 scale per row
    n, k = 10, 40
    m = CodebookLinear(k, n, CodebookFormat(16, 5, 0, "e4m3"))
    assert m.packed_in_features == 48 and m.group_size == 48
    bits = n * 2 * 8 + 64 * 8 + n * 8 + 32
    assert m.bits_per_weight() == pytest.approx(bits / (n * k), rel=1e-12)
    assert CodebookFormat(16, 5, 0).bits_per_weight(n, k) == pytest.approx(bits / (n * k), rel=1e-12)


def test_index_packing_layout_and_roundtrip():
    # little-endian bitstream: [1, 2] at 2 bits -> bits 1,0,0,1 -> 0b1001
    assert pack_indices(torch.tensor([[1, 2]]), 2).tolist() == [[9]]
    # 8 bits: one index per byte
    idx = torch.tensor([[0, 255, 7, 128]])
    assert pack_indices(idx, 8).tolist() == [[0, 255, 7, 128]]
    g = torch.Generator().manual_seed(0)
    for c in (1, 3, 8, 10, 13, 16):
        idx = torch.randint(0, 1 << c, (5, 11), generator=g)
        packed = pack_indices(idx, c)
        assert packed.dtype == torch.uint8 and packed.shape == (5, math.ceil(11 * c / 8))
        assert torch.equal(unpack_indices(packed, 11, c), idx)


def test_codebook_packing():
    signs = torch.tensor([[1.0, -1, -1, 1, 1, 1, 1, -1], [-1.0, 1, 1, 1, 1, 1, 1, 1]])
    packed = pack_codebook(signs)
    assert packed.tolist() == [0b10000110, 0b00000001]  # bit 1 = negative, lowest index lowest bit
    assert torch.equal(unpack_codebook(packed, 2, 8), -(signs < 0).to(torch.int8))


# -- the op against an independent float64 reconstruction ------------------------------------

@pytest.mark.parametrize("scale_dtype,group", [("e4m3", 32), ("fp16", 16), ("e4m3", 0)])
def test_op_matches_float64_reconstruction(scale_dtype, group):
    fmt = CodebookFormat(8, 5, group, scale_dtype)
    m, w, b = _random_module(20, 72, fmt)
    n, kp, v = 20, m.packed_in_features, 8
    # unpack by hand: indices from the bitstream, codebook bits, scales
    stream = [(int(byte) >> j) & 1 for byte in m.indices_packed.flatten().tolist() for j in range(8)]
    row_bytes = m.indices_packed.shape[1]
    cb_bits = [(int(byte) >> j) & 1 for byte in m.codebook_packed.tolist() for j in range(8)]
    w64 = torch.zeros(n, kp, dtype=torch.float64)
    eff = m.weight_scales.double() * m.weight_global.double()
    for r in range(n):
        bits = stream[r * row_bytes * 8:(r + 1) * row_bytes * 8]
        for j in range(kp // v):
            idx = sum(bits[j * 5 + t] << t for t in range(5))
            for p in range(v):
                col = j * v + p
                sign = -1.0 if cb_bits[idx * v + p] else 1.0
                w64[r, col] = sign * 0.5 * eff[r, col // m.group_size]
    x = torch.randn(3, 5, 72, dtype=torch.float64)
    y64 = x @ w64[:, :72].T + b.double()
    y = m(x.float())
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), y64, rtol=1e-5, atol=1e-5)
    assert torch.allclose(m.dequantized_weight().double(), w64[:, :72], rtol=0, atol=1e-6)
    assert m(x.to(torch.bfloat16)).dtype == torch.bfloat16


# -- k-means ---------------------------------------------------------------------------------

def _weighted_hamming(signs, weights, codebook, assignment):
    c = codebook[assignment]
    return float(((torch.sign(signs) != c).double() * weights.double()).sum())


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("init", ["frequent", "random"])
def test_kmeans_objective_never_increases_and_assignment_is_optimal(weighted, init):
    g = torch.Generator().manual_seed(3)
    # correlated signs (some structure) so that k-means has work to do
    base = torch.randn(3000, 12, generator=g) + 0.8 * torch.randn(3000, 1, generator=g)
    signs = torch.where(base < 0, -1.0, 1.0)
    weights = base.abs() if weighted else torch.ones_like(base)
    res = hamming_kmeans(signs, 32, weights if weighted else None, iterations=15, seed=1, init=init)
    h = res.history
    assert len(h) >= 2
    assert all(b <= a + 1e-6 for a, b in zip(h, h[1:])), h
    if init == "random":   # the heaviest patterns are often already a fixed point
        assert h[-1] < h[0]
    # the reported objective is the weighted Hamming distance of the returned solution
    assert h[-1] == pytest.approx(_weighted_hamming(signs, weights, res.codebook, res.assignment), rel=1e-6)
    # every vector sits at a nearest centroid
    d = ((signs.unsqueeze(1) != res.codebook.unsqueeze(0)).double() * weights.double().unsqueeze(1)).sum(-1)
    assigned = d.gather(1, res.assignment.unsqueeze(1)).squeeze(1)
    assert torch.all(assigned <= d.min(1).values + 1e-4)
    assert set(res.codebook.unique().tolist()) <= {-1.0, 1.0}


def test_kmeans_is_seeded():
    signs = torch.where(torch.randn(500, 10, generator=torch.Generator().manual_seed(0)) < 0, -1.0, 1.0)
    a = hamming_kmeans(signs, 16, seed=5, init="random")
    b = hamming_kmeans(signs, 16, seed=5, init="random")
    assert torch.equal(a.codebook, b.codebook) and torch.equal(a.assignment, b.assignment)


def test_kmeans_recovers_repeated_patterns_exactly():
    g = torch.Generator().manual_seed(7)
    v, c = 16, 32
    patterns = torch.unique(torch.where(torch.randn(c, v, generator=g) < 0, -1.0, 1.0), dim=0)
    assert len(patterns) == c
    which = torch.randint(0, c, (4000,), generator=g)
    signs = patterns[which]
    for weights in (None, torch.rand(4000, v, generator=g) + 0.1):
        res = hamming_kmeans(signs, c, weights)
        assert res.objective == 0
        got = {tuple(r) for r in res.codebook.tolist()}
        assert got == {tuple(r) for r in patterns.tolist()}
        assert torch.equal(res.codebook[res.assignment], signs)


def test_structured_weight_is_reconstructed_exactly():
    # rows built from 8 sign patterns with one magnitude per row: the format is exact
    g = torch.Generator().manual_seed(2)
    patterns = torch.where(torch.randn(8, 16, generator=g) < 0, -1.0, 1.0)
    idx = torch.randint(0, 8, (12, 4), generator=g)
    mags = torch.tensor([2.0 ** e for e in range(-3, 9)]).unsqueeze(1)   # exact in E4M3 * global
    w = patterns[idx].reshape(12, 64) * mags
    m = CodebookLinear.from_weight(w, None, CodebookFormat(16, 3, 0, "e4m3"))
    assert torch.equal(m.dequantized_weight(), w)


# -- scales ----------------------------------------------------------------------------------

def test_least_squares_scale():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g, dtype=torch.float64)
    b = torch.where(torch.randn(6, 64, generator=g) < 0.3, -1.0, 1.0).double()
    a = ls_scales(w, b, 16).double()
    expect = ((w * b).reshape(6, 4, 16).sum(-1) / 16).clamp_min(0)
    assert torch.allclose(a, expect, atol=1e-6)
    # it minimises ||w - a b||^2 per group: perturbations never do better
    wg, bg = w.reshape(6, 4, 16), b.reshape(6, 4, 16)
    err = lambda s: ((wg - s.unsqueeze(-1) * bg) ** 2).sum(-1)  # noqa: E731
    for d in (-1e-3, 1e-3):
        pert = (expect + d).clamp_min(0)
        assert torch.all(err(expect) <= err(pert) + 1e-12)
    # fp32 scales store 2a exactly (half grid: values +-stored/2); E4M3 takes the nearest value
    fmt32 = QFormat(1, "half", 16, "fp32")
    stored, gscale = encode_binary_scales(a, fmt32)
    assert torch.equal(stored, 2 * a) and float(gscale) == 1.0
    fmt8 = QFormat(1, "half", 16, "e4m3")
    stored, gscale = encode_binary_scales(a, fmt8)
    ratio = (2 * a / gscale).double()
    grid = torch.arange(0, 256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    grid = grid[torch.isfinite(grid) & (grid >= 0) & (grid <= fmt8.scale_max)]
    nearest_dist = (ratio.unsqueeze(-1) - grid).abs().min(-1).values
    assert torch.allclose((stored.double() - ratio).abs(), nearest_dist, atol=1e-12)


def test_binarize_weight_is_sign_times_mean_abs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 40, generator=g)
    fmt = QFormat(1, "half", 16, "fp32")
    qt = binarize_weight(w, fmt)
    assert qt.codes.shape == (8, 48)   # padded to a multiple of the group size and of 8
    deq = qt.dequantize()[:, :40]
    mean_abs = torch.cat([w[:, :16].abs().mean(1, keepdim=True).expand(8, 16),
                          w[:, 16:32].abs().mean(1, keepdim=True).expand(8, 16),
                          w[:, 32:].abs().mean(1, keepdim=True).expand(8, 8)], 1)
    assert torch.allclose(deq, torch.where(w < 0, -1.0, 1.0) * mean_abs, atol=1e-6)


# -- the site module --------------------------------------------------------------------------

def test_config_roundtrip_and_state_dict():
    m, _, _ = _random_module(fmt=CodebookFormat(12, 7, 0, "fp16"))
    m2 = CodebookLinear.from_config(m.config())
    m2.load_state_dict(m.state_dict())
    x = torch.randn(4, 96)
    assert torch.equal(m(x), m2(x))
    assert m2.bits_per_weight() == m.bits_per_weight()


def test_export_and_compile():
    m, w, b = _random_module()
    x = torch.randn(2, 5, 96)
    ref = m(x)
    ep = torch.export.export(m, (x,))
    assert any(n.target is torch.ops.lowbit.codebook_linear.default for n in ep.graph.nodes)
    assert torch.equal(ep.module()(x), ref)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), ref)


# -- the pass ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def captured_llama():
    """A tiny LlamaForCausalLM (conftest's config), its captured graph and calibration ids;
    captured once for the module (export is the slow part), copied by each test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    calib = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gm = capture(model, (calib[:1],)).graph_module
    return model, gm, calib


def _run(captured, passes_fn):
    model, gm, calib = captured
    model = copy.deepcopy(model)
    gm = copy.deepcopy(gm)
    report = CompileReport()
    ctx = CompileContext(report=report, calibration=[(calib[:1],), (calib[1:],)], progress=False)
    with torch.no_grad():
        gm = run_passes(gm, passes_fn(ctx), report)
    return model, gm, report


def test_codebook_pass_on_tiny_llama(captured_llama):
    tiny_llama = captured_llama[0]
    _, gm, report = _run(captured_llama, lambda ctx: [CodebookPass(16, 5, 32, weighting="magnitude", context=ctx)])
    linear = {n for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)}
    replaced = {n for n, m in gm.named_modules() if isinstance(m, CodebookLinear)}
    assert replaced == linear - {"lm_head"}
    assert set(report.sites) == replaced
    for name, s in report.sites.items():
        n, k = s["shape"]
        assert s["format"] == "btc_v16_c5_g32_e4m3"
        assert s["numel"] == n * k
        assert s["bits_per_weight"] == pytest.approx(CodebookFormat(16, 5, 32).bits_per_weight(n, k))
        assert 0 < s["rel_error"] < 1.0
        assert s["kmeans_objective"][1] <= s["kmeans_objective"][0]
    assert report.passes[0].name == "codebook" and report.passes[0].details["sites"] == len(replaced)
    # the graph computes the float model with the dequantized weights
    ref = copy.deepcopy(tiny_llama)
    for name in replaced:
        ref.get_submodule(name).weight.data = gm.get_submodule(name).dequantized_weight()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        out = gm(ids)
        want = ref(ids, use_cache=False).logits
    logits = out.logits if hasattr(out, "logits") else out[0]
    assert torch.allclose(logits, want, rtol=1e-4, atol=1e-4)
    # activation weighting changes the result and lowers the mean output error on calibration inputs
    _, _, rep_act = _run(captured_llama, lambda ctx: [CodebookPass(16, 5, 32, weighting="activation", context=ctx)])
    assert rep_act.passes[0].details["mean_rel_error"] < report.passes[0].details["mean_rel_error"] * 1.05


def test_materialize_generate_and_artifacts(captured_llama, tmp_path):
    import lowbit
    from lowbit.api import materialize

    model, gm, report = _run(captured_llama, lambda ctx: [make_codebook_pass({"index_bits": 4}, ctx)])
    q = materialize(model, gm)
    assert isinstance(q.model.layers[0].mlp.down_proj, CodebookLinear)
    q.lowbit_report = report
    with torch.no_grad():
        out = q.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    lowbit.save(q, tmp_path / "art")
    loaded = lowbit.load(tmp_path / "art")
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)


def test_prologue_is_kept():
    from lowbit.prologue import ChannelSplitPrologue, PrologueLinear

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(40, 16)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(Net())
    # what a prologue pass (channel split) leaves at a site: a call_module PrologueLinear
    gm.fc = PrologueLinear.wrap(torch.randn(16, 40), torch.randn(16), [ChannelSplitPrologue(32, 40)])
    gm.fc.site_in_features = 32
    x = torch.randn(6, 32)
    ctx = CompileContext(calibration=[(x,)], progress=False)
    gm = run_passes(gm, [CodebookPass(8, 3, 8, ignore=[], context=ctx)], ctx.report)
    site = gm.get_submodule("fc")
    assert isinstance(site, CodebookLinear) and len(site.prologue) == 1
    assert site.in_features == 32 and site.weight_in_features == 40
    y = torch.nn.functional.linear(site.prologue[0](x), site.dequantized_weight(), site.bias)
    assert torch.allclose(gm(x), y, atol=1e-5)
    s = ctx.report.sites["fc"]
    assert s["bits_per_weight"] == pytest.approx(site.storage_bits() / (16 * 32))


def test_ignore_and_only(captured_llama):
    _, gm, report = _run(captured_llama, lambda ctx: [CodebookPass(16, 4, 32, only=["*.mlp.*"], context=ctx)])
    replaced = {n for n, m in gm.named_modules() if isinstance(m, CodebookLinear)}
    assert replaced and all(".mlp." in n for n in replaced)


def test_btc_preset_options_and_bad_options():
    assert BTC_OPTIONS["vector_size"] == 16
    with pytest.raises(ValueError):
        CodebookFormat(16, 17)
    with pytest.raises(ValueError):
        CodebookPass(weighting="euclid")
    with pytest.raises(ValueError):
        quantize_codebook(torch.randn(4, 16), CodebookFormat(16, 2), weighting="activation")


def test_complete_codebook_is_plain_binarization():
    # c = v: every sign pattern has its own entry, so the format is exactly sign(W) * mean|w| per group
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 64, generator=g)
    m = CodebookLinear.from_weight(w, None, CodebookFormat(8, 8, 16, "e4m3"), weighting="hamming")
    qt = binarize_weight(w, QFormat(1, "half", 16, "e4m3"))
    assert torch.equal(m.dequantized_weight(), qt.dequantize())
    assert torch.equal(m.weight_scales.float(), qt.scales.float()) and torch.equal(m.weight_global, qt.global_scale)


# -- the btc preset ----------------------------------------------------------------------------

def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_btc_preset_compile_save_load(tmp_path):
    import lowbit
    from lowbit.recipes import Recipe, get_recipe

    recipe = get_recipe("btc")
    assert Recipe.from_json(recipe.to_json()) == recipe
    entry = dict(recipe.passes[0])
    assert entry.pop("name") == "codebook" and entry == BTC_OPTIONS
    # small codebooks keep the tiny model quick; everything else is the preset
    recipe.passes[0].update(index_bits=4, scaling_iterations=1)
    model = _tiny_llama()
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    q = lowbit.compile_quantized(model, recipe=recipe, calibration=calib, progress=False)
    sites = {n: m for n, m in q.named_modules() if isinstance(m, CodebookLinear)}
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(sites) == linear - {"lm_head"}
    fmt = CodebookFormat(**{k: BTC_OPTIONS[k] for k in ("vector_size", "group_size", "scale_dtype")}, index_bits=4)
    rep = q.lowbit_report.sites
    assert BTC_OPTIONS["scaling"] and {rep[n]["channel_scaling"] for n in sites} == {
        "norm", "producer model.layers.0.self_attn.v_proj", "producer model.layers.0.mlp.up_proj",
        "producer model.layers.1.self_attn.v_proj", "producer model.layers.1.mlp.up_proj"}
    for name, m in sites.items():   # exact bits: the format's count, the stored buffers' count
        n, k = m.out_features, m.in_features
        assert rep[name]["bits_per_weight"] == pytest.approx(fmt.bits_per_weight(n, k), rel=1e-12)
        assert rep[name]["bits_per_weight"] == pytest.approx(m.storage_bits() / (n * k), rel=1e-12)
    lowbit.save(q, tmp_path / "art")
    manifest = (tmp_path / "art" / "manifest.json").read_text()
    assert '"CodebookLinear"' in manifest
    loaded = lowbit.load(tmp_path / "art")
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, CodebookLinear)
    assert loaded.lowbit_recipe == recipe
    ids = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
        assert torch.equal(loaded.generate(ids, max_new_tokens=3, do_sample=False),
                           q.generate(ids, max_new_tokens=3, do_sample=False))


# -- learned channel scaling ---------------------------------------------------------------------

def test_channel_scaling_is_a_float_identity(captured_llama):
    from lowbit.capture import find_linear_sites
    from lowbit.passes.codebook import apply_channel_scaling, scaling_groups
    from lowbit.prologue import PrologueLinear

    model, gm, _ = captured_llama
    gm = copy.deepcopy(gm)
    chosen = {n for n in find_linear_sites(gm) if n != "lm_head"}
    groups = scaling_groups(gm, chosen)
    norm_groups = [g for g in groups if g.norm_weight]
    # q/k/v share the attention norm, gate/up the MLP norm; o_proj's scales go to v_proj's rows
    # (2 query heads per value head: tied in pairs), down_proj's to up_proj's rows
    assert sorted(len(g.sites) for g in norm_groups) == [2, 2, 3, 3]
    producers = {g.sites[0]: g for g in groups if g.producer}
    assert {g.sites[0] for g in groups if not g.norm_weight} == set(producers) and len(producers) == 4
    for layer in (0, 1):
        o, down = producers[f"model.layers.{layer}.self_attn.o_proj"], producers[f"model.layers.{layer}.mlp.down_proj"]
        assert o.producer == f"model.layers.{layer}.self_attn.v_proj"
        assert down.producer == f"model.layers.{layer}.mlp.up_proj" and torch.equal(down.tie, torch.arange(128))
        assert o.tie.tolist() == list(range(16)) * 2 + list(range(16, 32)) * 2
    assert {n for g in groups for n in g.sites} == chosen
    g = torch.Generator().manual_seed(5)
    for group in groups:
        k = get_attr_path(gm, find_linear_sites(gm)[group.sites[0]].weight).shape[1]
        s = torch.exp(torch.randn(k, generator=g, dtype=torch.float64))
        if group.tie is not None:   # tied channels share a scale
            s = s[group.tie]
        apply_channel_scaling(gm, group, s)
    assert not torch.all(get_attr_path(gm, norm_groups[0].norm_weight) == model.model.layers[0].input_layernorm.weight)
    ids = torch.randint(0, 256, (2, 13), generator=g)
    with torch.no_grad():
        out = gm(ids)
        want = model(ids, use_cache=False).logits
    got = out.logits if hasattr(out, "logits") else out[0]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()

    # no norm and no producer (a ReLU in between): a prologue; after an existing prologue
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(12, 24), nn.Linear(24, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    net = Net()
    gm = torch.fx.symbolic_trace(net)
    groups = scaling_groups(gm, {"a", "b"})
    assert [(gr.sites, gr.norm_weight, gr.producer) for gr in groups] == [(["a"], None, None), (["b"], None, None)]
    for gr in groups:
        apply_channel_scaling(gm, gr, torch.rand(gm.get_submodule(gr.sites[0]).in_features, generator=g,
                                                 dtype=torch.float64) + 0.1)
    apply_channel_scaling(gm, groups[1], torch.rand(24, generator=g, dtype=torch.float64) + 0.1)
    assert isinstance(gm.b, PrologueLinear) and len(gm.b.prologue) == 2
    x = torch.randn(5, 12)
    assert torch.allclose(gm(x), net(x), rtol=1e-5, atol=1e-6)


def test_learned_scaling_lowers_the_output_error():
    from lowbit.passes.codebook import learn_channel_scaling

    # columns of very different magnitudes: per-row scales alone fit them badly
    g = torch.Generator().manual_seed(0)
    n, k = 48, 64
    col = torch.exp(1.5 * torch.randn(k, generator=g))
    w = torch.randn(n, k, generator=g) * col
    x = torch.randn(512, k, generator=g) * torch.exp(0.5 * torch.randn(k, generator=g))
    fmt = CodebookFormat(8, 5, 0, "fp32")
    res = learn_channel_scaling([w, 0.5 * w[:24]], x, fmt, "activation", steps=3)
    assert res.history[0] == max(res.history) and res.history[res.best] < 0.7 * res.history[0]

    def rel_output_error(s, cws, ws):   # on the data itself, in float64
        errs = []
        for cw, wr in zip(cws, ws):
            wq = cw.dequantize()[:, :k].double() / s
            errs.append(((x.double() @ (wr.double() - wq).T).norm() / (x.double() @ wr.double().T).norm()) ** 2)
        return float(sum(errs) / len(errs))

    assert rel_output_error(res.scale, res.weights, [w, 0.5 * w[:24]]) == pytest.approx(res.history[res.best], rel=1e-6)
    one = learn_channel_scaling([w, 0.5 * w[:24]], x, fmt, "activation", steps=0)
    assert rel_output_error(torch.ones(k, dtype=torch.float64), one.weights, [w, 0.5 * w[:24]]) \
        == pytest.approx(res.history[0], rel=1e-6)
    assert torch.all(res.scale > 0)


def test_codebook_pass_with_scaling(captured_llama):
    from lowbit.api import materialize

    _, _, plain = _run(captured_llama, lambda ctx: [CodebookPass(16, 4, 0, context=ctx)])
    model, gm, report = _run(captured_llama, lambda ctx: [CodebookPass(16, 4, 0, scaling=True, scaling_iterations=2,
                                                                       context=ctx)])
    d = report.passes[0].details
    assert d["scaling_groups"] == 8 and d["scaling_norm_groups"] == 4 and d["scaling_producer_groups"] == 4
    assert d["scaling_objective"][1] < d["scaling_objective"][0]
    assert d["mean_rel_error"] < plain.passes[0].details["mean_rel_error"]
    down = gm.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(down, CodebookLinear) and len(down.prologue) == 0   # folded: no op added
    # the sites' reported errors are those of the installed modules on the (scaled) inputs
    q = materialize(model, gm)
    with torch.no_grad():
        out = q.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
