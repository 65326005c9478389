"""ONNX export: lowbit ops lowered by lowbit.codegen.onnx, run on onnxruntime, against
the reference PyTorch ops (the definition of the numerics)."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import lowbit  # noqa: E402
import tiny_exports  # noqa: E402
from lowbit.codegen.onnx import export_module, export_onnx  # noqa: E402
from lowbit.formats import QFormat  # noqa: E402
from lowbit.prologue import ChannelSplitPrologue, HadamardPrologue  # noqa: E402
from lowbit.quant_linear import QuantLinear  # noqa: E402


def _session(model) -> "ort.InferenceSession":
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _export_module(module, args, weight_kernel="nbits4", dynamic_shapes=None):
    from onnxscript import ir

    model = export_module(module.eval(), args, weight_kernel=weight_kernel, dynamic_shapes=dynamic_shapes)
    return ir.to_proto(model)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _fp8_values(raw: np.ndarray) -> torch.Tensor:
    """onnxruntime hands FLOAT8E4M3FN outputs back as raw uint8 bytes."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8)).view(torch.float8_e4m3fn).float()


# -- activation quantization: codes bit-exact ------------------------------------------

ACT_FORMATS = [QFormat(2), QFormat(4), QFormat(8, group_size=32), QFormat(4, "half", 16, "fp16"),
               QFormat(3, "int", 16, "fp32"), QFormat(1, "half", 16, "e4m3"),
               # clipped activation formats (the global scale times the clip ratio; the last an fp32
               # value, as a ratio learned in training is)
               QFormat(2, clip=0.7), QFormat(2, "half", clip=0.55),
               QFormat(4, "half", 16, "fp16", clip=float(torch.tensor(0.8123)))]


class _ActQuant(nn.Module):
    def forward(self, x):
        out = []
        for f in ACT_FORMATS:
            out += list(torch.ops.lowbit.quantize_act(x, f.bits, f.grid, f.group_size, f.scale_dtype, f.clip))
        return tuple(out)


@pytest.fixture(scope="module")
def act_session():
    dyn = ({0: torch.export.Dim("a", max=64), 1: torch.export.Dim("b", max=64)},)
    return _session(_export_module(_ActQuant(), (torch.randn(2, 3, 64),), dynamic_shapes=dyn))


def _fuzz_inputs(rng: np.random.Generator, n: int):
    for trial in range(n):
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 7)), 64)
        x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-30, 30)
        kind = trial % 6
        if kind == 1:  # whole groups of zeros (scale 0 -> codes 0)
            x[..., 16:48] = 0
        elif kind == 2:  # values on a coarse dyadic grid: many exact ties x / s = k + 1/2
            x = np.round(rng.standard_normal(shape) * 4) / 2
        elif kind == 3:  # one huge outlier per row next to tiny values (global scale, E4M3 subnormals)
            x[..., 5] *= 1e6
        elif kind == 4:  # all-negative and all-positive groups
            x[..., :16] = -np.abs(x[..., :16])
            x[..., 16:32] = np.abs(x[..., 16:32])
        elif kind == 5:  # whole rows of zeros
            x[0] = 0
        yield x.astype(np.float32)


def test_quantize_act_codes_bit_exact_on_onnxruntime(act_session):
    rng = np.random.default_rng(0)
    for x in _fuzz_inputs(rng, 36):
        outs = act_session.run(None, {act_session.get_inputs()[0].name: x})
        xt = torch.from_numpy(x)
        for i, f in enumerate(ACT_FORMATS):
            codes, scales, gscale = torch.ops.lowbit.quantize_act(xt, f.bits, f.grid, f.group_size, f.scale_dtype,
                                                                  f.clip)
            o_codes, o_scales, o_global = outs[3 * i: 3 * i + 3]
            assert o_codes.dtype == np.int8
            np.testing.assert_array_equal(o_codes, codes.numpy(), err_msg=f"codes {f.name}")
            got = _fp8_values(o_scales) if f.scale_dtype == "e4m3" else torch.from_numpy(o_scales).float()
            # equal values (a zero group scale is +0 here; the reference's sign of zero varies)
            assert torch.equal(got, scales.float()), f"scales {f.name}"
            np.testing.assert_array_equal(o_global, gscale.numpy(), err_msg=f"global {f.name}")


# -- qlinear, prologues -----------------------------------------------------------------

_SEED = iter(range(1000))


def _ql(n, k, wfmt, afmt=None, bias=True, prologue=None, k_in=None):
    g = torch.Generator().manual_seed(next(_SEED))
    w = torch.randn(n, k, generator=g) * torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_weight(w, b, wfmt, afmt, in_features=k_in, prologue=prologue)


