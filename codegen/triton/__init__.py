"""Triton kernels for lowbit ops on CUDA.

Importing this package registers them: ``torch.ops.lowbit.qlinear`` on CUDA tensors then runs
:func:`qlinear_triton`, which takes the W2A16 kernels where they apply and the op's reference
implementation elsewhere. ``import lowbit.codegen.triton`` is what ``backend="triton"`` needs.

On the CPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1`` before Triton
is imported), which is how the tests exercise them: call :func:`w2a16_linear` directly.
"""
from .dispatch import qlinear_triton, register, w2a16_unsupported
from .w2a16 import default_config, default_path, permute_pairs, w2a16_linear

register()

__all__ = ["w2a16_linear", "qlinear_triton", "w2a16_unsupported", "register", "default_config", "default_path",
           "permute_pairs"]
