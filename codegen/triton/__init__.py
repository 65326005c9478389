"""Triton kernels for lowbit ops on CUDA.

Importing this package registers them: ``torch.ops.lowbit.qlinear`` on CUDA tensors then runs
:func:`qlinear_triton` (the W2A16 or W2A2 kernels where they apply, the op's reference
implementation elsewhere), ``quantize_act`` the Triton prologue and ``codebook_linear`` the
codebook GEMV, and the Hadamard transform's butterfly stages run through :func:`fwht`
(:func:`register_hadamard`).
``import lowbit.codegen.triton`` is what ``backend="triton"`` needs.

On the CPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1`` before Triton
is imported), which is how the tests exercise them: call :func:`w2a16_linear` directly.
"""
from .codebook import codebook_gemv
from .dispatch import (codebook_linear_triton, qlinear_triton, quantize_act_triton, register, register_hadamard,
                       w2a16_unsupported)
from .hadamard import fwht
from .w2a2 import act_quant, w2a2_gemm, w2a2_linear, weight_e4m3
from .w2a16 import default_config, default_path, permute_pairs, w2a16_linear

register()

__all__ = ["w2a16_linear", "qlinear_triton", "w2a16_unsupported", "register", "default_config", "default_path",
           "permute_pairs", "act_quant", "w2a2_gemm", "w2a2_linear", "weight_e4m3", "codebook_gemv",
           "quantize_act_triton", "codebook_linear_triton", "fwht", "register_hadamard"]