class _Sites(nn.Module):
    """Sites of many formats; x [.., 64]."""

    def __init__(self):
        super().__init__()
        g = QFormat(2)
        split_index = torch.cat([torch.arange(40), torch.tensor([3, 17, 29, 31, 0, 39, 12, 8])])
        split_scale = torch.ones(48)
        split_scale[[3, 17]] = 0.5
        split_scale[[40, 41]] = 0.5
        self.sites = nn.ModuleList([
            _ql(48, 64, QFormat(2)),                                  # W2A16
            _ql(24, 40, QFormat(2), QFormat(2), bias=False),          # W2A2, K padded 40 -> 48
            _ql(32, 64, QFormat(4), QFormat(4)),                      # W4A4
            _ql(16, 64, QFormat(3)),                                  # W3 (4-bit containers)
            _ql(16, 64, QFormat(8, group_size=32), QFormat(8, group_size=32)),  # W8A8
            _ql(16, 64, QFormat(1, "half")),                          # 1-bit half grid: "dq"
            _ql(16, 64, QFormat(4, "int", 16, "fp16")),               # fp16 scales
            _ql(24, 48, g, g, prologue=[HadamardPrologue(48)]),       # H_12 x S_4 rotation
            _ql(24, 64, g, g, prologue=[HadamardPrologue(64)]),       # Sylvester rotation
            _ql(24, 48, g, g, prologue=[ChannelSplitPrologue(40, 48, split_index, split_scale)], k_in=40),
            _ql(24, 64, g, QFormat(2, "half", clip=0.6), prologue=[HadamardPrologue(64)]),  # clipped activations
        ])

    def forward(self, x):
        widths = [64, 40, 64, 64, 64, 64, 64, 48, 64, 40, 64]
        return tuple(s(x[..., :w]) for s, w in zip(self.sites, widths))


@pytest.mark.parametrize("kernel", ["nbits4", "nbits", "dq"])
def test_qlinear_and_prologues_match_reference(kernel):
    torch.manual_seed(0)
    module = _Sites().eval()
    model = _export_module(module, (torch.randn(2, 5, 64),), weight_kernel=kernel)
    ops = [n.op_type for n in model.graph.node]
    nbits_sites = 0 if kernel == "dq" else 10  # all but the half-grid site
    assert ops.count("MatMulNBits") == nbits_sites
    # packed weights stay packed: the lowbit buffers are initializers, untouched
    inits = {i.name: i for i in model.graph.initializer}
    packed = [i for name, i in inits.items() if name.endswith("weight_packed")]
    assert len(packed) == 11 and all(i.data_type == onnx.TensorProto.UINT8 for i in packed)
    assert all(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for n, i in inits.items()
               if n.endswith("weight_scales") and not n.startswith("sites.6."))
    sess = _session(model)
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = (rng.standard_normal((2, 5, 64)) * rng.uniform(0.1, 10, 64)).astype(np.float32)
        outs = sess.run(None, {sess.get_inputs()[0].name: x})
        with torch.no_grad():
            refs = module(torch.from_numpy(x))
        for i, (o, r) in enumerate(zip(outs, refs)):
            assert o.shape == tuple(r.shape)
            assert _rel(o, r.numpy()) < 2e-6, f"site {i}"


def test_hadamard_butterfly_is_bitwise_reference():
    class H(nn.Module):
        def forward(self, a, b):
            return torch.ops.lowbit.hadamard(a), torch.ops.lowbit.hadamard(b)

    a, b = torch.randn(3, 128), torch.randn(3, 2, 80)  # 128 = 2^7; 80 = 20 * 4
    sess = _session(_export_module(H(), (a, b)))
    ya, yb = sess.run(None, {"a": a.numpy(), "b": b.numpy()})
    np.testing.assert_array_equal(ya, torch.ops.lowbit.hadamard(a).numpy())
    assert _rel(yb, torch.ops.lowbit.hadamard(b).numpy()) < 1e-6


# -- whole models ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def w2a16():
    return tiny_exports.w2a16()


@pytest.fixture(scope="module")
def w2a2_rotated(tmp_path_factory):
    """W2A2 with rotations (online Hadamard before down_proj) and outlier channel splits,
    exported with external data (one layer: the W2A16 export covers several)."""
    recipe = lowbit.get_recipe("w2a2").with_passes({"name": "rotate"}, {"name": "split_outliers"})
    q = lowbit.compile_quantized(tiny_exports.tiny_llama(layers=1), recipe, calibration=tiny_exports.calibration(),
                                 progress=False)
    assert any(isinstance(m, QuantLinear) and len(m.prologue) == 2 for m in q.modules())
    return q, export_onnx(q, tmp_path_factory.mktemp("w2a2"), external_data=True)


