"""The fuse pass: sites reading the same activation (q/k/v, gate/up) run as one site.

References are independent of the fused code path: float64 models with the original
(or the dequantized fused) weights written into plain ``nn.Linear`` layers.
"""
import copy
import importlib.util

import pytest
import torch
from torch import nn

import lowbit
from lowbit.fused import FusedSlice, link_fused_sites
from lowbit.ops import dequantize_weight, fake_quantize_act
from lowbit.passes.fuse import FusePass
from lowbit.pass_manager import CompileContext

MEMBERS = {"self_attn": ["q_proj", "k_proj", "v_proj"], "mlp": ["gate_proj", "up_proj"]}
FUSED = {"self_attn": "fused_q_proj_k_proj_v_proj", "mlp": "fused_gate_proj_up_proj"}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _fuse_recipe(base="w4a16", **kw):
    return lowbit.get_recipe(base).with_passes({"name": "fuse", **kw})


class _Count:
    """Counts calls of torch.ops.lowbit ops (the namespace attributes the modules look up)."""

    def __init__(self, monkeypatch, *names):
        self.n = {k: 0 for k in names}
        for k in names:
            op = getattr(torch.ops.lowbit, k)

            def wrapped(*a, _op=op, _k=k, **kw):
                self.n[_k] += 1
                return _op(*a, **kw)

            monkeypatch.setattr(torch.ops.lowbit, k, wrapped)


def _dequantized_float64(qmodel, float_model):
    """float_model in float64 with every quantized site's weight replaced by its dequantized
    weight (fused sites' rows split back to their members); weight-only formats."""
    ref = copy.deepcopy(float_model).double()
    for i, layer in enumerate(qmodel.model.layers):
        for part, members in MEMBERS.items():
            fused = getattr(getattr(layer, part), FUSED[part])
            w = dequantize_weight(fused.weight_packed, fused.weight_scales, fused.weight_global,
                                  fused.weight_format, fused.weight_in_features).double()
            for name in members:
                sl = getattr(getattr(layer, part), name)
                assert isinstance(sl, FusedSlice)
                getattr(getattr(ref.model.layers[i], part), name).weight.data = w[sl.start:sl.stop].clone()
        for part, name in (("self_attn", "o_proj"), ("mlp", "down_proj")):
            ql = getattr(getattr(layer, part), name)
            w = dequantize_weight(ql.weight_packed, ql.weight_scales, ql.weight_global, ql.weight_format,
                                  ql.weight_in_features).double()
            getattr(getattr(ref.model.layers[i], part), name).weight.data = w
    return ref


