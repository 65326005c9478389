"""Quantize pass: replace linear sites by ``lowbit.QuantLinear`` modules.

For each linear site ``y = x W^T + b`` (found with ``lowbit.capture.find_linear_sites``)
whose name no ``ignore`` pattern matches, the pass quantizes W statically to the weight
format (RTN with a per-group clipping search by default, see ``lowbit.formats``) and,
when the recipe has an activation format, makes the site quantize its input
dynamically per token and group; with ``act_clip_search`` and calibration data each such
site takes, from the candidate clip ratios, the one that minimises its relative output error
``||y_q - y|| / ||y||`` on its own inputs (weight codes fixed; at most
:data:`ACT_CLIP_SEARCH_ROWS` evenly spaced tokens of them). The node becomes a ``call_module`` to a QuantLinear
installed at the site's own name, so materialization can move it into the original
module tree unchanged.

Invariants:
* the graph's signature and every other node are unchanged; only site nodes (and the
  weight ``get_attr`` nodes they alone used) are replaced;
* the QuantLinear computes exactly ``torch.ops.lowbit.qlinear`` on the codes it holds;
* for every site it records in the report: format, bits per weight (codes + group
  scales + global scale), element count and, with calibration data, the relative
  output error ``||y_q - y|| / ||y||`` on the site's real inputs.
"""
from __future__ import annotations

import dataclasses
import re

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult
from tqdm.auto import tqdm

from lowbit.capture import find_linear_sites
from lowbit.formats import QFormat, QTensor
from lowbit.pass_manager import CompileContext, LowbitPass, SequentialCalibration
from lowbit.prologue import PrologueLinear
from lowbit.quant_linear import QuantLinear
from lowbit.passes.weights import (
    call_module_in_place_of, erase_unused_get_attrs, get_attr_path, install_module, separate_shared_weights)

ACT_CLIP_SEARCH_ROWS = 4096  # calibration tokens each candidate activation clip ratio is scored on


_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def site_blocks(sites: dict) -> list[dict]:
    """Consecutive sites grouped by their numbered block (``model.layers.3``); others alone."""
    blocks: list[dict] = []
    last = object()
    for name, site in sites.items():
        m = _BLOCK.match(name)
        key = m.group(1) if m else name
        if key != last:
            blocks.append({})
            last = key
        blocks[-1][name] = site
    return blocks


