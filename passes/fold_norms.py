"""fold_norms: fold RMSNorm scales into the linear sites that read the normalized value.

Math. An RMSNorm computes ``n(x) = x / rms(x) * gamma`` and each reader computes
``n(x) @ W^T + b``. Since ``(u * gamma) @ W^T = u @ (W diag(gamma))^T``, the pass sets
``W' = W diag(gamma)`` for every reader and ``gamma' = 1``. Exact in real arithmetic; in
float the products are formed in float64 and rounded once.

Invariants:
* the graph's nodes are unchanged; only parameters are replaced (never edited in place),
  so a weight tied to another (a classifier tied to the embedding) comes apart here;
* afterwards every norm of the residual stream has a unit scale, which the rotation
  pass relies on (an RMSNorm without scale commutes with orthogonal maps).

The norms and readers come from :func:`lowbit.passes.structure.find_residual_stream`;
a graph without that structure is refused with a :class:`StructureError`.
"""
from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from lowbit.pass_manager import CompileContext, LowbitPass
from lowbit.passes.structure import ResidualStream, find_residual_stream
from lowbit.passes.weights import get_attr_path, set_param


def fold_norm_scales(gm: torch.fx.GraphModule, stream: ResidualStream) -> int:
    """Fold every norm scale of ``stream`` into its readers; returns how many were folded."""
    folded = 0
    for norm in stream.norms:
        if norm.weight is None:
            continue
        gamma = get_attr_path(gm, norm.weight).detach().double()
        if torch.all(gamma == 1):
            continue
        for site in norm.readers:
            w = get_attr_path(gm, site.weight).detach()
            set_param(gm, site.weight, w.double() * gamma[None, :])
        set_param(gm, norm.weight, torch.ones_like(gamma))
        folded += 1
    return folded


class FoldNormsPass(LowbitPass):
    name = "fold_norms"

    def __init__(self, context: CompileContext | None = None):
        super().__init__(context)
        self.details: dict = {}

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        stream = find_residual_stream(gm)
        folded = fold_norm_scales(gm, stream)
        self.details = {"norms": len(stream.norms), "folded": folded,
                        "readers": len(stream.readers)}
        return PassResult(gm, folded > 0)
