"""lowbit: a compiler for extreme low-bit language models.

    from lowbit import compile_quantized
    qmodel = compile_quantized(model, recipe="w2a16", calibration=batches)
    qmodel.lowbit_report            # what each pass did, per linear site
    lowbit.save(qmodel, "ckpt/"); lowbit.load("ckpt/")
"""
from . import ops  # noqa: F401  (registers torch.ops.lowbit.*)
from .api import compile_quantized, materialize
from .artifacts import ArtifactError, load, save
from .capture import CaptureError, CapturedGraph, LinearSite, capture, find_linear_sites
from .formats import QFormat, QTensor
from .pass_manager import CompileContext, CompileReport, LowbitPass, run_passes
from .quant_linear import QuantLinear
from .recipes import PRESETS, Recipe, get_recipe
from .qat import FakeQuantLinear, freeze, prepare_qat

__version__ = "0.1.0"

__all__ = [
    "compile_quantized", "materialize", "save", "load", "ArtifactError", "capture", "CaptureError",
    "CapturedGraph", "LinearSite", "find_linear_sites", "QFormat", "QTensor", "CompileContext",
    "CompileReport", "LowbitPass", "run_passes", "QuantLinear", "Recipe", "PRESETS", "get_recipe",
    "FakeQuantLinear", "freeze", "prepare_qat",
]
