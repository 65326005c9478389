"""The CUDA implementation of ``torch.ops.lowbit.qlinear``: Triton kernels where they apply,
the op's reference implementation everywhere else.

A custom op has one CUDA kernel, so :func:`qlinear_triton` dispatches itself: the W2A16 case
(2-bit ``int``/``half`` weights, groups of 16, E4M3 scales, bf16/fp16 activations, no
activation quantization) goes to :func:`lowbit.codegen.triton.w2a16.w2a16_linear`; any other
format or dtype runs the reference math of :mod:`lowbit.ops` unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch

from lowbit import ops as _ops

from .w2a16 import _interpreting, w2a16_linear

_MIN_CAPABILITY = (8, 0)  # bf16x2 FMA in the dequantization


def _reference_qlinear(*args):
    """The reference implementation of ``lowbit::qlinear`` (the op's own Python function)."""
    fn = getattr(_ops, "qlinear_reference", None) or _ops.qlinear._init_fn
    return fn(*args)


def _device_ok(device: torch.device) -> bool:
    if device.type == "cpu":
        return _interpreting()
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= _MIN_CAPABILITY


def w2a16_unsupported(x, w_packed, w_scales, w_global, bias, w_bits, w_grid, group_size, w_scale_dtype,
                      a_bits) -> str | None:
    """Why the W2A16 kernel does not cover these arguments, or None when it does."""
    if a_bits:
        return f"activations quantized to {a_bits} bits (W2A16 only)"
    if w_bits != 2 or group_size != 16 or w_scale_dtype != "e4m3" or w_grid not in ("int", "half"):
        return f"weight format {w_grid}{w_bits}_g{group_size}_{w_scale_dtype} (kernel: int2/half2, g16, e4m3)"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"activation dtype {x.dtype}"
    if w_packed.dtype != torch.uint8 or w_scales.dtype != torch.float8_e4m3fn or w_packed.dim() != 2 \
            or w_scales.dim() != 2 or w_packed.shape[1] != 4 * w_scales.shape[1] \
            or w_packed.shape[0] != w_scales.shape[0] or x.shape[-1] > 16 * w_scales.shape[1] \
            or w_global.numel() != 1:
        return "tensor shapes or dtypes outside the packed layout"
    if bias is not None and bias.shape != (w_packed.shape[0],):
        return "bias shape"
    devices = {t.device for t in (x, w_packed, w_scales, w_global) + ((bias,) if bias is not None else ())}
    if len(devices) != 1 or not _device_ok(x.device):
        return f"device {x.device}"
    return None


def qlinear_triton(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    w_global: torch.Tensor,
    bias: Optional[torch.Tensor],
    w_bits: int,
    w_grid: str,
    group_size: int,
    w_scale_dtype: str,
    a_bits: int,
    a_grid: str,
    a_group_size: int,
    a_scale_dtype: str,
) -> torch.Tensor:
    """``lowbit::qlinear`` on CUDA: the Triton W2A16 kernel or the reference implementation."""
    if w2a16_unsupported(x, w_packed, w_scales, w_global, bias, w_bits, w_grid, group_size, w_scale_dtype,
                         a_bits) is None:
        return w2a16_linear(x, w_packed, w_scales, w_global, bias, grid=w_grid)
    return _reference_qlinear(x, w_packed, w_scales, w_global, bias, w_bits, w_grid, group_size, w_scale_dtype,
                              a_bits, a_grid, a_group_size, a_scale_dtype)


def register() -> None:
    """Make :func:`qlinear_triton` the CUDA kernel of ``torch.ops.lowbit.qlinear`` (idempotent)."""
    torch.library.register_kernel("lowbit::qlinear", "cuda", qlinear_triton)
