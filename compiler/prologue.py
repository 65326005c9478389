"""Prologue ops of a quantized linear site: modules applied to the activation in front
of the product (online Hadamard, channel split, ...).

Each prologue module wraps one ``torch.ops.lowbit`` op, and can describe itself with
``config()`` (a JSON-able dict with a ``"kind"`` key) so that artifacts rebuild it;
its tensors are buffers saved with the model's state dict.
"""
from __future__ import annotations

from torch import nn

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