@pytest.fixture(scope="module")
def w2a2_half(tmp_path_factory):
    """The w2a2-half preset with rotations: each site's activation clip ratio is searched on the
    calibration data, so the sites differ in their activation formats."""
    recipe = lowbit.get_recipe("w2a2-half").with_passes({"name": "rotate"})
    q = lowbit.compile_quantized(tiny_exports.tiny_llama(layers=1), recipe, calibration=tiny_exports.calibration(),
                                 progress=False)
    assert len({m.act_format for m in q.modules() if isinstance(m, QuantLinear)}) > 1
    return q, export_onnx(q, tmp_path_factory.mktemp("w2a2half"))


def _ort(directory):
    from lowbit.runtime import Session

    return Session(directory, threads=2)


def test_exported_file_is_valid_and_packed(w2a16):
    q, d = w2a16
    path = d / "model.onnx"
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    assert model.ir_version <= 13
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] <= 26 and opsets.get("com.microsoft") == 1
    quant = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == len(quant) == 14
    inits = {i.name.removeprefix("model."): i for i in model.graph.initializer}
    for name, m in quant.items():
        packed, scales = inits[name + ".weight_packed"], inits[name + ".weight_scales"]
        assert packed.data_type == onnx.TensorProto.UINT8 and list(packed.dims) == list(m.weight_packed.shape)
        assert scales.data_type == onnx.TensorProto.FLOAT8E4M3FN
        assert onnx.numpy_helper.to_array(packed).tobytes() == m.weight_packed.numpy().tobytes()
    # no float copy of any quantized weight: the initializers hold the float parameters
    # (embeddings, norms, head) plus the packed sites, and a few bytes of tables
    float_bytes = sum(p.numel() * 4 for p in q.parameters())
    packed_bytes = sum(b.numel() * b.element_size() for n, b in q.named_buffers()
                       if n.endswith(("weight_packed", "weight_scales", "weight_global")))
    init_bytes = sum(len(onnx.numpy_helper.to_array(i).tobytes()) for i in model.graph.initializer)
    assert init_bytes <= float_bytes + packed_bytes + 14 * 512 + 4096
    site_sizes = {m.out_features * k for m in quant.values() for k in (m.in_features, m.packed_in_features)}
    assert not [i.name for i in model.graph.initializer
                if i.data_type == onnx.TensorProto.FLOAT and math.prod(i.dims) in site_sizes]
    assert path.stat().st_size < float_bytes + packed_bytes + (64 << 10)
    # manifest: names as Optimum, checksums, recipe, config
    man = json.loads((d / "manifest.json").read_text())
    assert man["format"] == "lowbit-onnx" and man["recipe"]["name"] == "w2a16"
    assert man["onnx"]["inputs"][:5] == ["input_ids", "attention_mask", "position_ids",
                                         "past_key_values.0.key", "past_key_values.0.value"]
    assert man["onnx"]["outputs"][:3] == ["logits", "present.0.key", "present.0.value"]
    assert man["model"]["config"]["hidden_size"] == 64
    assert set(man["files"]) == {"model.onnx", "tokenizer.json"}
    assert man["session_options"]["session.qdq_matmulnbits_accuracy_level"] == "0"
    bpw = man["bits_per_weight"]["quantized_sites_bits_per_weight"]
    assert bpw == pytest.approx(np.mean([s["bits_per_weight"] for s in q.lowbit_report.sites.values()]), rel=0.05)


@pytest.mark.parametrize("which", ["w2a16", "w2a2_rotated", "w2a2_half"])
def test_logits_match_reference_prefill_and_decode(which, request):
    q, d = request.getfixturevalue(which)
    s = _ort(d)
    ids = torch.tensor([[1, 5, 9, 200, 17, 33, 4, 250, 2]])
    with torch.no_grad():
        ref = q(ids, use_cache=False).logits.numpy()
    logits, past = s.forward(ids[:, :5].numpy())
    assert _rel(logits, ref[:, :5]) < 1e-4
    for t in range(5, ids.shape[1]):  # decode steps with the KV cache
        logits, past = s.forward(ids[:, t:t + 1].numpy(), past)
        assert past[0].shape[2] == t + 1
        assert _rel(logits[:, -1], ref[:, t]) < 1e-4