@pytest.fixture(scope="module")
def fused_w4a4():
    """(float model, its w4a4 compile with fuse, calibration ids): a two-layer tiny Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    return model, lowbit.compile_quantized(model, _fuse_recipe("w4a4"), calibration=ids, progress=False), ids


# -- float: fusion is an identity ---------------------------------------------------------

def test_fused_float_graph_and_module_tree_match_float64(tiny_llama, calib_ids):
    ref = copy.deepcopy(tiny_llama).double()
    with torch.no_grad():
        want = ref(calib_ids, use_cache=False).logits
    work = copy.deepcopy(tiny_llama).double()
    cap = lowbit.capture(work, (calib_ids,))
    p = FusePass(CompileContext(progress=False))
    gm = p(cap.graph_module).graph_module
    assert len(p.details["groups"]) == 4 and p.details["fused_sites"] == 10
    with torch.no_grad():
        assert _rel(gm(calib_ids).logits, want) < 1e-12
    lowbit.materialize(work, gm)
    assert isinstance(work.model.layers[1].self_attn.k_proj, FusedSlice)
    with torch.no_grad():
        assert _rel(work(calib_ids, use_cache=False).logits, want) < 1e-12


class _ThreeHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Module()
        self.inner.a, self.inner.b = nn.Linear(32, 16), nn.Linear(32, 48, bias=False)
        self.inner.c = nn.Linear(32, 16)

    def forward(self, x):
        return self.inner.a(x) * self.inner.b(x)[..., :16] + torch.relu(self.inner.c(x))


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_plain_module_graph(method):
    """Any model: the rewritten GraphModule is the result; biases (one member without) are joined."""
    torch.manual_seed(0)
    m = _ThreeHeads().eval()
    x = torch.randn(4, 32)
    gm = FusePass(CompileContext())(lowbit.capture(copy.deepcopy(m), (x,), method=method).graph_module).graph_module
    assert list(lowbit.find_linear_sites(gm)) == ["inner.fused_a_b_c"]
    with torch.no_grad():
        assert _rel(gm(x), copy.deepcopy(m).double()(x.double())) < 1e-6
    q = lowbit.compile_quantized(m, _fuse_recipe("w8a8"), example_inputs=(x,), progress=False)
    assert [n.target for n in q.graph.nodes if n.op == "call_module" and not n.target.startswith("_")] == \
        ["inner.fused_a_b_c"]
    with torch.no_grad():
        assert _rel(q(x), m(x)) < 0.05


def test_slice_called_alone_or_after_in_place_edit(fused_w4a4):
    q = copy.deepcopy(fused_w4a4[1])
    attn = q.model.layers[0].self_attn
    fused = attn.fused_q_proj_k_proj_v_proj
    x = torch.randn(3, 64)
    full = fused(x)
    assert torch.equal(attn.k_proj(x), full[..., 64:96])  # alone: computes
    assert torch.equal(attn.v_proj(x), full[..., 96:128])  # reuses (same tensor)
    x.mul_(2)  # in place: the stored output must not be reused
    assert torch.equal(attn.q_proj(x), fused(x)[..., :64])
    for m in q.modules():
        m.__dict__.pop("_lowbit_fused_cache", None)
    bare = FusedSlice("fused_q_proj_k_proj_v_proj", 0, 64, 0, 3)
    with pytest.raises(RuntimeError, match="not attached"):
        bare(x)


# -- quantized: numerics, counts ---------------------------------------------------------

@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_fused_quantized_matches_float64_on_dequantized_weights(tiny_llama, calib_ids, method):
    recipe = _fuse_recipe("w4a16")
    if method == "gptq":
        recipe = recipe.with_gptq()
    q = lowbit.compile_quantized(tiny_llama, recipe, calibration=calib_ids, progress=False)
    rep = q.lowbit_report
    fused_site = rep.sites["model.layers.0.self_attn.fused_q_proj_k_proj_v_proj"]
    assert fused_site["method"].startswith("gptq" if method == "gptq" else "rtn")
    assert fused_site["shape"][0] == 128 and rep.sites["model.layers.0.self_attn.q_proj"]["fused_into"]
    ref = _dequantized_float64(q, tiny_llama)
    with torch.no_grad():
        assert _rel(q(calib_ids, use_cache=False).logits, ref(calib_ids, use_cache=False).logits) < 1e-5


def test_one_gemm_and_one_activation_quantization_per_group(fused_w4a4, monkeypatch):
    tiny_llama, fused, calib_ids = fused_w4a4
    plain = lowbit.compile_quantized(tiny_llama, "w4a4", calibration=calib_ids, progress=False)
    x = torch.randn(2, 7, 64)
    counts = {}
    for label, m in (("plain", plain), ("fused", fused)):
        c = _Count(monkeypatch, "qlinear", "quantize_act")
        with torch.no_grad():
            attn_out = m.model.layers[0].self_attn.q_proj(x), m.model.layers[0].self_attn.k_proj(x), \
                m.model.layers[0].self_attn.v_proj(x)
            m.model.layers[0].mlp(x)
        counts[label] = dict(c.n)
        monkeypatch.undo()
    assert counts["plain"] == {"qlinear": 6, "quantize_act": 6}  # q, k, v, gate, up, down
    assert counts["fused"] == {"qlinear": 3, "quantize_act": 3}  # qkv, gate+up, down
    # per member, the fused site's output is the float64 product of its act-quantized input
    # and its rows of the dequantized fused weight
    site = fused.model.layers[0].self_attn.fused_q_proj_k_proj_v_proj
    w = dequantize_weight(site.weight_packed, site.weight_scales, site.weight_global, site.weight_format,
                          site.weight_in_features).double()
    xa = fake_quantize_act(x, site.act_format).double()
    for name, y in zip(MEMBERS["self_attn"], attn_out):
        sl = getattr(fused.model.layers[0].self_attn, name)
        assert _rel(y, xa @ w[sl.start:sl.stop].T) < 1e-6
    # whole model: 14 sites -> 8 calls
    c = _Count(monkeypatch, "qlinear", "quantize_act")
    with torch.no_grad():
        fused(calib_ids, use_cache=False)
    assert c.n == {"qlinear": 8, "quantize_act": 8}


def test_generate_torch_compile_and_artifacts(fused_w4a4, tmp_path):
    _, q, calib_ids = fused_w4a4
    q = copy.deepcopy(q)
    prompt = calib_ids[:1, :6]
    with torch.no_grad():
        gen = q.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq = prompt
        for _ in range(6):  # greedy without a KV cache, from the model's own forward
            seq = torch.cat([seq, q(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, seq)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(q, backend=backend)
    with torch.no_grad():
        want = q(calib_ids, use_cache=False).logits
        got = compiled(calib_ids, use_cache=False).logits
    assert _rel(got, want) < 1e-6
    n = sum(1 for g in graphs for node in g.graph.nodes if "qlinear" in str(node.target))
    assert n == 8  # one per group under dynamo too (4 groups + 2 o_proj + 2 down_proj)
    assert all(m.__dict__.get("_lowbit_fused_cache") is None for m in q.modules())

    lowbit.save(q, tmp_path / "ckpt")
    loaded = lowbit.load(tmp_path / "ckpt")
    assert isinstance(loaded.model.layers[0].mlp.up_proj, FusedSlice)
    assert link_fused_sites(loaded) == 10
    with torch.no_grad():
        assert torch.equal(loaded(calib_ids, use_cache=False).logits, want)


# -- interplay with other passes ---------------------------------------------------------

def test_rotation_prologues_are_fused_when_equal(tiny_llama, calib_ids, monkeypatch):
    """Online Hadamard on q/k/v (equal prologues) is fused into one rotation; down_proj keeps its own."""
    recipe = lowbit.get_recipe("w4a4").with_passes(
        {"name": "rotate", "online": ["*q_proj", "*k_proj", "*v_proj", "*down_proj"]}, {"name": "fuse"})
    q = lowbit.compile_quantized(tiny_llama, recipe, calibration=calib_ids, progress=False)
    fused = q.model.layers[0].self_attn.fused_q_proj_k_proj_v_proj
    assert [p.kind for p in fused.prologue] == ["hadamard"]
    assert [p.kind for p in q.model.layers[0].mlp.down_proj.prologue] == ["hadamard"]
    c = _Count(monkeypatch, "qlinear", "hadamard")
    with torch.no_grad():
        q(calib_ids, use_cache=False)
    assert c.n == {"qlinear": 8, "hadamard": 4}  # per block: qkv and down_proj

    # float: rotation then fusion still computes the original function
    work = copy.deepcopy(tiny_llama)
    ctx = CompileContext(calibration=[(calib_ids,)], progress=False)
    from lowbit.passes.rotate import RotatePass

    gm = lowbit.capture(work, (calib_ids,)).graph_module
    gm = RotatePass(ctx, online=["*q_proj", "*k_proj", "*v_proj", "*down_proj"])(gm).graph_module
    gm = FusePass(ctx)(gm).graph_module
    with torch.no_grad():
        assert _rel(gm(calib_ids).logits, tiny_llama(calib_ids, use_cache=False).logits) < 1e-4


def test_different_prologues_are_not_fused_and_order_is_checked(tiny_llama, calib_ids):
    from lowbit.passes.split_outliers import SplitOutliersPass

    ctx = CompileContext(recipe=lowbit.get_recipe("w4a16"), progress=False)
    gm = lowbit.capture(copy.deepcopy(tiny_llama), (calib_ids,)).graph_module
    gm = SplitOutliersPass(ctx, sites=["*k_proj"])(gm).graph_module
    p = FusePass(ctx)
    gm = p(gm).graph_module
    assert list(p.details["groups"]) == [f"model.layers.{i}.{n}" for i in (0, 1) for n in
                                         ("self_attn.fused_q_proj_v_proj", "mlp.fused_gate_proj_up_proj")]
    with torch.no_grad():
        assert _rel(gm(calib_ids).logits, tiny_llama(calib_ids, use_cache=False).logits) < 1e-5
    late = CompileContext(recipe=lowbit.get_recipe("w4a16").with_passes({"name": "fuse"}, {"name": "rotate"}))
    with pytest.raises(ValueError, match="after"):
        FusePass(late)


# -- a real model ------------------------------------------------------------------------

def _stories():
    from lowbit.llama2c import shared_data_dir

    try:
        d = shared_data_dir()
    except Exception:  # noqa: BLE001
        d = None
    if d is None or not (d / "stories260K" / "stories260K.bin").is_file():
        pytest.skip("stories260K not in the shared data folder (../shared/data)")
    from lowbit.models import load_model

    return load_model("stories260k")[0]


def test_stories260k_fused_float_and_quantized(monkeypatch):
    model = _stories()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    ref64 = copy.deepcopy(model).double()
    with torch.no_grad():
        want = ref64(ids, use_cache=False).logits
    work = copy.deepcopy(model)
    gm = FusePass(CompileContext())(lowbit.capture(work, (ids,)).graph_module).graph_module
    lowbit.materialize(work, gm)
    with torch.no_grad():
        assert _rel(work(ids, use_cache=False).logits, want) < 1e-6
    q = lowbit.compile_quantized(model, _fuse_recipe("w4a16"), calibration=ids, progress=False)
    ref = _dequantized_float64(q, model)
    with torch.no_grad():
        assert _rel(q(ids, use_cache=False).logits, ref(ids, use_cache=False).logits) < 1e-5
    c = _Count(monkeypatch, "qlinear")
    with torch.no_grad():
        q(ids, use_cache=False)
    assert c.n["qlinear"] == 4 * model.config.num_hidden_layers
