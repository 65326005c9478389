"""lowbit: a compiler for extreme low-bit language models.

    from lowbit import compile_quantized
    qmodel = compile_quantized(model, recipe="w2a16", calibration=batches)
    qmodel.lowbit_report            # what each pass did, per linear site
    lowbit.save(qmodel, "ckpt/"); lowbit.load("ckpt/")
    lowbit.export_onnx(qmodel, "onnx/")   # then lowbit.runtime.Session("onnx/") without torch

The names below are imported on first use, so that ``import lowbit.runtime`` (which
needs onnxruntime and numpy only) does not import torch. Whenever a lowbit module is
imported while torch is loaded, ``lowbit.ops`` is imported too, so ``torch.ops.lowbit.*``
is registered as soon as any torch-based part of lowbit is.
"""
import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> submodule defining it
_EXPORTS = {
    "compile_quantized": "api", "materialize": "api",
    "save": "artifacts", "load": "artifacts", "ArtifactError": "artifacts",
    "capture": "capture", "CaptureError": "capture", "CapturedGraph": "capture",
    "LinearSite": "capture", "find_linear_sites": "capture",
    "QFormat": "formats", "QTensor": "formats",
    "CompileContext": "pass_manager", "CompileReport": "pass_manager", "LowbitPass": "pass_manager",
    "run_passes": "pass_manager",
    "QuantLinear": "quant_linear",
    "PRESETS": "recipes", "Recipe": "recipes", "get_recipe": "recipes",
    "export_onnx": "codegen.onnx",
    "FakeQuantLinear": "qat", "freeze": "qat", "prepare_qat": "qat",
}

__all__ = list(_EXPORTS)

#: Submodules importable without torch.
_TORCH_FREE = {"runtime", "codegen"}


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _EXPORTS:
        from . import ops  # noqa: F401  (registers torch.ops.lowbit.*)

        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The ``lowbit`` module. Importing a submodule sets it as an attribute of the
    package; for ``lowbit.capture`` the attribute stays the function of that name (as
    ``from .capture import capture`` would leave it). It also registers the ops once a
    torch-based submodule is loaded."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}":
            if name in _EXPORTS and _EXPORTS[name] == name:
                value = getattr(value, name)
            if name not in _TORCH_FREE and "torch" in sys.modules and name != "ops":
                importlib.import_module(f"{self.__name__}.ops")
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if "torch" in sys.modules:  # torch is in use already: register the ops now (`import lowbit` always did)
    importlib.import_module(f"{__name__}.ops")
