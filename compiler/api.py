"""Public API: ``compile_quantized``.

Capture the model's graph, run the recipe's passes and the quantize pass on it, and
materialize the result: a Hugging Face model gets its linear sites replaced by
``lowbit.QuantLinear`` modules at the same names (so ``generate()`` and its KV cache keep
working) and its weight-only edits copied back; any other model is returned as the
rewritten ``torch.fx.GraphModule``.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Iterable

import torch
from torch import nn

from .capture import capture
from .pass_manager import CompileContext, CompileReport, run_passes
from .quant_linear import QuantLinear
from .recipes import Recipe, get_recipe

BACKENDS = ("auto", "reference", "triton")


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


def normalize_calibration(calibration: Any) -> list[tuple]:
    """Calibration data as a list of positional-argument tuples.

    Accepts a [B, T] tensor of token ids (one batch per row), a list of tensors, or a list
    of tuples of tensors.
    """
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 1:
            calibration = calibration.unsqueeze(0)
        return [(row.unsqueeze(0),) for row in calibration] if calibration.dtype in (torch.long, torch.int) \
            else [(calibration,)]
    out = []
    for b in calibration:
        if isinstance(b, torch.Tensor):
            out.append((b if b.dim() > 1 or b.is_floating_point() else b.unsqueeze(0),))
        elif isinstance(b, dict):
            out.append((b["input_ids"],))
        else:
            out.append(tuple(b))
    return out


def default_example(model: nn.Module, seq_len: int = 16) -> tuple:
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None:
        raise ValueError("pass example_inputs (or calibration data): lowbit cannot guess this model's inputs")
    g = torch.Generator().manual_seed(0)
    dev = next(model.parameters()).device
    return (torch.randint(0, vocab, (1, seq_len), generator=g).to(dev),)


def build_passes(recipe: Recipe, context: CompileContext, mode: str = "infer") -> list:
    """The recipe's graph passes followed by the quantize pass (its trainable variant,
    ``lowbit.qat.TrainableQuantizePass``, for ``mode="train"``)."""
    from lowbit.passes import registry
    from lowbit.passes.quantize import QuantizePass

    if mode == "train":
        from .qat import TrainableQuantizePass as QuantizePass  # noqa: F811
    passes = [registry.make(p, context) for p in recipe.passes]
    passes.append(QuantizePass(recipe.weight, recipe.activation, ignore=recipe.is_ignored,
                               clip_search=recipe.clip_search, act_clip_search=recipe.act_clip_search,
                               weight_quantizer=registry.weight_quantizer(recipe, context),
                               context=context, formats=recipe.formats_for))
    return passes


def materialize(model: nn.Module, gm: torch.fx.GraphModule) -> nn.Module:
    """Write the rewritten graph back into the module tree of ``model``.

    Site modules (``lowbit.sites``: QuantLinear, PrologueLinear, ...) go to the same names. Parameters and buffers
    that passes replaced (weight-only edits such as folded norms and fused rotations) are
    put at the same paths in the model, as the graph's own tensors; a tied weight that a
    pass made differ is therefore untied, and the config says so.
    """
    from . import prologue  # noqa: F401  (registers PrologueLinear)
    from .sites import is_site_module
    from lowbit.passes.weights import get_attr_path

    for name, mod in gm.named_modules():
        if is_site_module(mod):
            model.set_submodule(name, mod)
    if any(type(m).__name__ == "FusedSlice" for m in model.modules()):  # sites joined by the fuse pass
        from .fused import link_fused_sites

        link_fused_sites(model)
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        *parents, leaf = name.split(".")
        try:
            owner = get_attr_path(model, ".".join(parents)) if parents else model
        except AttributeError:
            continue
        current = owner._parameters.get(leaf, owner._buffers.get(leaf))
        if current is None or current is t:
            continue
        if current.shape != t.shape:
            raise RuntimeError(f"materialize: {name} has shape {tuple(t.shape)} in the graph, {tuple(current.shape)} in the model")
        if leaf in owner._parameters:
            owner._parameters[leaf] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[leaf] = t
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inp is not None and isinstance(out, nn.Linear) and out.weight is not inp.weight \
            and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    return model


def record_float_channel_stats(captured, context: CompileContext) -> None:
    """Per-channel max |x| at every linear site of the float model, before any pass (for
    the report's outlier plots), collected block by block."""
    from lowbit.passes.quantize import site_blocks
    from .pass_manager import SequentialCalibration

    calib = SequentialCalibration(context, captured.graph_module)
    blocks = site_blocks(captured.sites)
    for b, block in enumerate(blocks):
        inputs = calib.collect([s.node for s in block.values()])
        if b + 1 < len(blocks):
            calib.advance(next(iter(blocks[b + 1].values())).node)
        for name, site in block.items():
            if site.node in inputs:
                context.report.site(name)["act_absmax_float"] = [
                    float(f"{v:.4g}") for v in inputs[site.node].abs().amax(0).tolist()]


def compile_quantized(
    model: nn.Module,
    recipe: "str | Recipe | dict" = "w2a16",
    calibration: Any = None,
    backend: str = "reference",
    example_inputs: tuple | None = None,
    inplace: bool = False,
    progress: bool = True,
    mode: str = "infer",
    measure_errors: bool = True,
) -> nn.Module:
    """Quantize ``model`` with ``recipe`` and return the compiled model.

    ``calibration``: token-id batches (a [B, T] tensor, or a list of tensors / tuples) used
    to measure errors and by calibrated passes. ``backend``: "reference" (pure PyTorch),
    "triton" (CUDA kernels) or "auto". ``inplace=False`` works on a deep copy.
    The result carries ``lowbit_report`` (a :class:`CompileReport`) and ``lowbit_recipe``.
    ``mode="train"`` puts trainable ``lowbit.qat.FakeQuantLinear`` sites in place of the
    packed ones (quantization-aware training; ``lowbit.freeze`` packs them afterwards).
    ``measure_errors=False`` leaves the sites' output errors out of the report where only
    the report would use the calibration data (RTN, whose weight clip search needs no data,
    and no activation clip search): a faster compile.
    """
    if mode not in ("infer", "train"):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if torch.cuda.is_available() else "reference"
    if backend == "triton":
        import lowbit.codegen.triton  # noqa: F401  (registers the CUDA kernels of the lowbit ops)
    recipe = get_recipe(recipe)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    calib = normalize_calibration(calibration)
    param = next(model.parameters(), None)
    if param is not None:  # token ids go where the model is (sites' calibration inputs come back to the CPU)
        calib = [torch.utils._pytree.tree_map(
            lambda a: a.to(param.device) if isinstance(a, torch.Tensor) else a, batch) for batch in calib]
    if recipe.weight_method == "gptq" and not calib:
        raise ValueError("GPTQ needs calibration data: pass calibration= (token ids), e.g. from "
                         "lowbit.calibration.from_text(...) or lowbit.calibration.from_generations(...)")
    example = tuple(example_inputs) if example_inputs is not None else (calib[0] if calib else default_example(model))
    if param is not None:
        example = torch.utils._pytree.tree_map(
            lambda a: a.to(param.device) if isinstance(a, torch.Tensor) else a, example)
    report = CompileReport(meta={"recipe": recipe.name, "backend": backend, "model": type(model).__name__})
    t0 = time.perf_counter()
    with torch.no_grad():
        captured = capture(model, example)
    report.meta["capture_method"] = captured.method
    report.meta["capture_seconds"] = time.perf_counter() - t0
    context = CompileContext(report=report, calibration=calib, recipe=recipe, progress=progress,
                             measure_errors=measure_errors)
    if recipe.weight_method == "gptq":
        context.max_calibration_rows = int(recipe.weight_options.get("calibration_rows", 8192))
    if recipe.passes and calib and mode == "infer":  # the report's outlier plots; training has no use for them
        record_float_channel_stats(captured, context)
    with torch.no_grad():
        gm = run_passes(captured.graph_module, build_passes(recipe, context, mode), report)
    report.meta["compile_seconds"] = time.perf_counter() - t0
    result = materialize(model, gm) if is_hf_model(model) else gm
    result.lowbit_report = report
    result.lowbit_recipe = recipe
    result.lowbit_backend = backend
    return result
