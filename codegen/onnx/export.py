"""``export_onnx``: a compiled Hugging Face causal LM to ONNX for ``lowbit.runtime``.

The exported graph is the model's forward with a key/value cache, with inputs and
outputs named as Hugging Face Optimum names them for decoder-only models::

    inputs:  input_ids [batch, seq] int64
             attention_mask [batch, past + seq] int64 (1: attend, 0: padding)
             position_ids [batch, seq] int64
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]   (i = layer)
    outputs: logits [batch, seq, vocab]
             present.{i}.key / .value [batch, kv_heads, past + seq, head_dim]

Prefill feeds past tensors of length 0; each decode step feeds the previous presents.
Every lowbit op lowers through :mod:`lowbit.codegen.onnx.lowering` (onnxscript
translations), so packed weights stay packed in the file (uint8 codes, FLOAT8E4M3FN
scales, fp32 global scales).

The output folder holds ``model.onnx`` (plus ``model.onnx.data`` when the weights are
large), the tokenizer as ``tokenizer.json`` when one is given, and ``manifest.json``
(:mod:`lowbit.runtime.manifest`): model config, recipe, graph signature, session
options and the sha256 of every file.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from lowbit.runtime import manifest as mf

from . import lowering

#: IR version written (onnxruntime 1.2x reads up to 11 for opset 23).
IR_VERSION = 11
VERBOSE = False
#: Above this many bytes of initializers, they go to ``model.onnx.data``.
EXTERNAL_DATA_THRESHOLD = 64 << 20
LOWBIT_BUFFER_SUFFIXES = (".weight_packed", ".weight_scales", ".weight_global")


class _CausalLMWithCache(nn.Module):
    """Flat-tensor signature around a Hugging Face causal LM (what the ONNX graph sees).

    The attention mask is handed to the model as a ready 4D additive mask: query ``i``
    (absolute key index ``past + i``) may attend key ``j`` iff ``j <= past + i`` and
    ``attention_mask[b, j] == 1``; masked scores get the dtype's lowest value. This is
    the causal + padding mask Hugging Face builds for full-attention decoders, written
    with a handful of ops (Hugging Face's own mask builder traces into thousands of
    symbolic-shape operations and makes ``torch.export`` several times slower).
    """

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        q_len, kv_len = input_ids.shape[1], attention_mask.shape[1]
        dtype = past[0].dtype
        query_pos = torch.arange(q_len, device=input_ids.device).unsqueeze(-1) + (kv_len - q_len)
        key_pos = torch.arange(kv_len, device=input_ids.device).unsqueeze(0)
        allowed = (key_pos <= query_pos).unsqueeze(0) & (attention_mask != 0).unsqueeze(1)  # [b, q, kv]
        mask = torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype))
        mask = mask.unsqueeze(1)  # [b, 1, q, kv]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, return_dict=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def _cache_geometry(config) -> tuple[int, int, int]:
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Optimum's input and output names for a decoder with ``num_layers`` layers."""
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def _lowbit_weight_names(module: nn.Module) -> set[str]:
    """Names (as the exporter names initializers: module paths) of lowbit weight buffers."""
    return {name for name, _ in module.named_buffers(remove_duplicate=False)
            if name.endswith(LOWBIT_BUFFER_SUFFIXES)}


@contextlib.contextmanager
def _single_output_rewrite_rules():
    """Within the block, onnxscript's default rewrite rules less those whose pattern ends in
    several output nodes (``SlicesSplit``). onnxscript matches such a pattern by scanning the
    whole graph for every candidate node, which grows with the square of the graph: most of a
    SmolLM2 W2A2 export's time went there, and on the graphs lowbit writes the rule changes
    nothing (a 4-layer W2A2 export gives the same bytes with and without it). Without the
    private rule table (another onnxscript version) the defaults stay."""
    import onnxscript.rewriter as rewriter

    default = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if default is None:
        yield
        return

    def single_output(rule) -> bool:
        pattern = getattr(rule, "_target_pattern", None)
        return getattr(pattern, "has_single_output_node", True)

    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in default if single_output(r))
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = default


