"""split_outliers: outlier channel splitting (OCS), rounding-aware.

A linear site ``y = x W^T`` (x: [.., K], W: [N, K]) gains m channels, chosen as its
outliers, so that the quantizers see smaller extremes; the site's prologue becomes
``x' = channel_split(x) = x[..., index] * scale`` with ``index = [0..K-1, j_1..j_m]``.

* Weight splitting (``mode="weight"``; channels with the largest ``max |W[:, j]|``):
  ``scale = 1``, column j becomes two columns ``w1 + w2 = W[:, j]``, so
  ``x_j w1 + x_j w2 = x_j W[:, j]``: an identity in float. Plain halving takes
  ``w1 = w2 = W[:, j] / 2``.
* Activation splitting (``mode="activation"``; channels with the largest calibration
  ``max |x_j|``): ``scale = 1/2`` for both copies and the column is duplicated:
  ``x_j/2 W_j + x_j/2 W_j = x_j W_j``.

The new width ``K' = K + m`` is rounded up to a multiple of the group sizes (and codes
per byte), so m is about ``expand_ratio * K``.

Rounding-aware weight splitting. Plain halves each round to their own grid, so their
quantized sum moves in steps of ``2s`` (both halves round the same way) instead of ``s``.
Instead, the pass first quantizes the plain-halved weight with the recipe's weight
format to fix every group's scale, then, for each split weight w with scales s1 (the
original column's group) and s2 (the copy's group), picks the code ``q1`` of the first
half among the integers within one grid step of ``w / (2 s1)`` that minimises
``|q1 s1 + Q_s2(w - q1 s1) - w|`` (``Q_s2``: rounding to the s2 grid, clamped); the float
halves are ``w1 = q1 s1`` and ``w2 = w - w1`` (still an exact split), and the quantized
weight is built on those fixed scales and handed to the quantize pass, so what was
optimised is what gets stored. A recipe with GPTQ quantizes the split site with GPTQ instead,
on the split inputs: GPTQ sees the calibration activations, these codes do not (at 2 bits on
SmolLM2 after rotation: 116.8 against 58,521 on the half grid; docs/qat.md).

Invariants: the site's float function is unchanged (up to fp32 rounding); only weights
of the chosen sites change and each gains a ``channel_split`` prologue (the site
becomes a ``PrologueLinear``); the report records per site the channels split.
"""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from lowbit.capture import find_linear_sites
from lowbit.formats import QFormat, QTensor, effective_scales, quantize_codes, quantize_weight_rtn
from lowbit.pass_manager import CompileContext, LowbitPass, SequentialCalibration
from lowbit.passes.weights import call_module_in_place_of, erase_unused_get_attrs, get_attr_path, install_module
from lowbit.prologue import ChannelSplitPrologue, PrologueLinear


