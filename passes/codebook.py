"""Codebook pass: replace linear sites by binary-codebook sites (``lowbit.codebook.CodebookLinear``).

The format (see :mod:`lowbit.codebook` for the full definition): a site's weight
``W [N, K]`` becomes ``W_hat[n, k] = a[n, g(k)] * codebook[idx[n, k // v], k % v]``,
signs from a per-site codebook of ``C = 2^c`` binary vectors of length ``v`` taken
along the reduction dimension, with least-squares group scales.

Math, per site:

1. cut the (zero-padded) weight into sign vectors ``b_i = sign(w_i)`` of length v;
2. cluster them with Hamming k-means (:func:`lowbit.codebook.hamming_kmeans`) into C
   binary centroids, minimising the weighted Hamming objective
   ``H = sum_i sum_p omega_ip [b_ip != c_{a(i), p}]`` by exact nearest-centroid
   assignment and weighted majority-vote updates (``H`` never increases). Element
   weights ``omega``: ``weighting="hamming"`` (1, BTC-LLM's plain Hamming distance),
   ``"magnitude"`` (``|w|``, the default: then ``H`` is half the first-order loss of
   the squared weight error, since for ``w ~ a b`` with ``a >= 0`` the error is
   ``||w||^2 - <w, b>^2 / G``) or ``"activation"`` (``|w_k| * h_k`` with
   ``h_k = mean x_k^2`` over the calibration inputs: the diagonal of the layer's
   output-error Hessian; needs calibration data); ``"auto"`` (the default) takes
   ``"activation"`` when calibration data is given, else ``"magnitude"``;
3. with the signs fixed, each scale group of G weights takes the least-squares scale
   ``a = <w, b> / G`` (``<h w, b> / sum h`` with activation weighting), clamped at 0,
   stored as E4M3 (nearest) with one fp32 global scale per site, or fp16/fp32;
4. store packed indices (c bits per vector), the packed codebook (C * v bits per
   site) and the scales: ``bits_per_weight = c/v + scale_bits/G + C v / (N K)
   (+ 32 / (N K))`` plus byte-padding of each row's index stream, reported exactly.

Invariants:

* the graph's signature and every other node are unchanged; each chosen site node
  (and the weight ``get_attr`` nodes it alone used) is replaced by a ``call_module`` to a
  CodebookLinear installed at the site's own name, so materialization moves it into the
  original module tree;
* a ``PrologueLinear`` site (channel split, online Hadamard) keeps its prologue in front
  of the codebook product, exactly as ``QuantizePass`` does;
* the CodebookLinear computes exactly ``torch.ops.lowbit.codebook_linear`` on what it
  stores; sites it replaces are no longer ``nn.Linear`` sites, so a ``QuantizePass``
  run afterwards leaves them alone and quantizes only what this pass skipped;
* per site the report records: format name, bits_per_weight (exact storage over the
  site's original ``out x in`` weights), numel, shape, method, k-means statistics
  (objective before/after, iterations, codebook entries used, fraction of weight signs
  kept) and, with calibration data, ``rel_error = ||y_q - y|| / ||y||`` on the site's
  real inputs.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult
from tqdm.auto import tqdm

from lowbit.capture import find_linear_sites
from lowbit.codebook import WEIGHTINGS, CodebookFormat, CodebookLinear
from lowbit.pass_manager import CompileContext, LowbitPass
from lowbit.prologue import PrologueLinear
from lowbit.passes.weights import get_attr_path, install_module

#: options of the ``btc`` preset (about 0.76 bits per weight on SmolLM2-135M)
BTC_OPTIONS = {"vector_size": 16, "index_bits": 11, "group_size": 0, "scale_dtype": "e4m3",
               "weighting": "auto"}


def _ignore_fn(ignore, context: CompileContext):
    if callable(ignore):
        return ignore
    if ignore is None:
        recipe = getattr(context, "recipe", None)
        if recipe is not None and hasattr(recipe, "is_ignored"):
            return recipe.is_ignored
        from lowbit.recipes import DEFAULT_IGNORE

        ignore = DEFAULT_IGNORE
    pats = list(ignore)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in pats)


class CodebookPass(LowbitPass):
    """Replace linear sites by :class:`lowbit.codebook.CodebookLinear` (see module docstring)."""

    name = "codebook"

    def __init__(
        self,
        vector_size: int = 16,
        index_bits: int = 11,
        group_size: int = 0,
        scale_dtype: str = "e4m3",
        weighting: str = "auto",
        iterations: int = 10,
        init: str = "frequent",
        seed: int = 0,
        ignore=None,
        only=None,
        context: CompileContext | None = None,
    ):
        """``group_size=0``: one scale per row. ``ignore``: callable(site name) -> bool or
        fnmatch patterns (default: the recipe's ``is_ignored`` when the context has a recipe,
        else ``lowbit.recipes.DEFAULT_IGNORE``). ``only``: fnmatch patterns; when given, only
        matching sites are replaced (the rest is left to later passes). ``weighting``: one of
        ``lowbit.codebook.WEIGHTINGS`` or "auto" (activation with calibration data, else
        magnitude)."""
        super().__init__(context)
        if weighting not in WEIGHTINGS + ("auto",):
            raise ValueError(f"weighting must be one of {WEIGHTINGS + ('auto',)}, got {weighting!r}")
        self.format = CodebookFormat(vector_size, index_bits, group_size, scale_dtype)
        self.weighting = weighting
        self.iterations = iterations
        self.init = init
        self.seed = seed
        self.ignore = _ignore_fn(ignore, self.context)
        self.only = list(only) if only else None
        self.details: dict = {}

    def _chosen(self, name: str) -> bool:
        if self.ignore(name):
            return False
        return self.only is None or any(fnmatch.fnmatchcase(name, p) for p in self.only)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        sites = find_linear_sites(gm)
        chosen = {name: s for name, s in sites.items() if self._chosen(name)}
        skipped = [name for name in sites if name not in chosen]
        inputs = self.context.site_inputs(gm, [s.node for s in chosen.values()])
        weighting = self.weighting
        if weighting == "auto":
            weighting = "activation" if chosen and len(inputs) == len(chosen) else "magnitude"
        if weighting == "activation" and len(inputs) < len(chosen):
            raise ValueError("CodebookPass(weighting='activation') needs calibration data for every site")
        nodes = {n.name: n for n in gm.graph.nodes}
        errors = []
        for name, site in tqdm(chosen.items(), desc="codebook", disable=not self.context.progress, unit="site"):
            node = nodes[site.node]
            weight = get_attr_path(gm, site.weight).detach()
            bias = get_attr_path(gm, site.bias).detach() if site.bias else None
            x = inputs.get(site.node)
            existing = get_attr_path(gm, name) if node.op == "call_module" else None
            prologue = list(existing.prologue) if isinstance(existing, PrologueLinear) else []
            with torch.no_grad():
                x_weight = x
                for op in prologue:  # the product sees the activation after the prologue
                    x_weight = op(x_weight) if x_weight is not None else None
                importance = x_weight.pow(2).mean(0) if (x_weight is not None and weighting == "activation") \
                    else None
                cl = CodebookLinear.from_weight(
                    weight, bias, self.format,
                    in_features=existing.site_in_features if prologue else weight.shape[1], prologue=prologue,
                    weighting=weighting, importance=importance, iterations=self.iterations,
                    seed=self.seed, init=self.init)
            km = cl.kmeans
            rec = self.report.site(name)
            signs_kept = (cl.dequantized_weight().sign() * weight.float().sign() > 0).float().mean().item()
            rec.update(format=self.format.name, bits_per_weight=cl.bits_per_weight(), numel=weight.numel(),
                       shape=[cl.out_features, cl.weight_in_features], method=f"codebook/{weighting}",
                       kmeans_objective=[km.history[0], km.history[-1]], kmeans_iterations=km.iterations,
                       codebook_used=int(torch.unique(km.assignment).numel()), signs_kept=signs_kept)
            if x is not None:
                with torch.no_grad():
                    ref = torch.nn.functional.linear(x_weight, weight.float(), None if bias is None else bias.float())
                    out = cl(x)
                    err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                rec["rel_error"] = err
                errors.append(err)
            del cl.kmeans
            install_module(gm, name, cl)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        for n in list(gm.graph.nodes):
            if n.op == "get_attr" and not n.users:
                gm.graph.erase_node(n)
        gm.graph.lint()
        gm.recompile()
        self.details = {"sites": len(chosen), "ignored": len(skipped), "ignored_sites": skipped,
                        "format": self.format.name, "weighting": weighting,
                        "mean_rel_error": sum(errors) / len(errors) if errors else None}
        return PassResult(gm, bool(chosen))


def make_codebook_pass(options: dict | None, context: CompileContext | None = None, ignore=None) -> CodebookPass:
    """A CodebookPass from a recipe's ``codebook`` options (keys of :class:`CodebookPass`;
    missing keys take the ``btc`` preset's values, :data:`BTC_OPTIONS`)."""
    opts = {**BTC_OPTIONS, **dict(options or {})}
    if ignore is not None:
        opts["ignore"] = ignore
    return CodebookPass(context=context, **opts)
