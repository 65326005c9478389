"""Tests for lowbit.capture: graph capture and linear-site discovery (CPU, tiny models)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.capture import CaptureError, CapturedGraph, LinearSite, capture, find_linear_sites

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 96


def _tiny(name):
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64)
    llama_like = dict(
        common, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    if name == "llama":
        cfg = transformers.LlamaConfig(**llama_like, tie_word_embeddings=True)
        cls = transformers.LlamaForCausalLM
    elif name == "qwen2":
        cfg = transformers.Qwen2Config(**llama_like, tie_word_embeddings=False)
        cls = transformers.Qwen2ForCausalLM
    elif name == "mistral":
        cfg = transformers.MistralConfig(**llama_like, sliding_window=16)
        cls = transformers.MistralForCausalLM
    elif name == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=0,
        )
        cls = transformers.GPT2LMHeadModel
    else:
        raise ValueError(name)
    torch.manual_seed(0)
    return cls(cfg).eval()


def _expected_linear_names(model, classes=(nn.Linear,)):
    return [n for n, m in model.named_modules() if isinstance(m, classes)]


def _check_sites_against_modules(model, cg: CapturedGraph, expected):
    assert set(cg.sites) == set(expected)
    order = {n.name: i for i, n in enumerate(cg.graph_module.graph.nodes)}
    positions = [order[s.node] for s in cg.sites.values()]
    assert positions == sorted(positions), "sites are not in graph order"
    for key, site in cg.sites.items():
        assert isinstance(site, LinearSite)
        assert site.name == key
        mod = model.get_submodule(site.name)
        w = cg.graph_module.get_parameter(site.weight)
        assert w is mod.weight  # shared with the model, tied or not
        if site.transposed:
            assert (site.in_features, site.out_features) == tuple(mod.weight.shape)
        else:
            assert (site.out_features, site.in_features) == tuple(mod.weight.shape)
        if getattr(mod, "bias", None) is None:
            assert site.bias is None
        else:
            assert cg.graph_module.get_parameter(site.bias) is mod.bias


HF_MODELS = ["llama", "qwen2", "mistral", "gpt2"]


@pytest.fixture(scope="module", params=HF_MODELS)
def hf_captured(request):
    model = _tiny(request.param)
    ids = torch.randint(0, VOCAB, (2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cg = capture(model, (ids,))
    return request.param, model, cg, caught


def test_hf_capture_uses_export(hf_captured):
    _, _, cg, _ = hf_captured
    assert cg.method == "export"
    assert cg.exported_program is not None
    assert cg.example_kwargs == {"use_cache": False}


def test_hf_sites_named_by_module(hf_captured):
    name, model, cg, caught = hf_captured
    expected = _expected_linear_names(model)
    if name == "gpt2":
        # GPT-2's blocks use transformers Conv1D, not nn.Linear: only the head is a site,
        # and capture says so.
        assert expected == ["lm_head"]
        assert any("Conv1D" in str(w.message) for w in caught)
    else:
        assert len(expected) == 2 * 7 + 1
    _check_sites_against_modules(model, cg, expected)
    for site in cg.sites.values():
        node = next(n for n in cg.graph_module.graph.nodes if n.name == site.node)
        assert node.target is torch.ops.aten.linear.default


def test_hf_output_matches_on_other_shapes(hf_captured):
    _, model, cg, _ = hf_captured
    # other batch sizes and lengths, including longer than Mistral's sliding window (16)
    for shape in [(3, 13), (1, 5), (2, 40)]:
        x = torch.randint(0, VOCAB, shape)
        out = cg.graph_module(x)  # positional input_ids, no kwargs needed
        with torch.no_grad():
            ref = model(x, use_cache=False)
        assert type(out) is type(ref)
        assert out.logits.shape == (*shape, VOCAB)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_tied_lm_head_named_lm_head():
    model = _tiny("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cg = capture(model, (torch.randint(0, VOCAB, (2, 6)),))
    site = cg.sites["lm_head"]
    assert list(cg.sites)[-1] == "lm_head"
    assert cg.graph_module.get_parameter(site.weight) is model.model.embed_tokens.weight
    assert "model.embed_tokens" not in cg.sites


def test_qwen2_biases():
    model = _tiny("qwen2")
    cg = capture(model, (torch.randint(0, VOCAB, (2, 6)),))
    assert cg.sites["model.layers.0.self_attn.q_proj"].bias == "model.layers.0.self_attn.q_proj.bias"
    assert cg.sites["model.layers.0.self_attn.o_proj"].bias is None


def test_gpt2_conv1d_sites_opt_in():
    model = _tiny("gpt2")
    cg = capture(model, (torch.randint(0, VOCAB, (2, 6)),), include_conv1d=True)
    expected = _expected_linear_names(model, (nn.Linear, Conv1D))
    assert len(expected) == 2 * 4 + 1
    _check_sites_against_modules(model, cg, expected)
    site = cg.sites["transformer.h.1.mlp.c_fc"]
    assert site.transposed and (site.in_features, site.out_features) == (64, 256)
    assert not cg.sites["lm_head"].transposed
    node = next(n for n in cg.graph_module.graph.nodes if n.name == site.node)
    assert node.target is torch.ops.aten.addmm.default


def test_hf_batch_one_example_and_kwargs_input():
    model = _tiny("llama")
    ids = torch.randint(0, VOCAB, (1, 7))
    mask = torch.ones(1, 7, dtype=torch.long)
    cg = capture(model, example_kwargs={"input_ids": ids, "attention_mask": mask})
    assert cg.example_args[0] is ids  # moved to a positional argument
    for shape in [(1, 4), (3, 9)]:
        x = torch.randint(0, VOCAB, shape)
        m = torch.ones(shape, dtype=torch.long)
        out = cg.graph_module(x, attention_mask=m)
        with torch.no_grad():
            ref = model(x, attention_mask=m, use_cache=False)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_hf_default_example_and_training_mode_restored():
    model = _tiny("llama").train()
    model.model.layers[0].eval()
    cg = capture(model)
    assert cg.example_args[0].shape == (2, 8)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert "dropout" not in cg.graph_module.code
    assert "forward" not in model.__dict__  # the baked forward is removed again


# ---------------------------------------------------------------------- plain modules


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.w = nn.Parameter(torch.randn(d, 2 * d) / d)  # used through F.linear

    def forward(self, x):
        return F.linear(torch.relu(self.up(x)), self.w)


class MLP(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.shared = nn.Linear(d, d, bias=False)  # called twice
        self.head = nn.Linear(d, 4)

    def forward(self, x, scale: float = 1.0):
        for b in self.blocks:
            x = x + b(x)
        x = self.shared(self.shared(x))
        return self.head(x) * scale


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_plain_mlp(method):
    torch.manual_seed(0)
    model = MLP()
    cg = capture(model, (torch.randn(2, 5, 16),), {"scale": 2.0}, method=method)
    assert cg.method == method
    expected = _expected_linear_names(model)  # blocks.0.up, blocks.1.up, shared, head
    functional = [n for n, p in model.named_parameters() if n.endswith(".w")]
    assert set(cg.sites) == set(expected) | {n[:-2] + ".w" for n in functional} | {"shared@1"}
    assert list(cg.sites) == [
        "blocks.0.up", "blocks.0.w", "blocks.1.up", "blocks.1.w", "shared", "shared@1", "head"
    ]
    assert cg.sites["shared@1"].name == "shared"
    assert cg.sites["blocks.1.w"].weight == "blocks.1.w"
    assert (cg.sites["blocks.1.w"].in_features, cg.sites["blocks.1.w"].out_features) == (32, 16)
    assert cg.sites["head"].bias == "head.bias"
    kinds = {n.op for n in cg.graph_module.graph.nodes if n.name in {s.node for s in cg.sites.values()}}
    assert kinds == ({"call_function"} if method == "export" else {"call_module", "call_function"})
    for shape in [(3, 9, 16), (2, 5, 16)]:
        x = torch.randn(shape)
        torch.testing.assert_close(cg.graph_module(x), model(x, scale=2.0))


def test_find_linear_sites_without_root():
    model = MLP()
    cg = capture(model, (torch.randn(2, 5, 16),), method="export")
    assert find_linear_sites(cg.graph_module) == cg.sites
    gm = torch.fx.symbolic_trace(model)
    assert list(find_linear_sites(gm)) == list(cg.sites)


class ComputedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(F.linear(x, self.w * 2.0))


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_computed_weights_skipped(method):
    cg = capture(ComputedWeight(), (torch.randn(3, 8),), method=method)
    assert list(cg.sites) == ["fc"]


# ---------------------------------------------------------------------- failures


class Gate(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return self.fc(x)
        return -x


class Branchy(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(d, d)), nn.ModuleDict({"gate": Gate(d)})])

    def forward(self, x):
        x = self.inp(x)
        x = self.blocks[0](x)
        return self.blocks[1]["gate"](x)


def test_capture_error_names_submodule():
    model = Branchy()
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(2, 8),))
    err = info.value
    msg = str(err)
    assert "blocks.1.gate" in msg and "Gate" in msg
    assert "traceable" in msg and "example inputs" in msg and "without capture" in msg
    assert err.module_name == "blocks.1.gate"
    assert set(err.errors) == {"export", "symbolic_trace"}
    assert err.__cause__ is err.errors["export"]


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_capture_error_single_method(method):
    with pytest.raises(CaptureError, match=r"blocks\.1\.gate") as info:
        capture(Branchy(), (torch.randn(2, 8),), method=method)
    assert list(info.value.errors) == [method]
    assert info.value.__cause__ is not None


def test_bad_method():
    with pytest.raises(ValueError):
        capture(MLP(), (torch.randn(2, 16),), method="jit")
