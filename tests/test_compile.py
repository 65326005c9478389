"""compile_quantized end to end on the reference backend."""
import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantLinear, compile_quantized
from lowbit.formats import QFormat
from lowbit.passes.quantize import QuantizePass


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_hf_llama_sites_replaced_and_report(tiny_llama, calib_ids):
    q = compile_quantized(tiny_llama, "w4a16", calibration=calib_ids, progress=False)
    linear_names = {n for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)}
    quant_names = {n for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert quant_names == linear_names - {"lm_head"}
    assert isinstance(q.lm_head, nn.Linear)
    # the original is untouched
    assert all(isinstance(m, nn.Linear) for n, m in tiny_llama.named_modules() if n in linear_names)
    rep = q.lowbit_report
    assert set(rep.sites) == quant_names
    for s in rep.sites.values():
        k = s["shape"][1]
        assert s["bits_per_weight"] == pytest.approx(4 + 8 / 16 + 32 / (s["shape"][0] * k))
        assert 0 < s["rel_error"] < 0.2
    assert [p.name for p in rep.passes] == ["quantize"]
    assert "quantize" in rep.summary_table()


def test_quantized_logits_equal_float_model_with_dequantized_weights(tiny_llama, calib_ids):
    q = compile_quantized(tiny_llama, "w2a16", calibration=calib_ids, progress=False)
    ref = copy.deepcopy(tiny_llama)
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear):
            ref.get_submodule(name).weight.data = m.dequantized_weight()
    ids = torch.randint(0, 256, (1, 11))
    assert torch.allclose(_logits(q, ids), _logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_error_grows_as_bits_shrink(tiny_llama, calib_ids):
    ids = torch.randint(0, 256, (2, 16))
    ref = _logits(tiny_llama, ids)
    errs = {}
    for name in ["w8a8", "w4a16", "w4a4", "w2a16", "w2a2"]:
        q = compile_quantized(tiny_llama, name, calibration=calib_ids, progress=False)
        errs[name] = ((_logits(q, ids) - ref).norm() / ref.norm()).item()
    assert errs["w8a8"] < errs["w4a16"] < errs["w2a16"]
    assert errs["w4a16"] < errs["w4a4"]
    assert errs["w2a16"] < errs["w2a2"]
    assert errs["w8a8"] < 0.02


def test_generate_with_kv_cache(tiny_llama, calib_ids):
    q = compile_quantized(tiny_llama, "w4a4", calibration=calib_ids, progress=False)
    prompt = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        cached = q.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = q.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, 12)
    assert torch.equal(cached, uncached)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_plain_module_returns_graph_module():
    torch.manual_seed(0)
    m = MLP()
    x = torch.randn(8, 32)
    q = compile_quantized(m, "w8a8", calibration=[(x,)], progress=False, example_inputs=(x,))
    assert isinstance(q, torch.fx.GraphModule)
    assert isinstance(q.get_submodule("fc1"), QuantLinear)
    y, yq = m(x), q(x)
    assert ((yq - y).norm() / y.norm()) < 0.02


def test_quantize_pass_alone_on_user_fx_graph():
    torch.manual_seed(0)
    m = MLP()
    gm = torch.fx.symbolic_trace(m)
    ctx = lowbit.CompileContext(calibration=[(torch.randn(4, 32),)], progress=False)
    result = QuantizePass(QFormat(4), None, ignore=["fc2"], context=ctx)(gm)
    assert result.modified
    assert isinstance(result.graph_module.fc1, QuantLinear)
    assert isinstance(result.graph_module.fc2, nn.Linear)
    assert "fc1" in ctx.report.sites and "rel_error" in ctx.report.sites["fc1"]


def test_bad_backend(tiny_llama):
    with pytest.raises(ValueError, match="backend"):
        compile_quantized(tiny_llama, "w4a16", backend="tpu")