def test_left_padded_batch_matches_reference(w2a16):
    q, d = w2a16
    s = _ort(d)
    ids = torch.tensor([[0, 0, 7, 8, 9], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = q(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.numpy()
    logits, past = s.forward(ids.numpy(), attention_mask=mask.numpy(), position_ids=pos.numpy())
    assert _rel(logits[0, 2:], ref[0, 2:]) < 1e-4 and _rel(logits[1], ref[1]) < 1e-4
    nxt = torch.tensor([[11], [12]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        ref2 = q(torch.cat([ids, nxt], 1), attention_mask=mask2, position_ids=(mask2.cumsum(-1) - 1).clamp(min=0),
                 use_cache=False).logits[:, -1].numpy()
    logits2, _ = s.forward(nxt.numpy(), past, attention_mask=mask2.numpy(), position_ids=pos[:, -1:].numpy() + 1)
    assert _rel(logits2[:, -1], ref2) < 1e-4


def test_greedy_generation_matches_pytorch(w2a16):
    q, d = w2a16
    prompt = [1, 5, 9, 200]
    with torch.no_grad():
        ref = q.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    g = _ort(d).generate(prompt, max_new_tokens=12, stop_at_eos=False)
    assert g.token_ids == ref


def test_external_data(w2a2_rotated):
    _, d = w2a2_rotated
    man = json.loads((d / "manifest.json").read_text())
    assert set(man["files"]) == {"model.onnx", "model.onnx.data"} and man["onnx"]["external_data"]
    assert (d / "model.onnx").stat().st_size < (d / "model.onnx.data").stat().st_size
    ops = [n.op_type for n in onnx.load(str(d / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 7 and "Gather" in ops


@pytest.mark.slow
def test_stories260k_w2a16_logits_and_greedy_text(tmp_path):
    from lowbit.llama2c import shared_data_dir
    from lowbit.models import load_model

    data = shared_data_dir()
    if data is None or not (data / "stories260K" / "stories260K.bin").is_file():
        pytest.skip("stories260K is not in the shared data folder (../shared/data)")
    model, tok = load_model("stories260k")
    ids = torch.tensor([tok.encode("Once upon a time, there was a little")])
    q = lowbit.compile_quantized(model, "w2a16", calibration=ids, progress=False)
    assert any(m.packed_in_features > m.in_features for m in q.modules() if isinstance(m, QuantLinear))
    d = export_onnx(q, tmp_path / "stories", tokenizer=tok)
    s = _ort(d)
    assert s.encode("Once upon a time, there was a little") == ids[0].tolist()
    with torch.no_grad():
        ref = q(ids, use_cache=False).logits.numpy()
        ref_ids = q.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    logits, past = s.forward(ids[:, :4].numpy())  # prefill, then decode steps with the KV cache
    assert _rel(logits, ref[:, :4]) < 1e-4
    for t in range(4, ids.shape[1]):
        logits, past = s.forward(ids[:, t:t + 1].numpy(), past)
        assert _rel(logits[:, -1], ref[:, t]) < 1e-4
    g = s.generate("Once upon a time, there was a little", max_new_tokens=16)
    assert g.token_ids == ref_ids[:len(g.token_ids)] and len(g.token_ids) >= min(16, len(ref_ids))
    assert g.text == tok.decode(g.token_ids).lstrip(" ") or g.text == tok.decode(g.token_ids)


def test_rewrites_of_several_output_nodes_are_left_out_without_changing_the_graph(monkeypatch, tmp_path):
    """The optimizer runs without onnxscript's multi-output rewrite rules (their matcher is quadratic
    in the graph's size): inside the export the table lacks them, afterwards it is whole again, and
    the W2A2-half graph of a rotated model is byte for byte the one the full table gives."""
    import contextlib

    import onnxscript.optimizer
    import onnxscript.rewriter as rewriter

    import lowbit.codegen.onnx.export as export_mod

    full = rewriter._DEFAULT_REWRITE_RULES
    multi = [r for r in full if not r._target_pattern.has_single_output_node]
    assert multi, "this onnxscript has no multi-output rewrite rule left to leave out"
    seen = []
    real_optimize_ir = onnxscript.optimizer.optimize_ir

    def spy(model_ir, **kwargs):
        seen.append(tuple(rewriter._DEFAULT_REWRITE_RULES))
        return real_optimize_ir(model_ir, **kwargs)

    monkeypatch.setattr(onnxscript.optimizer, "optimize_ir", spy)
    recipe = lowbit.get_recipe("w2a2-half").with_passes({"name": "rotate"})
    q = lowbit.compile_quantized(tiny_exports.tiny_llama(layers=1), recipe, calibration=tiny_exports.calibration(),
                                 progress=False)
    filtered = export_onnx(q, tmp_path / "filtered")
    assert len(seen) == 1 and set(seen[0]) == set(full) - set(multi)
    assert rewriter._DEFAULT_REWRITE_RULES is full
    monkeypatch.setattr(export_mod, "_single_output_rewrite_rules", contextlib.nullcontext)
    whole = export_onnx(q, tmp_path / "whole")
    assert len(seen) == 2 and set(seen[1]) == set(full)
    graphs = [onnx.load(str(d / "model.onnx"), load_external_data=False).graph.SerializeToString()
              for d in (filtered, whole)]
    assert graphs[0] == graphs[1]
