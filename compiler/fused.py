"""Horizontally fused linear sites in a module tree: ``lowbit.fused.FusedSlice``.

The ``fuse`` pass (``lowbit.passes.fuse``) joins linear sites that read the same
activation (q/k/v; gate/up) into one site whose weight is the row concatenation
``W = [W_1; W_2; ...]`` (and bias ``[b_1; b_2; ...]``, zeros where a member had none), so
``y = x W^T + b`` holds every member's output in consecutive column ranges:
``y_i = y[..., start_i:stop_i]``. After quantization that site is one ``QuantLinear`` (one
GEMM, one activation quantization, one global weight scale for the group).

In the graph the members become slices of the fused node. A Hugging Face model keeps its
own ``forward``, which calls each member module with the same activation tensor, so
materialization puts

* the fused site module at a new sibling name (``self_attn.fused_q_proj_k_proj_v_proj``),
* a :class:`FusedSlice` at each member's name (``self_attn.q_proj``...).

``FusedSlice.forward(x)`` looks up the fused site in its parent module by name and returns
its slice of ``fused(x)``. The first member called with a tensor computes ``fused(x)``
once and leaves it on the fused module; a sibling called with the very same tensor object
(same ``_version``, so not modified in place since; under ``torch.compile``, where reading
``_version`` breaks the graph, the identity alone) takes its slice of that output; when
every member of the group has taken its slice the stored output is dropped. A member
called with another tensor (or alone) computes ``fused(x)`` itself, so the result is
always ``fused(x)[..., start:stop]`` whatever the call order. Slices are views (the last
dimension is contiguous within them, so ``.view(..., heads, head_dim)`` works).

A FusedSlice holds no tensors; its config names the fused sibling, so artifacts save and
rebuild it like any site module. It finds its parent when it is put into a module
(a module-registration hook, installed when this module is imported, records the parent),
which covers ``lowbit.load``, ``set_submodule`` and ``materialize``;
:func:`link_fused_sites` does the same explicitly for a whole model and checks that every
fused sibling is there. The fused sibling is looked up by name at every call, so replacing
it (``lowbit.freeze`` after QAT) needs no relinking.
"""
from __future__ import annotations

import torch
from torch import nn

from .sites import register_site_module

_CACHE = "_lowbit_fused_cache"
_PARENT = "_lowbit_parent"


@register_site_module
class FusedSlice(nn.Module):
    """Member ``index`` (of ``members``) of a fused group: ``fused(x)[..., start:stop]``,
    ``fused`` being the sibling module named ``fused`` in the same parent."""

    def __init__(self, fused: str, start: int, stop: int, index: int = 0, members: int = 1):
        super().__init__()
        if "." in fused or not fused:
            raise ValueError(f"FusedSlice: the fused site must be a sibling name, got {fused!r}")
        if not 0 <= start < stop:
            raise ValueError(f"FusedSlice: bad slice {start}:{stop}")
        if not 0 <= index < members:
            raise ValueError(f"FusedSlice: member {index} of {members}")
        self.fused, self.start, self.stop = fused, int(start), int(stop)
        self.index, self.members = int(index), int(members)
        self.out_features = self.stop - self.start

    # -- the parent and the fused site ---------------------------------------------------
    def attach(self, parent: nn.Module) -> None:
        """Record the module holding this slice (not registered: no cycle in the module tree)."""
        object.__setattr__(self, _PARENT, parent)

    def fused_module(self) -> nn.Module:
        parent = self.__dict__.get(_PARENT)
        fused = None if parent is None else parent._modules.get(self.fused)
        if fused is None:
            where = "it is not attached to a parent module" if parent is None else \
                f"its parent {type(parent).__name__} has no submodule {self.fused!r}"
            raise RuntimeError(f"FusedSlice of fused site {self.fused!r}: {where}; put it into the module "
                               "tree with set_submodule / setattr next to its fused site, or call "
                               "lowbit.fused.link_fused_sites(model)")
        return fused

    @property
    def in_features(self) -> int:
        return getattr(self.fused_module(), "in_features")

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused_module()
        full = (1 << self.members) - 1
        cache = fused.__dict__.get(_CACHE)
        version = None if torch.compiler.is_compiling() else x._version
        if cache is not None and cache[0] is x and cache[1] == version:
            out, taken = cache[2], cache[3] | (1 << self.index)
        else:
            out, taken = fused(x), 1 << self.index
        # what is left for the siblings (nothing once every member has taken its slice)
        fused.__dict__[_CACHE] = None if taken == full else (x, version, out, taken)
        return out[..., self.start:self.stop]

    # -- artifacts -------------------------------------------------------------------------
    def config(self) -> dict:
        return {"fused": self.fused, "start": self.start, "stop": self.stop,
                "index": self.index, "members": self.members}

    @classmethod
    def from_config(cls, cfg: dict) -> "FusedSlice":
        return cls(cfg["fused"], cfg["start"], cfg["stop"], cfg.get("index", 0), cfg.get("members", 1))

    def extra_repr(self) -> str:
        return f"{self.fused}[..., {self.start}:{self.stop}] (member {self.index} of {self.members})"


def clear_fused_caches(model: nn.Module) -> None:
    """Drop outputs that fused sites hold for siblings not yet called (after an interrupted forward)."""
    for m in model.modules():
        if m.__dict__.get(_CACHE) is not None:
            m.__dict__[_CACHE] = None


def link_fused_sites(model: nn.Module) -> int:
    """Attach every FusedSlice of ``model`` to its parent and check its fused sibling exists.
    Returns the number of slices."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, FusedSlice):
            parent_name = name.rpartition(".")[0]
            m.attach(model.get_submodule(parent_name) if parent_name else model)
            m.fused_module()  # raises if the fused sibling is missing
            n += 1
    return n


def _on_register(parent: nn.Module, name: str, module: nn.Module):
    if isinstance(module, FusedSlice):
        module.attach(parent)
    return None


torch.nn.modules.module.register_module_module_registration_hook(_on_register)
