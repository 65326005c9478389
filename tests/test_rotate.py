"""Norm folding and rotations preserve the float function; unsupported structures are refused."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.hadamard import hadamard_matrix
from lowbit.passes.fold_norms import FoldNormsPass
from lowbit.passes.rotate import RotatePass
from lowbit.passes.structure import StructureError
from lowbit.prologue import HadamardPrologue


def _randomize_norms(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def _config(kind, tie):
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tie)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=64))
    raise ValueError(kind)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _rotate_and_check(model, ids, fresh, **opts):
    ref = model(fresh, use_cache=False).logits
    work = copy.deepcopy(model)
    cap = lowbit.capture(work, (ids,))
    rot = RotatePass(**opts)
    gm = rot(cap.graph_module).graph_module
    assert _rel(gm(fresh).logits, ref) < 1e-4
    lowbit.materialize(work, gm)
    with torch.no_grad():
        out = work(fresh, use_cache=False).logits
    assert _rel(out, ref) < 1e-4
    return work, rot


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tie", [False, True])
def test_rotation_preserves_function(kind, tie):
    torch.manual_seed(0)
    model = _randomize_norms(_config(kind, tie).eval())
    ids = torch.randint(0, 256, (1, 12))
    fresh = torch.randint(0, 256, (2, 19))
    work, rot = _rotate_and_check(model, ids, fresh)
    assert rot.details["r1_writers"] == 4 and rot.details["r2_pairs"] == 2 and rot.details["online_sites"] == 2
    # the rotation really happened: weights differ, the online sites carry a Hadamard prologue
    assert not torch.allclose(work.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    assert isinstance(work.model.layers[1].mlp.down_proj.prologue[0], HadamardPrologue)
    # norms folded
    assert torch.all(work.model.layers[0].input_layernorm.weight == 1)
    if tie:  # the classifier had to come apart from the embedding
        assert work.lm_head.weight is not work.model.embed_tokens.weight
        assert work.config.tie_word_embeddings is False
    if kind == "qwen2":
        assert work.model.layers[0].self_attn.v_proj.bias is not None


def test_fold_norms_alone():
    torch.manual_seed(1)
    model = _randomize_norms(_config("llama", True).eval())
    ids = torch.randint(0, 256, (1, 10))
    ref = model(ids, use_cache=False).logits
    cap = lowbit.capture(copy.deepcopy(model), (ids,))
    p = FoldNormsPass()
    gm = p(cap.graph_module).graph_module
    assert p.details["folded"] == 5 and p.details["readers"] == 11
    assert torch.all(gm.model.norm.weight == 1)
    assert _rel(gm(ids).logits, ref) < 1e-5


def test_online_hadamard_weight_is_the_inverse():
    """W' = W H^T / sqrt(n) with H from the explicit construction (float64)."""
    torch.manual_seed(2)
    model = _config("llama", False).eval()
    ids = torch.randint(0, 256, (1, 8))
    w = model.model.layers[0].mlp.down_proj.weight.detach().double()
    cap = lowbit.capture(copy.deepcopy(model), (ids,))
    gm = RotatePass(r1=False, r2=False)(cap.graph_module).graph_module
    site = gm.get_submodule("model.layers.0.mlp.down_proj")
    h = hadamard_matrix(192)
    assert torch.allclose(site.weight.double(), (w @ h.T / 192 ** 0.5), atol=1e-6)


def test_gpt2_layernorm_is_refused_with_a_clear_message():
    import transformers as tf

    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=64)).eval()
    cap = lowbit.capture(model, (torch.randint(0, 128, (1, 8)),))
    with pytest.raises(StructureError, match="LayerNorm|residual"):
        RotatePass()(cap.graph_module)


def test_unsupported_online_size_error_mode():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    model = tf.LlamaForCausalLM(cfg).eval()
    cap = lowbit.capture(model, (torch.randint(0, 128, (1, 8)),))
    with pytest.raises(StructureError, match="172"):
        RotatePass(online_unsupported="error")(cap.graph_module)


def test_compile_with_rotation_quantizes_and_roundtrips(tmp_path):
    torch.manual_seed(3)
    model = _randomize_norms(_config("llama", True).eval())
    calib = torch.randint(0, 256, (2, 16))
    q = lowbit.compile_quantized(model, lowbit.get_recipe("w4a4").with_passes({"name": "rotate"}),
                                 calibration=calib, progress=False)
    down = q.model.layers[0].mlp.down_proj
    assert isinstance(down, lowbit.QuantLinear) and isinstance(down.prologue[0], HadamardPrologue)
    assert [p.name for p in q.lowbit_report.passes] == ["rotate", "quantize"]
    assert q.lowbit_report.passes[0].details["verify_rel_diff"] < 1e-4
    lowbit.save(q, tmp_path / "a")
    back = lowbit.load(tmp_path / "a")
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)


def test_example_script_runs():
    path = Path(__file__).parent.parent / "examples" / "rotate_own_graph.py"
    spec = importlib.util.spec_from_file_location("rotate_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main()  # asserts the rotated graph matches the model


def test_stories260k_rotation_preserves_function():
    from lowbit.llama2c import load_llama2c, shared_data_dir

    d = shared_data_dir()
    if d is None:
        pytest.skip("shared data folder (../shared/data) is absent")
    model = load_llama2c(d / "stories260K" / "stories260K.bin")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (1, 16), generator=g)
    fresh = torch.randint(0, 512, (2, 33), generator=g)
    _rotate_and_check(model, ids, fresh)


@pytest.mark.slow
def test_smollm2_rotation_preserves_function():
    from lowbit.models import load_model

    try:
        model, _ = load_model("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (1, 8), generator=g)
    fresh = torch.randint(0, 49152, (1, 24), generator=g)
    work, rot = _rotate_and_check(model, ids, fresh)
    assert rot.details["r1_hadamard"] and rot.details["online_sites"] == 30
