"""ONNX lowering of lowbit ops and export of compiled models (see :mod:`.export`)."""
from .export import export_module, export_onnx, io_names
from .lowering import WEIGHT_KERNELS, translation_table

__all__ = ["export_onnx", "export_module", "io_names", "translation_table", "WEIGHT_KERNELS"]