def optimize(model_ir, keep_names: set[str]) -> None:
    """onnxscript's optimizer (constant folding, rewrites, ONNX fusions such as
    RMSNormalization), except that nodes reading the initializers ``keep_names`` (the
    packed lowbit weights) are never folded: folding would store unpacked (or fp32)
    copies of the weights in the file. onnxruntime folds them when it loads the model.
    The rewrites leave out those of several output nodes (:func:`_single_output_rewrite_rules`)."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions as onnx_fusions

    def keep_packed(node) -> bool | None:
        for v in node.inputs:
            if v is not None and v.is_initializer() and v.name in keep_names:
                return False
        return None

    with _single_output_rewrite_rules():
        onnxscript.optimizer.optimize_ir(model_ir, should_fold=keep_packed)
    onnx_fusions.fuse(model_ir)


def export_module(module: nn.Module, args: tuple, *, weight_kernel: str = "nbits4", accuracy_level: int = 0,
                  dynamic_shapes=None, input_names=None, output_names=None, keep_metadata: bool = False):
    """Export any module holding lowbit ops to an ONNX IR model (``onnx_ir.Model``).

    ``torch.onnx.export(dynamo=True)`` with the lowbit translation table, then
    :func:`optimize` keeping packed weights packed; IR version set to :data:`IR_VERSION`.
    ``keep_metadata``: keep the exporter's per-node metadata (Python stack traces, module
    paths: several times the size of a 2-bit model's weights for small models).
    Save it with ``onnx_ir.save`` or turn it into a proto with ``onnx_ir.to_proto``.
    """
    table = lowering.translation_table(weight_kernel, accuracy_level)
    with torch.no_grad():
        program = torch.onnx.export(
            module, args, dynamo=True, custom_translation_table=table, opset_version=lowering.OPSET,
            input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
            optimize=False, verbose=VERBOSE,
        )
    model_ir = program.model
    optimize(model_ir, _lowbit_weight_names(module))
    model_ir.ir_version = IR_VERSION
    if not keep_metadata:
        from onnxscript import ir

        for node in ir.traversal.RecursiveGraphIterator(model_ir.graph):
            node.metadata_props.clear()
    return model_ir


def _tokenizer_files(tokenizer, out: Path) -> dict:
    """Write the tokenizer as ``tokenizer.json``; returns the manifest's tokenizer entry."""
    if tokenizer is None:
        return {}
    entry: dict[str, Any] = {"file": mf.TOKENIZER_FILE}
    backend = None
    if hasattr(tokenizer, "backend_tokenizer"):
        backend = tokenizer.backend_tokenizer  # a transformers fast tokenizer
    elif type(tokenizer).__module__.startswith("tokenizers"):
        backend = tokenizer
    elif hasattr(tokenizer, "pieces") and hasattr(tokenizer, "scores"):
        from .tokenizer import llama2c_to_tokenizers

        backend = llama2c_to_tokenizers(tokenizer)
    if backend is None:
        raise TypeError(f"cannot export tokenizer of type {type(tokenizer).__name__}: pass a Hugging Face fast "
                        "tokenizer, a tokenizers.Tokenizer or a lowbit Llama2cTokenizer")
    backend.save(str(out / mf.TOKENIZER_FILE))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(tokenizer, key, None)
        if isinstance(v, (int, list)):
            entry[key] = v
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, str):
        entry["chat_template"] = tmpl
    return entry


def _sample_inputs(config, batch: int, seq: int, past: int, dtype: torch.dtype) -> tuple:
    layers, kv_heads, head_dim = _cache_geometry(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).unsqueeze(0).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, kv_heads, past, head_dim, generator=g).to(dtype) for _ in range(2 * layers)]
    return (ids, mask, pos, *kv)


