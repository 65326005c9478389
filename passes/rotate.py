"""rotate: orthogonal rotations that leave the float function unchanged (QuaRot/SpinQuant style).

Rotations spread outlier channels over many channels, which makes 2- to 4-bit
quantization of weights and activations far less lossy, while the float model computes
the same function.

R1, the residual stream. With folded norms (unit scale; see ``fold_norms``), RMSNorm
commutes with any orthogonal ``Q``: ``rms(xQ) = rms(x)``, so ``norm(xQ) = norm(x) Q``.
If the whole residual stream is carried rotated, ``r' = r Q``, then
* the embedding becomes ``E' = E Q``;
* every reader ``y = norm(r) W^T`` becomes ``W' = W Q`` (``norm(r) Q Q^T W^T = norm(r) W^T``);
* every writer ``r += y`` with ``y = a W^T + b`` becomes ``W' = Q^T W``, ``b' = b Q``.
``Q`` is a randomized Hadamard matrix ``H diag(s) / sqrt(d)`` when ``d`` is a supported
Hadamard size (``lowbit.hadamard``), else a seeded random orthogonal matrix.

R2, per attention head. With ``R`` orthogonal of the head size, each value head becomes
``v_h R``: ``W_v,h' = R^T W_v,h`` and ``b_v,h' = b_v,h R``. Attention mixes value rows,
so each head's output is ``(P v_h) R``, and the output projection's block for that head
becomes ``W_o,h' = W_o,h R``. One ``R`` for every head keeps it exact under grouped-query
attention (a value head shared by several query heads).

Online Hadamard (R4 by default: the MLP down projections). For a site chosen by name,
``x -> hadamard(x) = x H^T / sqrt(n)`` runs in the site's prologue
(``torch.ops.lowbit.hadamard``) and the weight takes the inverse: ``W' = W H^T / sqrt(n)``,
so ``hadamard(x) W'^T = x W^T``. Sizes: powers of two times 1, 12, 20, 28, 36, 44 or 60.

Invariants: only parameters change (new tensors; tied weights come apart where they
must) plus, for online sites, the site becomes a ``PrologueLinear`` call; the structure
is read from the graph (``lowbit.passes.structure``), and a graph without it is refused.
With calibration data in the context, the pass checks that the output is unchanged
(relative difference below ``verify_tol``) and raises otherwise.
"""
from __future__ import annotations

import fnmatch
import math
import warnings

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils import _pytree as pytree

from lowbit.hadamard import hadamard_transform, random_hadamard_matrix, supported_hadamard_size
from lowbit.pass_manager import CompileContext, LowbitPass
from lowbit.passes.fold_norms import fold_norm_scales
from lowbit.passes.structure import StructureError, find_attention_pairs, find_residual_stream
from lowbit.passes.weights import (
    call_module_in_place_of, erase_unused_get_attrs, get_attr_path, install_module, set_param)
from lowbit.prologue import HadamardPrologue, PrologueLinear
from lowbit.capture import find_linear_sites


def orthogonal_matrix(n: int, seed: int) -> torch.Tensor:
    """A seeded orthogonal n x n matrix (float64): randomized Hadamard where possible."""
    if supported_hadamard_size(n):
        return random_hadamard_matrix(n, seed)
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _first_tensor(out):
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


