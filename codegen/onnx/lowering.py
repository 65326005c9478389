"""ONNX lowering of the lowbit ops: onnxscript translations for ``torch.onnx.export``.

Each function here is a ``custom_translation_table`` entry for
``torch.onnx.export(..., dynamo=True)``: it receives the op's tensor arguments as
symbolic ONNX values (its scalar arguments as Python values) and records ONNX nodes
that compute exactly what the reference op in :mod:`lowbit.ops` computes. The
arithmetic is the one written in :mod:`lowbit.formats`; it is repeated here step by
step, with the same fp32 operations in the same order, so that quantized codes and
scales agree bit for bit with the reference on onnxruntime:

Activation quantization (``quantize_act``), per row of the last dimension, groups of G::

    g        = x viewed as [..., K/G, G]                      (fp32)
    s        = max(max(max(g), 0) / hi, min(min(g), 0) / lo)  (two IEEE divisions)
    e4m3:  global = max_groups(s) / scale_max,  safe = global if global > 0 else 1
           stored = e4m3_rne(min(fp32(s / safe) * 1.0625, scale_max)),  eff = fp32(stored) * safe
    fp16:  stored = fp16_rne(s), eff = fp32(stored);   fp32: stored = eff = s
    q      = clamp(round_half_even(g / eff), qmin, qmax)   (grid "int"; floor for "half")
    q      = 0 where eff == 0

``Round`` in ONNX rounds half to even and ``Cast`` to FLOAT8E4M3FN / FLOAT16 rounds to
nearest even, like ``torch.round`` and ``Tensor.to``; ``Div`` is an IEEE division in
onnxruntime, as in torch.

Linear sites (``qlinear``): ``y = Qa(x) @ W^T + b`` where ``Qa`` is the quantize /
dequantize round trip above (``(q [+ 0.5]) * eff``) or the identity (W*A16), and
``W = (q_w [+ 0.5]) * fp32(stored_w) * global_w`` per group of G along K. Three weight
kernels are available (:data:`WEIGHT_KERNELS`):

* ``"nbits4"`` (default): ``com.microsoft.MatMulNBits`` with 4-bit operands. The file
  keeps lowbit's packed uint8 codes (2 bits per weight at W2) and the E4M3 scales; a
  256-entry table (Gather) turns each byte of four 2-bit codes into two bytes of 4-bit
  offset codes ``q + 8``, and ``Cast(stored) * global`` gives the fp32 block scales.
  Those nodes read initializers only, so onnxruntime folds them once when the session
  is created (4 bits + 2 bits of scale per weight in memory) and MatMulNBits then runs
  its fast 4-bit kernel. Exact: ``(u - 8) * scale == q * eff``.
* ``"nbits"``: MatMulNBits at the format's own width (2-bit codes ``q + 2``, obtained
  from two's complement by flipping the high bit of each field: ``byte ^ 0xAA``).
  Smallest in memory; onnxruntime 1.32 has no fast 2-bit CPU kernel (15-20x slower than
  4-bit at M=1 on SmolLM2's shapes: docs/benchmarks.md, "ONNX on CPU").
* ``"dq"``: standard ops only (unpack, sign-extend, multiply by scales, MatMul); used for
  formats MatMulNBits cannot express (the ``half`` grid, group sizes that are not a
  power of two >= 16). onnxruntime folds the dequantized weight into fp32 at load.

Not used: INT2 initializers for the opset-25 ``DequantizeLinear`` (then ``MatMul``).
onnxruntime fuses that pair into the same 2-bit MatMulNBits kernel as ``"nbits"``, so it
runs as slowly, and it needs opset 25 / IR version 13 (``bench/onnx_cpu.py --kernels``).

``hadamard`` lowers to the same butterfly stages as :func:`lowbit.hadamard.hadamard_transform`
(bitwise identical for powers of two) followed by the small ``H_m`` MatMul for
``n = m * 2^k``; ``channel_split`` to ``Gather`` and ``Mul``.

Session option: onnxruntime's ``session.qdq_matmulnbits_accuracy_level`` and the
MatMulNBits ``accuracy_level`` attribute (0 here: fp32 compute) must stay at fp32
compute, or onnxruntime quantizes activations to int8 inside the product.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnxscript import ir
from onnxscript import opset23 as op
from onnxscript.values import Op, Opset

OPSET = 23
WEIGHT_KERNELS = ("nbits4", "nbits", "dq")
E4M3_MAX = 448.0
SCALE_ROUND_UP = 1.0625
MSFT_DOMAIN = "com.microsoft"

# The weight kernel used by translations; set by :func:`translation_table`.
_settings = {"weight_kernel": "nbits4", "accuracy_level": 0}


# -- com.microsoft.MatMulNBits ------------------------------------------------------

def _matmulnbits_schema() -> onnx.defs.OpSchema:
    """The signature of onnxruntime's contrib op (not registered globally: only the
    onnxscript Op object below knows it, so the exporter can record the node)."""
    S = onnx.defs.OpSchema
    P = S.FormalParameter
    opt = S.FormalParameterOption.Optional
    return S(
        "MatMulNBits", MSFT_DOMAIN, 1,
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"),
                P("zero_points", "T3", param_option=opt), P("g_idx", "T4", param_option=opt),
                P("bias", "T1", param_option=opt)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""),
                          ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[S.Attribute("K", S.AttrType.INT, required=True),
                    S.Attribute("N", S.AttrType.INT, required=True),
                    S.Attribute("bits", S.AttrType.INT, required=True),
                    S.Attribute("block_size", S.AttrType.INT, required=True),
                    S.Attribute("accuracy_level", S.AttrType.INT, required=False)],
    )


_MSFT = Opset(MSFT_DOMAIN, 1)
MatMulNBits = Op(_MSFT, "MatMulNBits", _matmulnbits_schema())


# -- helpers ---------------------------------------------------------------------------

def _const(value, dtype) -> ir.Value:
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))


def _f32(value) -> ir.Value:
    return _const(value, np.float32)


def _i64(value) -> ir.Value:
    return _const(value, np.int64)


def _last_dim(x) -> int:
    dim = x.shape[-1] if x.shape is not None else None
    if not isinstance(dim, int):
        raise ValueError("lowbit ONNX lowering needs a static last (reduction) dimension")
    return dim


def _level(bits: int, grid: str) -> tuple[int, int, float, float]:
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    half = 0.5 if grid == "half" else 0.0
    return qmin, qmax, qmin + half, qmax + half


def _scale_max(bits: int) -> float:
    return E4M3_MAX / 2 if bits <= 2 else E4M3_MAX


def _grouped(x, k: int, group_size: int):
    """x [..., K] -> [..., K/G, G] (leading dimensions kept symbolic)."""
    lead = op.Shape(x, start=0, end=-1)
    return op.Reshape(x, op.Concat(lead, _i64([k // group_size, group_size]), axis=0))


# -- activation quantization ---------------------------------------------------------

def quantize_groups(x, k: int, bits: int, grid: str, group_size: int, scale_dtype: str, clip: float = 1.0):
    """Record the quantization of fp32 ``x`` [..., K] (K static, a multiple of G); ``clip``: the
    activation clip ratio, which multiplies the global scale once the stored scales are encoded.

    Returns ``(q, stored, global_scale, eff)``: codes as fp32 integers [..., K/G, G],
    stored scales [..., K/G] (FLOAT8E4M3FN, FLOAT16 or FLOAT), the fp32 global scale
    [..., 1] and the fp32 effective scales [..., K/G]; see the module docstring.
    """
    if k % group_size:
        raise ValueError(f"last dimension {k} is not a multiple of the group size {group_size}")
    qmin, qmax, lo, hi = _level(bits, grid)
    g = _grouped(x, k, group_size)
    zero = _f32(0.0)
    pos = op.Div(op.Max(op.ReduceMax(g, _i64([-1]), keepdims=0), zero), _f32(hi))
    neg = op.Div(op.Min(op.ReduceMin(g, _i64([-1]), keepdims=0), zero), _f32(lo))
    s = op.Abs(op.Max(pos, neg))  # s >= 0; Abs makes an all-zero group's -0 a +0
    if scale_dtype == "e4m3":
        smax = _f32(_scale_max(bits))
        gscale = op.Div(op.ReduceMax(s, _i64([-1]), keepdims=1), smax)
        safe = op.Where(op.Greater(gscale, zero), gscale, _f32(1.0))
        ratio = op.Min(op.Mul(op.Div(s, safe), _f32(SCALE_ROUND_UP)), smax)
        stored = op.Cast(ratio, to=ir.DataType.FLOAT8E4M3FN)
        eff = op.Mul(op.Cast(stored, to=ir.DataType.FLOAT), safe)
    elif scale_dtype == "fp16":
        stored = op.Cast(s, to=ir.DataType.FLOAT16)
        eff = op.Cast(stored, to=ir.DataType.FLOAT)
        safe = op.Expand(_f32(1.0), op.Concat(op.Shape(x, start=0, end=-1), _i64([1]), axis=0))
    elif scale_dtype == "fp32":
        stored = eff = s
        safe = op.Expand(_f32(1.0), op.Concat(op.Shape(x, start=0, end=-1), _i64([1]), axis=0))
    else:
        raise ValueError(f"unknown scale dtype {scale_dtype!r}")
    if clip != 1.0:
        safe = op.Mul(safe, _f32(clip))
        eff = op.Mul(op.Cast(stored, to=ir.DataType.FLOAT), safe)
    is_zero = op.Unsqueeze(op.Equal(eff, zero), _i64([-1]))
    den = op.Where(is_zero, _f32(1.0), op.Unsqueeze(eff, _i64([-1])))
    r = op.Div(g, den)
    r = op.Floor(r) if grid == "half" else op.Round(r)
    q = op.Clip(r, _f32(qmin), _f32(qmax))
    q = op.Where(is_zero, zero, q)
    return q, stored, safe, eff


def dequantize_groups(q, eff, grid: str):
    """Values ``(q [+ 0.5]) * eff`` of grouped codes q [..., K/G, G] (fp32)."""
    if grid == "half":
        q = op.Add(q, _f32(0.5))
    return op.Mul(q, op.Unsqueeze(eff, _i64([-1])))


def quantize_act(x, bits: int, grid: str, group_size: int, scale_dtype: str, clip: float = 1.0):
    """Translation of ``torch.ops.lowbit.quantize_act``: (codes int8, stored scales, global)."""
    xf = op.Cast(x, to=ir.DataType.FLOAT)
    q, stored, gscale, _ = quantize_groups(xf, _last_dim(x), bits, grid, group_size, scale_dtype, clip)
    codes = op.Cast(op.Reshape(q, op.Shape(x)), to=ir.DataType.INT8)
    return codes, stored, gscale


def fake_quantize(xf, k: int, bits: int, grid: str, group_size: int, scale_dtype: str, clip: float = 1.0):
    """fp32 ``Qa(x)``: quantize and dequantize x [..., K] with the activation format."""
    q, _, _, eff = quantize_groups(xf, k, bits, grid, group_size, scale_dtype, clip)
    return op.Reshape(dequantize_groups(q, eff, grid), op.Shape(xf))


# -- weights -----------------------------------------------------------------------------

def _container_bits(bits: int) -> int:
    return 1 << math.ceil(math.log2(bits)) if bits > 1 else 1


def _nbits4_table() -> np.ndarray:
    """[256, 2] uint8: a byte of four 2-bit two's complement codes -> two bytes of 4-bit
    offset codes ``q + 8`` (element order kept: lowest index in the lowest bits)."""
    b = np.arange(256)
    f = lambda c: ((c ^ 2) - 2) + 8  # sign-extend the 2-bit field, add the offset  # noqa: E731
    fields = [f((b >> (2 * i)) & 3) for i in range(4)]
    return np.stack([fields[0] | fields[1] << 4, fields[2] | fields[3] << 4], -1).astype(np.uint8)


def weight_kernel_for(bits: int, grid: str, group_size: int, requested: str) -> str:
    """The kernel actually used for a weight format (falls back to "dq" when MatMulNBits
    cannot express the format)."""
    if requested not in WEIGHT_KERNELS:
        raise ValueError(f"weight_kernel must be one of {WEIGHT_KERNELS}, got {requested!r}")
    nbits_ok = grid == "int" and bits in (2, 3, 4, 8) and group_size >= 16 and group_size & (group_size - 1) == 0
    if requested == "dq" or not nbits_ok:
        return "dq"
    if requested == "nbits4" and bits not in (2, 3, 4):
        return "nbits"
    return requested


def _weight_scales(w_scales, w_global):
    """fp32 effective weight scales [N, K/G] = fp32(stored) * global."""
    return op.Mul(op.Cast(w_scales, to=ir.DataType.FLOAT), op.Cast(w_global, to=ir.DataType.FLOAT))


def dequantize_weight(w_packed, w_scales, w_global, bits: int, grid: str, group_size: int, n: int, kp: int):
    """fp32 W [N, Kp] from packed codes with standard ops (the "dq" kernel)."""
    c = _container_bits(bits)
    per_byte = 8 // c
    shifts = _const(np.arange(per_byte) * c, np.uint8)
    fields = op.BitwiseAnd(op.BitShift(op.Unsqueeze(w_packed, _i64([-1])), shifts, direction="RIGHT"),
                           _const(np.uint8((1 << c) - 1), np.uint8))
    u = op.Cast(fields, to=ir.DataType.INT32)
    sign = _const(np.int32(1 << (c - 1)), np.int32)
    q = op.Sub(op.BitwiseXor(u, sign), sign)  # sign-extend a c-bit two's complement field
    qf = op.Reshape(op.Cast(q, to=ir.DataType.FLOAT), _i64([n, kp // group_size, group_size]))
    w = dequantize_groups(qf, _weight_scales(w_scales, w_global), grid)
    return op.Reshape(w, _i64([n, kp]))


def _nbits_operands(w_packed, w_scales, w_global, bits: int, group_size: int, n: int, kp: int, kernel: str):
    """(B, scales, bits) for MatMulNBits from lowbit's packed codes (see module docstring)."""
    blocks = kp // group_size
    scales = _weight_scales(w_scales, w_global)
    if kernel == "nbits4" and bits == 2:
        table = _const(_nbits4_table(), np.uint8)
        b = op.Gather(table, op.Cast(w_packed, to=ir.DataType.INT32), axis=0)  # [N, Kp/4, 2]
        return op.Reshape(b, _i64([n, blocks, group_size // 2])), scales, 4
    c = _container_bits(bits)
    flip = {2: 0xAA, 4: 0x88, 8: 0x80}[c]  # two's complement -> offset binary, per field
    b = op.BitwiseXor(w_packed, _const(np.uint8(flip), np.uint8))
    return op.Reshape(b, _i64([n, blocks, group_size * c // 8])), scales, c


def qlinear(x, w_packed, w_scales, w_global, bias, w_bits: int, w_grid: str, group_size: int,
            w_scale_dtype: str, a_bits: int, a_grid: str, a_group_size: int, a_scale_dtype: str,
            a_clip: float = 1.0):
    """Translation of ``torch.ops.lowbit.qlinear``: ``y = Qa(x) @ W[:, :K]^T + bias``."""
    k = _last_dim(x)
    n = w_packed.shape[0]
    kp = w_scales.shape[-1] * group_size
    kernel = weight_kernel_for(w_bits, w_grid, group_size, _settings["weight_kernel"])
    xf = op.Cast(x, to=ir.DataType.FLOAT)
    if kp > k:  # zero columns meet the padding of W (or its ignored columns): adds exact zeros
        zeros = op.Concat(op.Shape(xf, start=0, end=-1), _i64([kp - k]), axis=0)
        xf = op.Concat(xf, op.Expand(_f32(0.0), zeros), axis=-1)
    if a_bits:
        xf = fake_quantize(xf, kp, a_bits, a_grid, a_group_size, a_scale_dtype, a_clip)
    if kernel == "dq":
        w = dequantize_weight(w_packed, w_scales, w_global, w_bits, w_grid, group_size, n, kp)
        y = op.MatMul(xf, op.Transpose(w, perm=[1, 0]))
    else:
        b, scales, nbits = _nbits_operands(w_packed, w_scales, w_global, w_bits, group_size, n, kp, kernel)
        y = MatMulNBits(xf, b, scales, K=kp, N=n, bits=nbits, block_size=group_size,
                        accuracy_level=_settings["accuracy_level"])
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=ir.DataType.FLOAT))
    if x.dtype != ir.DataType.FLOAT:
        y = op.CastLike(y, x)
    return y


# -- prologues -----------------------------------------------------------------------------

def _hadamard_base(m: int) -> np.ndarray:
    """``H_m`` (entries +-1) for a base size m: ``hadamard_matrix(m) = kron(H_m, S_1)``."""
    import torch

    from lowbit.hadamard import hadamard_matrix

    return hadamard_matrix(m, dtype=torch.float32).numpy()


def hadamard(x):
    """Translation of ``torch.ops.lowbit.hadamard``: ``x @ H_n^T / sqrt(n)``.

    The Sylvester part runs as log2(p) butterfly stages ``(u, w) -> (u + w, u - w)`` over
    the same index pairs as the reference (so powers of two match it bit for bit), the
    base ``H_m`` (m in 12, 20, 28, ...) as one MatMul, then the fp32 scale.
    """
    from lowbit.hadamard import decompose

    n = _last_dim(x)
    m, p = decompose(n)
    lead = op.Shape(x, start=0, end=-1)
    y = op.Cast(x, to=ir.DataType.FLOAT)
    h = 1
    while h < p:
        v = op.Reshape(y, op.Concat(lead, _i64([m, p // (2 * h), 2, h]), axis=0))
        u, w = op.Split(v, num_outputs=2, axis=-2)
        y = op.Concat(op.Add(u, w), op.Sub(u, w), axis=-2)
        h *= 2
    y = op.Reshape(y, op.Concat(lead, _i64([m, p]), axis=0))
    if m > 1:
        y = op.MatMul(_const(_hadamard_base(m), np.float32), y)
    y = op.Mul(y, _f32(np.float32(1.0 / math.sqrt(n))))
    y = op.Reshape(y, op.Shape(x))
    return y if x.dtype == ir.DataType.FLOAT else op.CastLike(y, x)


def channel_split(x, index, scale):
    """Translation of ``torch.ops.lowbit.channel_split``: ``x[..., index] * scale``."""
    return op.Mul(op.Gather(x, index, axis=-1), op.CastLike(scale, x))


# -- table ---------------------------------------------------------------------------------

def translation_table(weight_kernel: str = "nbits4", accuracy_level: int = 0) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: every lowbit op.

    ``weight_kernel``: see :data:`WEIGHT_KERNELS`. ``accuracy_level``: MatMulNBits'
    attribute; 0 (the default) computes in fp32, 4 quantizes activations to int8 inside
    the product (faster, not exact).
    """
    import torch

    from lowbit import ops  # noqa: F401  (registers torch.ops.lowbit)

    if weight_kernel not in WEIGHT_KERNELS:
        raise ValueError(f"weight_kernel must be one of {WEIGHT_KERNELS}, got {weight_kernel!r}")
    _settings["weight_kernel"] = weight_kernel
    _settings["accuracy_level"] = int(accuracy_level)
    lowbit = torch.ops.lowbit
    return {
        lowbit.quantize_act.default: quantize_act,
        lowbit.qlinear.default: qlinear,
        lowbit.hadamard.default: hadamard,
        lowbit.channel_split.default: channel_split,
    }