def test_quantizing_a_tied_classifier_keeps_the_embedding_float():
    """Only the classifier (tied to the embedding) is quantized: the embedding keeps the float
    table, and the logits are the float body's hidden states times the dequantized weight."""
    import dataclasses

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    recipe = dataclasses.replace(lowbit.get_recipe("w4a16"), ignore=["model.*"])
    q = lowbit.compile_quantized(model, recipe, calibration=ids, progress=False)
    assert isinstance(q.lm_head, lowbit.QuantLinear)
    assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state.double()
        expected = hidden @ q.lm_head.dequantized_weight().double().T
        got = q(ids).logits.double()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_override_quantizes_the_classifier_in_its_own_format(method):
    """w2a16 with ``with_override("lm_head", "w4a16")``: the body at 2 bits, the tied classifier
    at 4 bits (GPTQ in that format too), the embedding float; logits are the quantized
    body's hidden states times the classifier's dequantized 4-bit weight (float64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    recipe = lowbit.get_recipe("w2a16").with_override("lm_head", "w4a16")
    if method == "gptq":
        recipe = recipe.with_gptq()
    q = lowbit.compile_quantized(model, recipe, calibration=ids, progress=False)
    assert q.lm_head.weight_format.bits == 4 and q.model.layers[0].mlp.up_proj.weight_format.bits == 2
    assert q.lowbit_report.sites["lm_head"]["method"].startswith(method)
    assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with torch.no_grad():
        hidden = q.model(ids[:1]).last_hidden_state.double()
        expected = hidden @ q.lm_head.dequantized_weight().double().T
        got = q(ids[:1]).logits.double()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    w = model.lm_head.weight.detach().double()
    err4 = ((q.lm_head.dequantized_weight().double() - w).norm() / w.norm()).item()
    assert err4 < 0.15  # a 4-bit classifier (about 0.08 here), not a 2-bit one (about 0.36)


def test_activation_clip_search_takes_the_ratio_closest_to_the_float_site():
    """``act_clip_search``: each site takes the candidate clip ratio whose output is closest to
    the float site's on the calibration inputs. Checked against float64 products of the
    site's dequantized weight with the reference op's fake-quantized activations, for every
    candidate; on heavy-tailed inputs the chosen ratio beats no clipping."""
    from lowbit.ops import fake_quantize_act

    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(64, 32, bias=False))
    x = torch.distributions.StudentT(2.0).sample((64, 64))  # heavy tails: clipping pays
    candidates = [0.3, 0.5, 0.7, 1.0]
    act = QFormat(2, "half", 16, "e4m3")
    gm = torch.fx.symbolic_trace(m)
    ctx = lowbit.CompileContext(calibration=[(x,)], progress=False)
    QuantizePass(QFormat(2, "half", 16, "e4m3"), act, act_clip_search=candidates, context=ctx)(gm)
    site = gm.get_submodule("0")
    w = site.dequantized_weight().double()
    ref = x.double() @ m[0].weight.detach().double().T
    errors = {c: float((fake_quantize_act(x, replace(act, clip=c)).double() @ w.T - ref).norm() / ref.norm())
              for c in candidates}
    best = min(errors, key=errors.get)
    assert site.act_format == replace(act, clip=best) and ctx.report.sites["0"]["act_clip"] == best
    assert ctx.report.sites["0"]["format"].endswith(replace(act, clip=best).name)  # the chosen ratio, not the preset's
    assert errors[best] < errors[1.0]
    assert ctx.report.sites["0"]["rel_error"] == pytest.approx(errors[best], rel=1e-4)


def test_activation_clip_search_scores_evenly_spaced_tokens(monkeypatch):
    """With more calibration tokens than ``ACT_CLIP_SEARCH_ROWS`` the candidates are scored on
    that many evenly spaced tokens (here 16 of 3 x 40): the choice is the float64 argmin on
    those rows, which differs from the one on all rows for this input."""
    import lowbit.passes.quantize as quantize_pass
    from lowbit.ops import fake_quantize_act

    monkeypatch.setattr(quantize_pass, "ACT_CLIP_SEARCH_ROWS", 16)
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(32, 16, bias=False))
    x = torch.distributions.StudentT(2.0).sample((3, 40, 32))
    candidates = [0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0]
    act = QFormat(2, "half", 16, "e4m3")
    gm = torch.fx.symbolic_trace(m)
    ctx = lowbit.CompileContext(calibration=[(x,)], progress=False)
    QuantizePass(QFormat(2, "half", 16, "e4m3"), act, act_clip_search=candidates, context=ctx)(gm)
    w = gm.get_submodule("0").dequantized_weight().double()
    rows = x.reshape(-1, 32)

    def argmin(r):
        ref = r.double() @ m[0].weight.detach().double().T
        err = {c: float((fake_quantize_act(r, replace(act, clip=c)).double() @ w.T - ref).norm() / ref.norm())
               for c in candidates}
        return min(err, key=err.get)

    picked = rows[[round(i * 119 / 15) for i in range(16)]]
    assert ctx.report.sites["0"]["act_clip"] == argmin(picked) != argmin(rows)


def test_measure_errors_off_changes_the_report_only(tiny_llama, calib_ids, monkeypatch):
    """``measure_errors=False``: the same model (codes, scales, searched activation clip
    ratios); the report's per-site errors only where the inputs were needed anyway. The
    calibration still runs where a choice needs it (the clip search); under plain RTN the
    quantize pass does not run it at all."""
    from lowbit.pass_manager import SequentialCalibration

    collected = []
    original = SequentialCalibration.collect
    monkeypatch.setattr(SequentialCalibration, "collect",
                        lambda self, nodes: collected.append(len(nodes)) or original(self, nodes))
    for recipe in ("w2a16", "w2a2-half"):
        collected.clear()
        measured = compile_quantized(tiny_llama, recipe, calibration=calib_ids, progress=False)
        assert collected
        collected.clear()
        quick = compile_quantized(tiny_llama, recipe, calibration=calib_ids, progress=False, measure_errors=False)
        searched = bool(lowbit.get_recipe(recipe).act_clip_search)
        assert bool(collected) == searched
        assert all("rel_error" in s for s in measured.lowbit_report.sites.values())
        # where the search brought the inputs in anyway, the error comes with them
        assert all(("rel_error" in s) == searched for s in quick.lowbit_report.sites.values())
        state, quick_state = measured.state_dict(), quick.state_dict()
        assert state.keys() == quick_state.keys() and all(torch.equal(state[k], quick_state[k]) for k in state)
        formats = {n: m.act_format for n, m in measured.named_modules() if isinstance(m, QuantLinear)}
        assert formats == {n: m.act_format for n, m in quick.named_modules() if isinstance(m, QuantLinear)}
        if recipe == "w2a2-half":
            assert len({f.clip for f in formats.values()}) > 1  # searched per site
        assert torch.equal(_logits(measured, calib_ids), _logits(quick, calib_ids))


def test_activation_clip_search_in_recipes():
    r = lowbit.get_recipe("w2a2-half")
    searched = lowbit.Recipe.from_dict(dict(r.to_dict(), act_clip_search=[0.5, 0.6]))
    assert searched.act_clip_search == [0.5, 0.6]
    assert lowbit.Recipe.from_json(searched.to_json()).act_clip_search == [0.5, 0.6]
    with pytest.raises(ValueError, match="act_clip_search"):
        lowbit.Recipe.from_dict(dict(r.to_dict(), act_clip_search=[1.5]))
    with pytest.raises(ValueError, match="act_clip_search"):
        lowbit.Recipe.from_dict(dict(lowbit.get_recipe("w2a16").to_dict(), act_clip_search=[0.5]))
