"""Prologue ops of a quantized linear site: modules applied to the activation in front
of the product (online Hadamard, channel split, ...).

Each prologue module wraps one ``torch.ops.lowbit`` op, and can describe itself with
``config()`` (a JSON-able dict with a ``"kind"`` key) so that artifacts rebuild it;
its tensors are buffers saved with the model's state dict.
"""
from __future__ import annotations

from torch import nn

from .sites import register_site_module

PROLOGUE_KINDS: dict[str, type] = {}


def register_prologue(kind: str):
    """Class decorator: make a prologue module rebuildable from its ``config()``."""

    def wrap(cls):
        cls.kind = kind
        PROLOGUE_KINDS[kind] = cls
        return cls

    return wrap


def prologue_from_config(cfg: dict) -> nn.Module:
    kind = cfg.get("kind")
    if kind not in PROLOGUE_KINDS:
        raise ValueError(f"unknown prologue kind {kind!r}; known: {sorted(PROLOGUE_KINDS)}")
    args = {k: v for k, v in cfg.items() if k != "kind"}
    return PROLOGUE_KINDS[kind](**args)


@register_prologue("hadamard")
class HadamardPrologue(nn.Module):
    """Online orthonormal Hadamard transform of the activation (``torch.ops.lowbit.hadamard``).

    The site's weight holds the inverse: ``W' = W H^T / sqrt(n)`` so that
    ``hadamard(x) @ W'^T == x @ W^T`` (``H H^T = n I``).
    """

    def __init__(self, size: int):
        super().__init__()
        from .hadamard import decompose

        decompose(size)  # raises a clear error for unsupported sizes
        self.size = size

    def forward(self, x):
        import torch

        if x.shape[-1] != self.size:
            raise ValueError(f"HadamardPrologue of size {self.size} got an activation of width {x.shape[-1]}")
        return torch.ops.lowbit.hadamard(x)

    def config(self) -> dict:
        return {"kind": "hadamard", "size": self.size}

    def extra_repr(self) -> str:
        return f"size={self.size}"


@register_site_module
class PrologueLinear(nn.Linear):
    """A float linear site with a prologue: ``linear(prologue(x))``.

    Passes that attach ops in front of a site (online rotations, channel splits) turn the
    site into a PrologueLinear; the quantize pass then carries the prologue into the
    QuantLinear, and materialization moves either into the original module tree.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, prologue=None,
                 weight_in_features: int | None = None, device=None, dtype=None):
        super().__init__(weight_in_features or in_features, out_features, bias, device=device, dtype=dtype)
        self.site_in_features = in_features
        self.prologue = nn.ModuleList(prologue or [])

    @classmethod
    def wrap(cls, linear_weight, bias, prologue) -> "PrologueLinear":
        import torch

        out_f, in_w = linear_weight.shape
        m = cls(in_w, out_f, bias is not None, prologue, device=linear_weight.device, dtype=linear_weight.dtype)
        with torch.no_grad():
            m.weight.copy_(linear_weight)
            if bias is not None:
                m.bias.copy_(bias)
        return m

    def forward(self, x):
        for op in self.prologue:
            x = op(x)
        return super().forward(x)

    def config(self) -> dict:
        return {"in_features": self.site_in_features, "out_features": self.out_features,
                "weight_in_features": self.in_features, "bias": self.bias is not None,
                "prologue": [p.config() for p in self.prologue]}

    @classmethod
    def from_config(cls, cfg: dict) -> "PrologueLinear":
        return cls(cfg["in_features"], cfg["out_features"], cfg["bias"],
                   [prologue_from_config(p) for p in cfg.get("prologue", [])], cfg["weight_in_features"])


@register_prologue("channel_split")
class ChannelSplitPrologue(nn.Module):
    """Duplicate chosen activation channels: ``x[..., index] * scale`` (``torch.ops.lowbit.channel_split``).

    ``index`` [out_features] lists, for each output channel, the input channel it copies;
    ``scale`` is 1 (weight splitting: the weight column is split in two) or 1/2 (activation
    splitting: the channel is halved and the weight column duplicated).
    """

    def __init__(self, in_features: int, out_features: int, index=None, scale=None):
        import torch

        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("index", torch.arange(out_features) % in_features if index is None
                             else torch.as_tensor(index, dtype=torch.long))
        self.register_buffer("scale", torch.ones(out_features) if scale is None
                             else torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x):
        import torch

        return torch.ops.lowbit.channel_split(x, self.index, self.scale)

    def config(self) -> dict:
        return {"kind": "channel_split", "in_features": self.in_features, "out_features": self.out_features}

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}"
