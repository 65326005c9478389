"""The CUDA implementations of ``torch.ops.lowbit.qlinear``, ``quantize_act`` and
``codebook_linear``: Triton kernels where they apply, the ops' reference implementations
everywhere else.

A custom op has one CUDA kernel, so each function here dispatches itself:

* ``qlinear``: the W2A16 case (2-bit ``int``/``half`` weights, groups of 16, E4M3 scales,
  bf16/fp16 activations, no activation quantization) goes to
  :func:`lowbit.codegen.triton.w2a16_gluon.w2a16_gluon` for decode-sized bf16 calls (at most
  ``GLUON_MAX_M`` rows, K a multiple of 256, N of 64; the weight is repacked once per tensor
  and kept) and to :func:`lowbit.codegen.triton.w2a16.w2a16_linear` otherwise; the W2A2 case (2-bit ``int`` weights and
  activations, groups of 16, E4M3 scales) to :func:`lowbit.codegen.triton.w2a2.w2a2_linear`
  (prologue + FP8 GEMM);
* ``quantize_act`` with E4M3 scales and groups of 16: :func:`lowbit.codegen.triton.w2a2.act_quant`
  (bit-identical codes and scales);
* ``codebook_linear`` with per-row E4M3 scales: :func:`lowbit.codegen.triton.codebook.codebook_linear_triton`;
* the butterfly stages of ``hadamard`` (and of every ``lowbit.hadamard.hadamard_transform`` on
  CUDA without autograd) in one pass, :func:`lowbit.codegen.triton.hadamard.fwht`
  (bit-identical; :func:`register_hadamard`);

any other format or dtype runs the reference math unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch

from lowbit import ops as _ops

from .codebook import codebook_gemv, codebook_unsupported
from .hadamard import FWHT_DTYPES, MAX_P, fwht
from .w2a2 import act_quant, w2a2_linear
from .w2a16 import _interpreting, w2a16_linear
from .w2a16_gluon import MAX_M as _GLUON_MAX_M
from .w2a16_gluon import gluon_unsupported, repacked, w2a16_gluon

_MIN_CAPABILITY = (8, 0)  # bf16x2 FMA in the dequantization
GLUON_MAX_M = _GLUON_MAX_M  # W2A16 calls of at most this many rows run the Gluon kernel (0: never)


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


def _packed_layout_problem(x, w_packed, w_scales, w_global, bias) -> str | None:
    """Why the tensors are outside the 2-bit packed layout (uint8 codes, E4M3 scales per 16), or None."""
    if w_packed.dtype != torch.uint8 or w_scales.dtype != torch.float8_e4m3fn or w_packed.dim() != 2 \
            or w_scales.dim() != 2 or w_packed.shape[1] != 4 * w_scales.shape[1] \
            or w_packed.shape[0] != w_scales.shape[0] or x.shape[-1] > 16 * w_scales.shape[1] \
            or w_global.numel() != 1:
        return "tensor shapes or dtypes outside the packed layout"
    if bias is not None and bias.shape != (w_packed.shape[0],):
        return "bias shape"
    return None


def w2a16_unsupported(x, w_packed, w_scales, w_global, bias, w_bits, w_grid, group_size, w_scale_dtype,
                      a_bits) -> str | None:
    """Why the W2A16 kernel does not cover these arguments, or None when it does."""
    if a_bits:
        return f"activations quantized to {a_bits} bits (W2A16 only)"
    if w_bits != 2 or group_size != 16 or w_scale_dtype != "e4m3" or w_grid not in ("int", "half"):
        return f"weight format {w_grid}{w_bits}_g{group_size}_{w_scale_dtype} (kernel: int2/half2, g16, e4m3)"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"activation dtype {x.dtype}"
    problem = _packed_layout_problem(x, w_packed, w_scales, w_global, bias)
    if problem:
        return problem
    devices = {t.device for t in (x, w_packed, w_scales, w_global) + ((bias,) if bias is not None else ())}
    if len(devices) != 1 or not _device_ok(x.device):
        return f"device {x.device}"
    return None


def w2a2_unsupported(x, w_packed, w_scales, w_global, bias, w_bits, w_grid, group_size, w_scale_dtype,
                     a_bits, a_grid, a_group_size, a_scale_dtype, a_clip=1.0) -> str | None:
    """Why the W2A2 kernels do not cover these arguments, or None when they do."""
    if (w_bits, w_grid, group_size, w_scale_dtype) != (2, "int", 16, "e4m3") \
            or (a_bits, a_grid, a_group_size, a_scale_dtype) != (2, "int", 16, "e4m3"):
        return "W2A2 kernel: int2 weights and activations, groups of 16, E4M3 scales"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activation dtype {x.dtype}"
    problem = _packed_layout_problem(x, w_packed, w_scales, w_global, bias)
    if problem:
        return problem
    devices = {t.device for t in (x, w_packed, w_scales, w_global) + ((bias,) if bias is not None else ())}
    if len(devices) != 1 or x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) < (8, 9):
        return f"device {x.device} (FP8 tensor cores: compute capability 8.9 or above)"
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
    a_clip: float = 1.0,
) -> torch.Tensor:
    """``lowbit::qlinear`` on CUDA: the Triton W2A16 / W2A2 kernels or the reference implementation."""
    if w2a16_unsupported(x, w_packed, w_scales, w_global, bias, w_bits, w_grid, group_size, w_scale_dtype,
                         a_bits) is None:
        if gluon_unsupported(x, w_packed, GLUON_MAX_M) is None:
            return w2a16_gluon(x, repacked(w_packed), w_scales, w_global, bias, grid=w_grid)
        return w2a16_linear(x, w_packed, w_scales, w_global, bias, grid=w_grid)
    if a_bits and w2a2_unsupported(x, w_packed, w_scales, w_global, bias, w_bits, w_grid, group_size,
                                   w_scale_dtype, a_bits, a_grid, a_group_size, a_scale_dtype, a_clip) is None:
        return w2a2_linear(x, w_packed, w_scales, w_global, bias, clip=a_clip)
    return _reference_qlinear(x, w_packed, w_scales, w_global, bias, w_bits, w_grid, group_size, w_scale_dtype,
                              a_bits, a_grid, a_group_size, a_scale_dtype, a_clip)


def quantize_act_triton(x: torch.Tensor, bits: int, grid: str, group_size: int, scale_dtype: str, clip: float = 1.0):
    """``lowbit::quantize_act`` on CUDA: the Triton prologue (E4M3 scales, groups of 16) or the
    reference implementation."""
    if group_size == 16 and scale_dtype == "e4m3" and x.shape[-1] % 16 == 0 and x.is_floating_point() \
            and x.dtype != torch.float64 and _device_ok(x.device):
        return act_quant(x, bits, grid, clip=clip)
    return _ops.quantize_act._init_fn(x, bits, grid, group_size, scale_dtype, clip)


def codebook_linear_triton(x, indices_packed, codebook_packed, scales, global_scale, bias, vector_size: int,
                           index_bits: int, group_size: int, scale_dtype: str) -> torch.Tensor:
    """``lowbit::codebook_linear`` on CUDA: the Triton GEMV (v = 16, per-row E4M3 scales) for
    up to 16 rows of x, the reference implementation otherwise."""
    args = (x, indices_packed, codebook_packed, scales, global_scale, bias, vector_size, index_bits, group_size,
            scale_dtype)
    rows = x.numel() // max(x.shape[-1], 1)
    if rows <= 16 and codebook_unsupported(*args) is None and _device_ok(x.device):
        return codebook_gemv(x, indices_packed, codebook_packed, scales, global_scale, bias, index_bits,
                             group_size * scales.shape[1])
    from lowbit import codebook as _cb

    return _cb.codebook_linear._init_fn(*args)


def fwht_cuda(x: torch.Tensor, p: int) -> torch.Tensor:
    """The butterfly stages of the Hadamard transform on CUDA: :func:`fwht` where it applies."""
    if p <= MAX_P and x.dim() == 2 and x.dtype in FWHT_DTYPES and _device_ok(x.device):
        return fwht(x, p)
    from lowbit.hadamard import _fwht_last

    return _fwht_last(x.float(), p)


def register_hadamard() -> None:
    """Run the Hadamard transform's butterfly stages on CUDA through :func:`fwht_cuda` (part of
    :func:`register`: 2.0-6.9x faster than the stages in torch on an H200, bit-identical;
    ``python bench/kernels.py --suites hadamard``)."""
    from lowbit.hadamard import register_fwht_kernel

    register_fwht_kernel("cuda", fwht_cuda)


def register() -> None:
    """Make the functions above the CUDA kernels of their ops (idempotent)."""
    register_hadamard()
    torch.library.register_kernel("lowbit::qlinear", "cuda", qlinear_triton)
    _ops.register_eager_kernel("qlinear", "cuda", qlinear_triton)
    torch.library.register_kernel("lowbit::quantize_act", "cuda", quantize_act_triton)
    from lowbit import codebook as _cb  # noqa: F401  (defines lowbit::codebook_linear)

    torch.library.register_kernel("lowbit::codebook_linear", "cuda", codebook_linear_triton)