class QuantizePass(LowbitPass):
    name = "quantize"

    def __init__(
        self,
        weight_format: QFormat,
        act_format: QFormat | None = None,
        ignore=None,
        clip_search: bool = True,
        act_clip_search=(),
        weight_quantizer=None,
        context: CompileContext | None = None,
        formats=None,
    ):
        """``ignore``: callable(site name) -> bool, or a list of fnmatch patterns.

        ``weight_quantizer``: optional callable(site, weight, inputs, fmt) -> QTensor
        replacing RTN (GPTQ plugs in here). Given calibration inputs it also takes precedence
        over codes a pass left on a site (``weight_qtensor``, rounding-aware splitting).
        ``formats``: optional callable(site name) ->
        (weight format, activation format) or None (float), e.g. ``Recipe.formats_for``
        (per-site overrides); it replaces ``ignore`` and the two formats when given.
        ``act_clip_search``: candidate activation clip ratios; with calibration inputs each site
        quantizing its activations takes the ratio whose output is closest (relative L2) to the
        float site's on those inputs, its weight codes fixed.
        """
        super().__init__(context)
        self.weight_format = weight_format
        self.act_format = act_format
        if ignore is None or callable(ignore):
            self.ignore = ignore or (lambda name: False)
        else:
            import fnmatch

            pats = list(ignore)
            self.ignore = lambda name: any(fnmatch.fnmatchcase(name, p) for p in pats)
        self.clip_search = clip_search
        self.act_clip_search = [float(c) for c in act_clip_search]
        self.weight_quantizer = weight_quantizer
        self.formats = formats or (lambda name: None if self.ignore(name) else (self.weight_format, self.act_format))
        self.details: dict = {}

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        sites = find_linear_sites(gm)
        chosen = {name: s for name, s in sites.items() if self.formats(name) is not None}
        attrs = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
        if any(s.weight in attrs and len(attrs[s.weight].users) > 1 for s in chosen.values()):
            # a chosen site shares its weight (tied classifier and embedding): the other user
            # keeps the float tensor under its own path when the site's module is replaced
            separate_shared_weights(gm)
            sites = find_linear_sites(gm)
            chosen = {name: s for name, s in sites.items() if self.formats(name) is not None}
        skipped = [name for name in sites if name not in chosen]
        errors = []
        bar = tqdm(total=len(chosen), desc="quantize", disable=not self.context.progress, unit="site")
        calib = SequentialCalibration(self.context, gm)
        # the inputs feed the weight quantizer (GPTQ), the activation clip search and the report's errors
        use_inputs = bool(self.context.calibration) and (
            self.context.measure_errors or self.weight_quantizer is not None or bool(self.act_clip_search))
        blocks = site_blocks(chosen)
        for b, block in enumerate(blocks):
            # sequential: this block's inputs come from the graph with earlier blocks quantized
            inputs = calib.collect([s.node for s in block.values()]) if use_inputs else {}
            nodes = {n.name: n for n in gm.graph.nodes}
            for name, site in block.items():
                self._quantize_site(gm, name, site, nodes[site.node], inputs.get(site.node), errors)
                bar.update(1)
            del inputs
            erase_unused_get_attrs(gm)  # weights of replaced sites are gone
            if b + 1 < len(blocks) and use_inputs:
                calib.advance(next(iter(blocks[b + 1].values())).node)
        bar.close()
        gm.graph.lint()
        gm.recompile()
        self.details = {"sites": len(chosen), "ignored": len(skipped),
                        "ignored_sites": skipped,
                        "mean_rel_error": sum(errors) / len(errors) if errors else None}
        return PassResult(gm, bool(chosen))

    def _quantize_site(self, gm, name, site, node, x, errors):
        weight = get_attr_path(gm, site.weight).detach()
        if x is not None:  # calibration inputs are kept on the CPU; the site may live on a GPU
            x = x.to(weight.device)
        bias = get_attr_path(gm, site.bias).detach() if site.bias else None
        existing = get_attr_path(gm, name) if node.op == "call_module" else None
        prologue = list(existing.prologue) if isinstance(existing, PrologueLinear) else []
        with torch.no_grad():
            x_weight = x
            for op in prologue:  # the product sees the activation after the prologue
                x_weight = op(x_weight) if x_weight is not None else None
        weight_format, act_format = self.formats(name)
        qt: QTensor | None = None
        hint = getattr(existing, "weight_qtensor", None)
        # a weight quantizer with the site's calibration inputs (GPTQ) sees the activations; a pass's
        # codes (rounding-aware splitting) do not, so they serve only where no such quantizer runs
        calibrated = self.weight_quantizer is not None and x_weight is not None
        if hint is not None and not calibrated and hint.fmt == weight_format and hint.codes.shape == weight.shape:
            qt = hint  # made by a pass that optimised the codes (rounding-aware splitting)
        elif self.weight_quantizer is not None:
            qt = self.weight_quantizer(name, weight, x_weight, weight_format)
        ql = QuantLinear.from_weight(weight, bias, weight_format, act_format,
                                     in_features=existing.site_in_features if prologue else weight.shape[1],
                                     prologue=prologue, clip_search=self.clip_search, qtensor=qt)
        rec = self.report.site(name)
        rec.update(format=weight_format.name + (f" / act {act_format.name}" if act_format else ""),
                   bits_per_weight=ql.bits_per_weight(), numel=weight.numel(),
                   shape=[ql.out_features, ql.weight_in_features],
                   method=("rtn+clip" if self.clip_search else "rtn") if qt is None else
                   ("split-aware" if qt is hint else getattr(self.weight_quantizer, "method", "custom")))
        if x is not None:
            with torch.no_grad():
                ref = torch.nn.functional.linear(x_weight, weight.float(), None if bias is None else bias.float())

                def rel_error(inputs, target):
                    return ((ql(inputs).float() - target).norm() / target.norm().clamp_min(1e-30)).item()

                if act_format is not None and self.act_clip_search:
                    # scored on at most ACT_CLIP_SEARCH_ROWS evenly spaced tokens (activations are
                    # quantized per token, so a row's error does not depend on the others)
                    rows, target = x.reshape(-1, x.shape[-1]), ref.reshape(-1, ref.shape[-1])
                    if rows.shape[0] > ACT_CLIP_SEARCH_ROWS:
                        pick = torch.linspace(0, rows.shape[0] - 1, ACT_CLIP_SEARCH_ROWS).round().long()
                        rows, target = rows[pick], target[pick]
                    tried = {}
                    for clip in self.act_clip_search:
                        ql.act_format = dataclasses.replace(act_format, clip=clip)
                        tried[clip] = rel_error(rows, target)
                    best = min(tried, key=tried.get)
                    ql.act_format = dataclasses.replace(act_format, clip=best)
                    rec["act_clip"] = best
                    rec["format"] = f"{weight_format.name} / act {ql.act_format.name}"  # the chosen ratio
                err = rel_error(x, ref)
            rec["rel_error"] = err
            rec["act_absmax"] = [float(f"{v:.4g}") for v in x_weight.abs().amax(0).tolist()]
            errors.append(err)
        install_module(gm, name, ql)
        call_module_in_place_of(gm, node, name)

