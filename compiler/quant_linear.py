"""``lowbit.QuantLinear``: a materialized quantized linear site.

A QuantLinear holds, for one linear site of the original model,
* its prologue: ops applied to the activation before the product (online Hadamard,
  channel split, ...), as modules whose numerics live in ``torch.ops.lowbit``;
* its packed weight (uint8 codes), group scales (E4M3 / fp16 / fp32) and fp32 global
  scale, as buffers, plus the optional bias;
* the activation format (dynamic per-token quantization) or none (W*A16).

``forward`` is the prologue followed by ``torch.ops.lowbit.qlinear``: the op dispatches
to the backend kernel for the tensor's device, the reference op being the definition (plain
eager calls reach that same kernel without the dispatcher: ``lowbit.ops.eager_kernel``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.lowbit)
from .formats import QFormat, QTensor, pack_codes, quantize_weight_rtn
from .sites import register_site_module


def padded_width(k: int, weight_format: QFormat, act_format: QFormat | None = None) -> int:
    """The stored width of a weight with k input features: a multiple of every group size
    and of the codes per byte. The padding columns are zeros, and the product ignores them
    (``torch.ops.lowbit.qlinear`` uses the first ``x.shape[-1]`` columns only)."""
    m = math.lcm(weight_format.group_size, 8 // weight_format.container_bits,
                 act_format.group_size if act_format else 1)
    return -(-k // m) * m


@register_site_module
class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_format: QFormat,
        act_format: QFormat | None = None,
        bias: bool = False,
        weight_in_features: int | None = None,
        prologue: list[nn.Module] | None = None,
        device=None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_in_features = weight_in_features or in_features
        self.weight_format = weight_format
        self.act_format = act_format
        self.packed_in_features = k = padded_width(self.weight_in_features, weight_format, act_format)
        per_byte = 8 // weight_format.container_bits
        self.register_buffer("weight_packed", torch.zeros(out_features, k // per_byte, dtype=torch.uint8, device=device))
        self.register_buffer(
            "weight_scales",
            torch.zeros(out_features, k // weight_format.group_size, device=device).to(weight_format.scale_torch_dtype),
        )
        self.register_buffer("weight_global", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, device=device))
        else:
            self.bias = None
        self.prologue = nn.ModuleList(prologue or [])

    # -- construction ----------------------------------------------------------------
    def set_weight(self, qt: QTensor, bias: torch.Tensor | None = None) -> None:
        if tuple(qt.codes.shape) != (self.out_features, self.packed_in_features):
            raise ValueError(f"codes of shape {tuple(qt.codes.shape)} for a site of padded weight shape "
                             f"{(self.out_features, self.packed_in_features)}")
        dev = self.weight_packed.device
        self.weight_packed = pack_codes(qt.codes, self.weight_format.bits).to(dev)
        self.weight_scales = qt.scales.to(dev)
        self.weight_global = qt.global_scale.reshape(()).float().to(dev)
        if bias is not None:
            self.bias = bias.detach().float().to(dev).clone()

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_format: QFormat,
        act_format: QFormat | None = None,
        in_features: int | None = None,
        prologue: list[nn.Module] | None = None,
        clip_search: bool = True,
        qtensor: QTensor | None = None,
    ) -> "QuantLinear":
        """Quantize a float weight [N, K'] (RTN with clipping search unless ``qtensor`` is given)."""
        n, k = weight.shape
        ql = cls(in_features or k, n, weight_format, act_format, bias is not None, weight_in_features=k,
                 prologue=prologue, device=weight.device)
        if qtensor is None:
            pad = ql.packed_in_features - k
            padded = torch.nn.functional.pad(weight.detach().float(), (0, pad)) if pad else weight
            qtensor = quantize_weight_rtn(padded, weight_format, clip_search=clip_search)
        qt = qtensor
        ql.set_weight(qt, bias)
        return ql

    # -- use ----------------------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        return ops.dequantize_weight(self.weight_packed, self.weight_scales, self.weight_global,
                                     self.weight_format, self.weight_in_features)  # [N, K'] (padding dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.prologue:
            x = op(x)
        w, a = self.weight_format, self.act_format
        args = (x, self.weight_packed, self.weight_scales, self.weight_global, self.bias,
                w.bits, w.grid, w.group_size, w.scale_dtype,
                a.bits if a else 0, a.grid if a else "int", a.group_size if a else w.group_size,
                a.scale_dtype if a else "e4m3", a.clip if a else 1.0)
        kernel = ops.eager_kernel("qlinear", x)  # plain eager: the op's own kernel, without the dispatcher
        if kernel is not None:
            return kernel(*args)
        return torch.ops.lowbit.qlinear(*args)

    def bits_per_weight(self) -> float:
        """Stored bits (codes, scales, global scale; padding and split channels included)
        per weight of the original site (out_features x in_features)."""
        stored = self.weight_format.bits_per_weight(self.out_features, self.packed_in_features)
        return stored * self.packed_in_features / self.in_features

    def config(self) -> dict:
        """What is needed, beside the buffers, to rebuild this module (artifact manifests)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "weight_in_features": self.weight_in_features,
            "weight_format": self.weight_format.to_dict(),
            "act_format": self.act_format.to_dict() if self.act_format else None,
            "bias": self.bias is not None,
            "prologue": [p.config() for p in self.prologue],
        }

    @classmethod
    def from_config(cls, cfg: dict, device=None) -> "QuantLinear":
        from .prologue import prologue_from_config

        return cls(
            cfg["in_features"], cfg["out_features"], QFormat.from_dict(cfg["weight_format"]),
            QFormat.from_dict(cfg["act_format"]) if cfg.get("act_format") else None,
            cfg["bias"], cfg["weight_in_features"],
            [prologue_from_config(p) for p in cfg.get("prologue", [])], device=device,
        )

    def extra_repr(self) -> str:
        a = self.act_format.name if self.act_format else "none"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight={self.weight_format.name}, act={a}, bias={self.bias is not None}")
