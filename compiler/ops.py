"""The lowbit op registry: ``torch.ops.lowbit.*``.

Each op is a ``torch.library.custom_op`` with
* a reference implementation in plain PyTorch (CPU and CUDA): the definition of its
  numerics, built on :mod:`lowbit.formats`;
* a fake implementation, so ``torch.export`` and ``torch.compile`` see through it;
* optional backend kernels registered later (Triton on CUDA, see ``lowbit.codegen``),
  and an ONNX lowering.

Formats travel as plain scalars (bits, grid, group size, scale dtype) so the ops'
schemas stay simple and serialisable.

Eager calls (:func:`eager_kernel`): going through PyTorch's dispatcher costs a custom op
about 30 us of CPU per call, more than a batch-1 kernel takes on the GPU. A backend that
registers its kernel with :func:`register_eager_kernel` as well lets plain eager callers
(``QuantLinear.forward``) call that same function directly, when nothing needs to see the
op: real tensors on the current device, no active dispatch mode (``torch.export``,
``make_fx``, fake tensors), no ``torch.compile`` or ``torch.jit`` tracing, no autograd.

Ops
---
``quantize_act(x, bits, grid, group_size, scale_dtype, clip=1.0) -> (codes, scales, global_scale)``
    dynamic per-token, per-group activation quantization along the last dimension.
    codes int8 ``[..., K]``; scales ``[..., K/G]`` (E4M3 or fp16/fp32); global fp32 ``[..., 1]``
    (times ``clip``, the activation clip ratio of ``lowbit.formats``).

``qlinear(x, w_packed, w_scales, w_global, bias, w_bits, w_grid, group_size, w_scale_dtype,
a_bits, a_grid, a_group_size, a_scale_dtype, a_clip=1.0) -> y``
    ``y = Qa(x) @ dequant(W)^T + bias`` where ``Qa`` quantizes and dequantizes x with the
    activation format (``a_bits == 0``: x is used as is, W*A16). Output in x's dtype;
    the reference accumulates in fp32. The stored weight may be wider than x (padded to
    a multiple of the group sizes): x is padded with zeros to that width before it is
    quantized, and the product uses only the first ``K = x.shape[-1]`` columns.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .formats import (
    QFormat,
    dequantize_codes,
    effective_scales,
    quantize,
    unpack_codes,
)


def _fmt(bits: int, grid: str, group_size: int, scale_dtype: str, clip: float = 1.0) -> QFormat:
    return QFormat(bits, grid, group_size, scale_dtype, clip)


# -- quantize_act ------------------------------------------------------------------

@torch.library.custom_op("lowbit::quantize_act", mutates_args=())
def quantize_act(
    x: torch.Tensor, bits: int, grid: str, group_size: int, scale_dtype: str, clip: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fmt = _fmt(bits, grid, group_size, scale_dtype, clip)
    qt = quantize(x, fmt, per_row=True)
    return qt.codes, qt.scales, qt.global_scale.expand(*x.shape[:-1], 1).contiguous()


@quantize_act.register_fake
def _(x, bits, grid, group_size, scale_dtype, clip=1.0):
    fmt = _fmt(bits, grid, group_size, scale_dtype, clip)
    k = x.shape[-1]
    codes = x.new_empty(x.shape, dtype=torch.int8)
    scales = x.new_empty((*x.shape[:-1], k // group_size), dtype=fmt.scale_torch_dtype)
    gscale = x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)
    return codes, scales, gscale


def fake_quantize_act(x: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """Quantize-dequantize x per token and group (the value a W*A* site computes with), fp32."""
    codes, scales, gscale = torch.ops.lowbit.quantize_act(x, fmt.bits, fmt.grid, fmt.group_size, fmt.scale_dtype,
                                                          fmt.clip)
    return dequantize_codes(codes, effective_scales(scales, gscale), fmt)


# -- qlinear -----------------------------------------------------------------------

def dequantize_weight(w_packed, w_scales, w_global, fmt: QFormat, in_features: int | None = None) -> torch.Tensor:
    """fp32 weight [N, K_padded] from packed codes, stored scales and the global scale
    (the first ``in_features`` columns when given)."""
    codes = unpack_codes(w_packed, fmt.bits, w_scales.shape[-1] * fmt.group_size)
    w = dequantize_codes(codes, effective_scales(w_scales, w_global), fmt)
    return w if in_features is None else w[:, :in_features]


def qlinear_reference(
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
    """The reference numerics of ``lowbit::qlinear`` (any device); backends match it."""
    wfmt = _fmt(w_bits, w_grid, group_size, w_scale_dtype)
    k = x.shape[-1]
    w = dequantize_weight(w_packed, w_scales, w_global, wfmt)[:, :k]
    xa = x.float()
    if a_bits:
        pad = w_scales.shape[-1] * group_size - k
        xp = torch.nn.functional.pad(xa, (0, pad)) if pad else xa
        xa = fake_quantize_act(xp, _fmt(a_bits, a_grid, a_group_size, a_scale_dtype, a_clip))[..., :k]
    y = torch.nn.functional.linear(xa, w, None if bias is None else bias.float())
    return y.to(x.dtype)


@torch.library.custom_op("lowbit::qlinear", mutates_args=())
def qlinear(
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
    return qlinear_reference(x, w_packed, w_scales, w_global, bias, w_bits, w_grid, group_size, w_scale_dtype,
                             a_bits, a_grid, a_group_size, a_scale_dtype, a_clip)


@qlinear.register_fake
def _(x, w_packed, w_scales, w_global, bias, w_bits, w_grid, group_size, w_scale_dtype,
      a_bits, a_grid, a_group_size, a_scale_dtype, a_clip=1.0):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


_EAGER_KERNELS: dict[tuple[str, str], Callable] = {}


def register_eager_kernel(op_name: str, device_type: str, fn: Callable) -> None:
    """Record ``fn`` (the kernel registered for ``torch.ops.lowbit.<op_name>`` on
    ``device_type``) for :func:`eager_kernel` (module docstring)."""
    _EAGER_KERNELS[(op_name, device_type)] = fn


def eager_kernel(op_name: str, x: torch.Tensor) -> Callable | None:
    """The registered kernel of ``op_name`` for x's device when the call is plain eager (real
    tensor on the current device, no dispatch mode, not compiling or tracing, no autograd),
    else None: call the op."""
    fn = _EAGER_KERNELS.get((op_name, x.device.type)) if type(x) is torch.Tensor else None
    if fn is None or (x.requires_grad and torch.is_grad_enabled()):
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return None
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return None  # kernels launch on the current device: leave other devices to the op
    return fn


# -- hadamard --------------------------------------------------------------------------

@torch.library.custom_op("lowbit::hadamard", mutates_args=())
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Hadamard transform along the last dim: ``x @ H_n^T / sqrt(n)``.

    ``H_n`` is ``lowbit.hadamard.hadamard_matrix(n)``; the reference is the O(n log n)
    transform of ``lowbit.hadamard``, computed in fp32 for half-precision inputs.
    """
    from .hadamard import hadamard_transform

    return hadamard_transform(x).contiguous()


@hadamard.register_fake
def _(x):
    return torch.empty_like(x)


# -- channel_split -----------------------------------------------------------------------

@torch.library.custom_op("lowbit::channel_split", mutates_args=())
def channel_split(x: torch.Tensor, index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Outlier channel split: ``y[..., i] = x[..., index[i]] * scale[i]`` (a gather with
    per-channel scales; the scales are 1 or 1/2, exact in every float type)."""
    return x.index_select(-1, index) * scale.to(x.dtype)


@channel_split.register_fake
def _(x, index, scale):
    return x.new_empty((*x.shape[:-1], index.shape[0]))