def split_width(k: int, expand_ratio: float, multiple: int) -> int:
    """K' >= K * (1 + expand_ratio), a multiple of ``multiple``, with at least one new channel."""
    target = max(k + 1, math.ceil(k * (1 + expand_ratio)))
    return -(-target // multiple) * multiple


def rounding_aware_halves(w: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """First halves ``w1 = q1 * s1`` minimising the quantized-sum error (see module docstring).

    w, s1, s2: same shape (float64). Returns w1 (float64); the second half is w - w1.
    """
    lo, hi = fmt.qmin, fmt.qmax
    off = 0.5 if fmt.grid == "half" else 0.0
    safe1 = torch.where(s1 > 0, s1, torch.ones_like(s1))
    safe2 = torch.where(s2 > 0, s2, torch.ones_like(s2))
    centre = torch.floor(w / 2 / safe1) if fmt.grid == "half" else torch.round(w / 2 / safe1)
    best_w1, best_err = None, None
    for d in (-1, 0, 1):
        q1 = (centre + d).clamp(lo, hi)
        w1 = (q1 + off) * s1
        r = w - w1
        q2 = (torch.floor(r / safe2) if fmt.grid == "half" else torch.round(r / safe2)).clamp(lo, hi)
        err = ((q2 + off) * s2 + w1 - w).abs()
        if best_err is None:
            best_w1, best_err = w1, err
        else:
            better = err < best_err
            best_w1 = torch.where(better, w1, best_w1)
            best_err = torch.where(better, err, best_err)
    return torch.where((s1 > 0) & (s2 > 0), best_w1, w / 2)


class SplitOutliersPass(LowbitPass):
    name = "split_outliers"

    def __init__(self, context: CompileContext | None = None, mode: str = "weight", expand_ratio: float = 0.05,
                 rounding_aware: bool = True, sites: list[str] | tuple = ("*",), weight_format: dict | None = None,
                 act_format: dict | None = None):
        """``sites``: fnmatch patterns (the recipe's ignore patterns are honoured too).
        ``weight_format`` / ``act_format``: formats the split is made for (default: the
        recipe's); rounding-aware splitting needs the weight format."""
        super().__init__(context)
        if mode not in ("weight", "activation"):
            raise ValueError("mode must be 'weight' or 'activation'")
        if not 0 < expand_ratio < 1:
            raise ValueError("expand_ratio must be in (0, 1)")
        recipe = self.context.recipe
        self.mode, self.expand_ratio, self.rounding_aware = mode, expand_ratio, rounding_aware
        self.patterns = list(sites)
        self.weight_format = QFormat.from_dict(weight_format) if weight_format else (recipe.weight if recipe else None)
        self.act_format = QFormat.from_dict(act_format) if act_format else (recipe.activation if recipe else None)
        if self.rounding_aware and mode == "weight" and self.weight_format is None:
            raise ValueError("rounding-aware splitting needs a weight format (a recipe in the context, or weight_format=)")
        self.details: dict = {}

    def _chosen(self, gm):
        recipe = self.context.recipe
        for name, site in find_linear_sites(gm).items():
            if recipe is not None and recipe.is_ignored(name):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
                yield name, site

    def _multiple(self) -> int:
        fmts = [f for f in (self.weight_format, self.act_format) if f is not None]
        m = 1
        for f in fmts:
            m = math.lcm(m, f.group_size, 8 // f.container_bits)
        return m

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        chosen = dict(self._chosen(gm))
        act_max = {}
        if self.mode == "activation":
            if not self.context.calibration:
                raise ValueError("activation splitting needs calibration data in the context")
            from lowbit.passes.quantize import site_blocks

            nodes = {n.name: n for n in gm.graph.nodes}
            calib = SequentialCalibration(self.context, gm)
            blocks = site_blocks(chosen)
            for b, block in enumerate(blocks):  # one block's activations at a time
                inputs = calib.collect([s.node for s in block.values()])
                for site in block.values():
                    x = inputs[site.node]
                    existing = get_attr_path(gm, site.name) if nodes[site.node].op == "call_module" else None
                    with torch.no_grad():
                        for op in getattr(existing, "prologue", []):  # stats of what the weight sees
                            x = op(x)
                    act_max[site.node] = x.abs().amax(0)
                if b + 1 < len(blocks):
                    calib.advance(next(iter(blocks[b + 1].values())).node)
        nodes = {n.name: n for n in gm.graph.nodes}
        total_new = 0
        for name, site in chosen.items():
            node = nodes[site.node]
            existing = get_attr_path(gm, name) if node.op == "call_module" else None
            w = get_attr_path(gm, site.weight).detach()
            k = w.shape[1]
            k_new = split_width(k, self.expand_ratio, self._multiple())
            m = k_new - k
            if self.mode == "weight":
                score = w.abs().amax(0)
            else:
                score = act_max[site.node]
            m_eff = min(m, k)
            picked = torch.topk(score.float(), m_eff).indices.sort().values
            index = torch.cat([torch.arange(k), picked, picked[: m - m_eff]])  # m > k only for tiny sites
            w64 = w.double()
            new_w = w64[:, index].clone()
            dup = torch.arange(k, k_new)
            if self.mode == "weight":
                scale = torch.ones(k_new)
                new_w[:, index[dup]] = w64[:, index[dup]] / 2
                new_w[:, dup] = w64[:, index[dup]] / 2
            else:
                scale = torch.ones(k_new)
                scale[index[dup]] = 0.5
                scale[dup] = 0.5
            qt = None
            if self.mode == "weight" and self.rounding_aware:
                new_w, qt = self._rounding_aware(new_w, w64, index, dup)
            prologue = list(existing.prologue) if isinstance(existing, PrologueLinear) else []
            prologue.append(ChannelSplitPrologue(k, k_new, index, scale))
            bias = get_attr_path(gm, site.bias).detach() if site.bias else None
            module = PrologueLinear.wrap(new_w.to(w.dtype), bias, prologue)
            module.site_in_features = existing.site_in_features if isinstance(existing, PrologueLinear) else k
            if qt is not None:
                module.weight_qtensor = qt  # consumed by the quantize pass
            install_module(gm, name, module)
            if node.op != "call_module":
                call_module_in_place_of(gm, node, name)
            rec = self.report.site(name)
            rec["split_channels"] = m
            total_new += m
        erase_unused_get_attrs(gm)
        gm.graph.lint()
        gm.recompile()
        self.details = {"mode": self.mode, "rounding_aware": self.rounding_aware and self.mode == "weight",
                        "sites": len(chosen), "new_channels": total_new}
        return PassResult(gm, bool(chosen))

    def _rounding_aware(self, new_w, w64, index, dup):
        """Re-choose the halves on the scales of the plain-halved split; return (weight, QTensor)."""
        fmt = self.weight_format
        plain = quantize_weight_rtn(new_w.float(), fmt)
        eff = effective_scales(plain.scales, plain.global_scale).double()  # [N, K'/G]
        g = fmt.group_size
        src = index[dup]
        s1 = eff[:, src // g]
        s2 = eff[:, dup // g]
        w = w64[:, src]
        w1 = rounding_aware_halves(w, s1, s2, fmt)
        new_w = new_w.clone()
        new_w[:, src] = w1
        new_w[:, dup] = w - w1
        codes = quantize_codes(new_w.float(), eff.float(), fmt)
        return new_w, QTensor(codes, plain.scales, plain.global_scale, fmt)