def export_onnx(
    qmodel: nn.Module,
    out_dir: str | Path,
    tokenizer=None,
    *,
    weight_kernel: str = "nbits4",
    accuracy_level: int = 0,
    external_data: bool | None = None,
    check: bool = True,
) -> Path:
    """Export a (compiled) Hugging Face causal LM to ``out_dir`` for :class:`lowbit.runtime.Session`.

    ``qmodel``: a model returned by ``lowbit.compile_quantized`` (or a float one: the
    export is then the fp32 baseline). ``tokenizer``: a Hugging Face fast tokenizer, a
    ``tokenizers.Tokenizer`` or a ``lowbit.llama2c.Llama2cTokenizer``; written as
    ``tokenizer.json``. ``weight_kernel``: how quantized weights are multiplied
    (:data:`lowbit.codegen.onnx.lowering.WEIGHT_KERNELS`; default ``"nbits4"``).
    ``accuracy_level``: MatMulNBits' compute type (0: fp32, exact; 4: int8 activations).
    ``external_data``: store initializers in ``model.onnx.data`` (default: when they
    exceed 64 MiB). ``check``: run ``onnx.checker`` on the result.

    Returns the output folder. The graph uses opset 23 (IR version 11) plus
    ``com.microsoft`` (MatMulNBits).
    """
    config = getattr(qmodel, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise TypeError("export_onnx supports Hugging Face causal LMs (a model with a .config)")
    layer_types = set(getattr(config, "layer_types", None) or [])
    if layer_types - {"full_attention"}:
        raise NotImplementedError(f"export_onnx builds a full causal mask; layer types {sorted(layer_types)} "
                                  "(sliding windows, ...) are not supported yet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    layers, kv_heads, head_dim = _cache_geometry(config)
    dtype = next(qmodel.parameters()).dtype
    qmodel = qmodel.eval()
    wrapper = _CausalLMWithCache(qmodel, layers).eval()
    in_names, out_names = io_names(layers)

    batch = torch.export.Dim("batch_size", min=1, max=64)
    seq = torch.export.Dim("sequence_length", min=1, max=config.max_position_embeddings)
    past = torch.export.Dim("past_sequence_length", min=1, max=config.max_position_embeddings)
    dyn = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * layers)),
    }
    sample = _sample_inputs(config, 2, 3, 5, dtype)
    # The wrapper hands the model a ready 4D mask, which eager attention adds to its scores.
    prev_attn = getattr(config, "_attn_implementation", None)
    try:
        config._attn_implementation = "eager"
        model_ir = export_module(
            wrapper, sample, weight_kernel=weight_kernel, accuracy_level=accuracy_level,
            input_names=in_names, output_names=out_names,
            dynamic_shapes=(dyn["input_ids"], dyn["attention_mask"], dyn["position_ids"], dyn["past"]))
    finally:
        if prev_attn is not None:
            config._attn_implementation = prev_attn
    export_seconds = time.perf_counter() - t0

    _name_dims(model_ir)
    weight_bytes = sum(v.const_value.nbytes for v in model_ir.graph.initializers.values() if v.const_value is not None)
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_THRESHOLD
    for stale in (out / mf.MODEL_FILE, out / (mf.MODEL_FILE + ".data")):
        stale.unlink(missing_ok=True)
    onnx_path = out / mf.MODEL_FILE
    from onnxscript import ir

    if external_data:
        ir.save(model_ir, onnx_path, external_data=mf.MODEL_FILE + ".data")
    else:
        ir.save(model_ir, onnx_path)
    if check:
        onnx.checker.check_model(str(onnx_path), full_check=False)

    tok_entry = _tokenizer_files(tokenizer, out)
    files = [mf.MODEL_FILE] + ([mf.MODEL_FILE + ".data"] if external_data else []) + \
        ([mf.TOKENIZER_FILE] if tok_entry else [])
    report = getattr(qmodel, "lowbit_report", None)
    recipe = getattr(qmodel, "lowbit_recipe", None)
    eos = getattr(getattr(qmodel, "generation_config", None), "eos_token_id", None) or config.eos_token_id
    manifest = {
        "format": mf.FORMAT,
        "format_version": mf.FORMAT_VERSION,
        "model": {
            "class": type(qmodel).__name__,
            "config": config.to_dict(),
            "num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim,
            "vocab_size": config.vocab_size, "max_position_embeddings": config.max_position_embeddings,
            "dtype": str(dtype).removeprefix("torch."),
            "bos_token_id": config.bos_token_id, "eos_token_id": eos,
        },
        "recipe": recipe.to_dict() if recipe is not None else None,
        "bits_per_weight": _bits_summary(qmodel, report),
        "onnx": {
            "file": mf.MODEL_FILE, "opset": lowering.OPSET, "ir_version": IR_VERSION,
            "external_data": bool(external_data), "inputs": in_names, "outputs": out_names,
            "weight_kernel": weight_kernel, "accuracy_level": accuracy_level,
            "initializer_bytes": weight_bytes, "export_seconds": round(export_seconds, 2),
        },
        "session_options": {"session.qdq_matmulnbits_accuracy_level": str(accuracy_level)},
        "tokenizer": tok_entry or None,
        "files": {name: mf.file_entry(out / name) for name in files},
    }
    (out / mf.MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str))
    return out