class RotatePass(LowbitPass):
    name = "rotate"

    def __init__(self, context: CompileContext | None = None, r1: bool = True, r2: bool = True,
                 online: list[str] | tuple = ("*down_proj",), seed: int = 0, verify: bool = True,
                 verify_tol: float = 1e-3, online_unsupported: str = "skip"):
        """``online_unsupported``: "skip" (warn, leave the site unrotated) or "error" for
        sites chosen by ``online`` whose width has no Hadamard transform."""
        super().__init__(context)
        if online_unsupported not in ("skip", "error"):
            raise ValueError("online_unsupported must be 'skip' or 'error'")
        self.online_unsupported = online_unsupported
        self.r1, self.r2, self.online = r1, r2, list(online)
        self.seed, self.verify, self.verify_tol = seed, verify, verify_tol
        self.details: dict = {}

    # -- the three rotations ---------------------------------------------------------
    def apply_r1(self, gm) -> dict:
        stream = find_residual_stream(gm)
        fold_norm_scales(gm, stream)
        emb = get_attr_path(gm, stream.embedding_weight).detach()
        q = orthogonal_matrix(stream.width, self.seed).to(emb.device)
        set_param(gm, stream.embedding_weight, emb.double() @ q)
        for site in stream.readers:
            w = get_attr_path(gm, site.weight).detach()
            set_param(gm, site.weight, w.double() @ q)
        for site in stream.writers:
            w = get_attr_path(gm, site.weight).detach()
            set_param(gm, site.weight, q.T @ w.double())
            if site.bias:
                b = get_attr_path(gm, site.bias).detach()
                set_param(gm, site.bias, b.double() @ q)
        return {"r1_width": stream.width, "r1_hadamard": supported_hadamard_size(stream.width),
                "r1_readers": len(stream.readers), "r1_writers": len(stream.writers)}

    def apply_r2(self, gm) -> dict:
        pairs = find_attention_pairs(gm)
        for i, pair in enumerate(pairs):
            hd = pair.head_dim
            wv = get_attr_path(gm, pair.value.weight).detach().double()
            r = orthogonal_matrix(hd, self.seed + 1).to(wv.device)
            if wv.shape[0] % hd:
                raise StructureError(f"{pair.value.name}: {wv.shape[0]} outputs are not a multiple of the head size {hd}")
            heads_v = wv.reshape(-1, hd, wv.shape[1])
            set_param(gm, pair.value.weight, torch.einsum("ji,hjd->hid", r, heads_v).reshape(wv.shape))
            if pair.value.bias:
                bv = get_attr_path(gm, pair.value.bias).detach().double()
                set_param(gm, pair.value.bias, (bv.reshape(-1, hd) @ r).reshape(-1))
            wo = get_attr_path(gm, pair.output.weight).detach().double()
            if wo.shape[1] % hd:
                raise StructureError(f"{pair.output.name}: {wo.shape[1]} inputs are not a multiple of the head size {hd}")
            set_param(gm, pair.output.weight, (wo.reshape(wo.shape[0], -1, hd) @ r).reshape(wo.shape))
        return {"r2_pairs": len(pairs), "r2_head_dim": pairs[0].head_dim if pairs else None}

    def apply_online(self, gm) -> dict:
        sites = find_linear_sites(gm)
        chosen = [s for name, s in sites.items() if any(fnmatch.fnmatchcase(name, p) for p in self.online)]
        nodes = {n.name: n for n in gm.graph.nodes}
        skipped = []
        for site in chosen:
            n = site.in_features
            if not supported_hadamard_size(n):
                msg = (f"{site.name}: no Hadamard transform of size {n} "
                       "(supported: 2^k times 1, 12, 20, 28, 36, 44 or 60)")
                if self.online_unsupported == "error":
                    raise StructureError(msg)
                warnings.warn(msg + "; the site keeps no online rotation")
                skipped.append(site.name)
                continue
            node = nodes[site.node]
            w = get_attr_path(gm, site.weight).detach()
            new_w = hadamard_transform(w.double())  # W H^T / sqrt(n)
            existing = get_attr_path(gm, site.name) if node.op == "call_module" else None
            if isinstance(existing, PrologueLinear):
                existing.prologue.append(HadamardPrologue(n))
                set_param(gm, f"{site.name}.weight", new_w)
                continue
            bias = get_attr_path(gm, site.bias).detach() if site.bias else None
            module = PrologueLinear.wrap(new_w.to(w.dtype), bias, [HadamardPrologue(n)])
            install_module(gm, site.name, module)
            call_module_in_place_of(gm, node, site.name)
        erase_unused_get_attrs(gm)
        gm.graph.lint()
        gm.recompile()
        return {"online_sites": len(chosen) - len(skipped), "online_skipped": skipped}

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        ref = None
        calib = self.context.calibration
        if self.verify and calib:
            with torch.no_grad():
                ref = _first_tensor(gm(*calib[0])).double()
        details = {}
        if self.r1:
            details.update(self.apply_r1(gm))
        if self.r2:
            details.update(self.apply_r2(gm))
        if self.online:
            details.update(self.apply_online(gm))
        if ref is not None:
            with torch.no_grad():
                out = _first_tensor(gm(*calib[0])).double()
            rel = ((out - ref).norm() / ref.norm()).item()
            details["verify_rel_diff"] = rel
            if not math.isfinite(rel) or rel > self.verify_tol:
                raise StructureError(f"rotation changed the model's output (relative difference {rel:.2e}); "
                                     "its structure is not what the rotation pass assumes")
        self.details = details
        return PassResult(gm, True)