def _name_dims(model_ir) -> None:
    """Name the attention mask's length as Optimum does ("past_sequence_length + sequence_length")."""
    from onnxscript import ir

    for v in model_ir.graph.inputs:
        if v.name == "attention_mask" and v.shape is not None:
            v.shape = ir.Shape([v.shape[0], "past_sequence_length + sequence_length"])


def _bits_summary(qmodel: nn.Module, report) -> dict:
    """Bits per weight of the quantized sites (what the compile report states) and of the
    whole model's parameters as stored."""
    from lowbit.quant_linear import QuantLinear

    q_weights = q_bits = 0.0
    float_params = 0
    for m in qmodel.modules():
        if isinstance(m, QuantLinear):
            n = m.out_features * m.in_features
            q_weights += n
            q_bits += m.bits_per_weight() * n
    seen = set()
    for name, p in qmodel.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            float_params += p.numel()
    return {
        "quantized_weights": int(q_weights),
        "quantized_sites_bits_per_weight": round(q_bits / q_weights, 4) if q_weights else None,
        "float_parameters": int(float_params),
        "report_sites": len(report.sites) if report is not None else 0,
    }


def export_main(argv=None) -> int:
    """``lowbit export SOURCE --out DIR``: export a model for ``lowbit run``.

    SOURCE is a folder saved by ``lowbit.save`` / ``lowbit compile --out`` (exported as
    compiled), or a model name or path understood by ``lowbit.models.load_model``
    ("smollm2", "stories260k", a Hugging Face folder, a .gguf file), compiled first with
    ``--recipe`` when given (otherwise exported in float).
    """
    import argparse

    p = argparse.ArgumentParser(prog="lowbit export", description=export_main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", default=None, help="compile a model SOURCE with this recipe first")
    p.add_argument("--override", action="append", metavar="PATTERN=PRESET",
                   help="with --recipe: quantize the sites matching PATTERN with PRESET's formats (repeatable), "
                        "e.g. --override lm_head=w4a16")
    p.add_argument("--weight-kernel", default="nbits4", choices=lowering.WEIGHT_KERNELS)
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.override and not args.recipe:
        p.error("--override needs --recipe")

    import lowbit
    from lowbit.models import load_model

    if (Path(args.source) / "manifest.json").is_file():
        from lowbit.artifacts import load_tokenizer, read_manifest

        model = lowbit.load(args.source)
        tokenizer = load_tokenizer(args.source)
        if tokenizer is None:
            source = read_manifest(args.source, verify=False)["model"].get("source")
            tokenizer = load_model(source)[1] if source else None
    else:
        model, tokenizer = load_model(args.source)
        if args.recipe:
            g = torch.Generator().manual_seed(args.seed)
            calib = torch.randint(0, model.config.vocab_size, (args.calib_samples, args.calib_len), generator=g)
            from lowbit.recipes import with_override_specs

            recipe = with_override_specs(args.recipe, args.override)
            model = lowbit.compile_quantized(model, recipe, calibration=calib, inplace=True)
    out = export_onnx(model, args.out, tokenizer=tokenizer, weight_kernel=args.weight_kernel)
    man = json.loads((out / mf.MANIFEST_FILE).read_text())
    size = sum(v["bytes"] for v in man["files"].values())
    print(f"exported to {out} ({size / 2**20:.1f} MiB, {man['onnx']['export_seconds']:.0f} s)")
    return 0
