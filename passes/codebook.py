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

Learned channel scaling (optional, ``scaling=True``; BTC-LLM's learnable transformation)
-------------------------------------------------------------------------------------------
A linear site computes ``x W^T``. For any positive ``s [K]``,
``x W^T = (x / s) (W diag(s))^T``, so the site may be quantized as ``W' = W diag(s)``
reading ``x' = x / s``, with the float function unchanged. ``1 / s`` is folded into the
op that produces x: the scale ``gamma`` of the RMSNorm whose output the site reads
(``gamma' = gamma / s``; every reader of that norm, quantized or not, gets
``W diag(s)``, so the readers of one norm share one ``s``), or the rows of the linear
site whose output the input channel is, through an op homogeneous in it: the attention
output projection reads ``softmax(q k^T) v`` per head, so ``1 / s`` divides the value
projection's rows (under grouped-query attention the query heads that read one value
head share its scales); the gated MLP's down projection reads ``act(g) * u``, so
``1 / s`` divides the up projection's rows. Where none of these applies (a site that
already has a prologue, a non-transformer graph), ``1 / s`` becomes a ``channel_split``
prologue ``x[..., k] * (1 / s_k)`` (identity index) in front of the site. A producer's
rows are scaled before the producer itself is quantized; with per-row (or per-group)
scales a row factor is absorbed by the row's own scale.

A positive scaling leaves every sign, hence every sign pattern, as it was: what it
changes is what the codebook sees, ``W diag(s)``: the k-means' magnitude weights and
the least-squares row scales. In the original space the site holds
``diag(a) B diag(1/s)``, a rank-one magnitude model (per-row ``a`` times per-column
``1/s``) instead of a per-row one, at no storage cost.

``s`` minimises the calibration output error of the quantized group,
``L(s) = mean_r tr(E_r H E_r^T) / tr(W_r H W_r^T)`` with ``E_r = W_r - Q(W_r diag(s)) diag(1/s)``
over the group's sites r and ``H = X^T X / rows`` (the identity without calibration
data), by alternating minimisation:

1. quantize every ``W_r diag(s)`` (k-means and row scales, as above) giving the codes
   times row scales ``C_r = diag(a_r) B_r``;
2. with ``C_r`` fixed, ``L`` is a quadratic in ``t = 1/s``: ``E_r = W_r - C_r diag(t)``,
   and ``dL/dt = 0`` is the linear system ``M t = r`` with
   ``M = sum_r w_r (C_r^T C_r) * H`` (elementwise) and ``r_k = sum_r w_r (C_r^T W_r H)_kk``,
   ``w_r = 1 / tr(W_r H W_r^T)``; it is solved with a small damping towards the
   current ``t`` (``M + lambda diag(M)``), non-positive entries keep their current value,
   and ``s = 1 / t`` is normalised to geometric mean 1 (a common factor moves into the
   row scales).

Step 2 is an exact minimisation for the codes and row scales of step 1; step 1 re-runs the k-means,
which minimises its weighted Hamming proxy, not ``L``, so the pass evaluates ``L`` at
every iterate (``s = 1`` first) and keeps the best: ``L`` never ends above the unscaled
quantization's. ``s`` is learned on the calibration data (``auto``/``activation``
weighting) before the float graph is changed.

Invariants:

* with ``scaling=True`` the float function of the graph is unchanged up to fp32
  rounding before any site is replaced (:func:`apply_channel_scaling`); no op is added
  to a Llama-style decoder (norms, value and up projections take the scales);
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
  kept), with calibration data ``rel_error = ||y_q - y|| / ||y||`` on the site's
  real inputs and, with ``scaling``, where its scaling went (``channel_scaling``), its
  group's ``L`` unscaled and kept (``scaling_objective``) and the range of ``s``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult
from tqdm.auto import tqdm

from lowbit.capture import find_linear_sites
from lowbit.codebook import WEIGHTINGS, CodebookFormat, CodebookLinear, CodebookWeight, quantize_codebook
from lowbit.pass_manager import CompileContext, LowbitPass
from lowbit.prologue import ChannelSplitPrologue, PrologueLinear
from lowbit.passes.structure import StructureError, find_residual_stream
from lowbit.passes.weights import (
    call_module_in_place_of, erase_unused_get_attrs, get_attr_path, install_module, set_param)

#: options of the ``btc`` preset (0.769 bits per weight on SmolLM2-135M). The learned channel
#: scaling is on: on SmolLM2 (WikiText-2, 8 x 512) it lowers the mean site error from 0.593
#: to 0.548 and the perplexity from 1.5e8 to 2.6e5 (bench/codebook.py, btc-nols vs btc-ls)
BTC_OPTIONS = {"vector_size": 16, "index_bits": 11, "group_size": 0, "scale_dtype": "e4m3",
               "weighting": "auto", "scaling": True, "scaling_iterations": 3}


# -- learned channel scaling ------------------------------------------------------------------

@dataclass
class ScalingGroup:
    """Sites that share one channel scaling: the readers of one RMSNorm (``norm_weight``:
    its gamma's path; ``others``: its readers this pass does not replace), or one site
    whose input channels are rows of a ``producer`` site's output (``tie``: which row
    feeds each channel; channels fed by one row share one scale), or one site alone
    (the scaling becomes a prologue of the site)."""

    sites: list[str]
    norm_weight: str | None = None
    others: list[str] = field(default_factory=list)
    producer: str | None = None          # a linear site whose output rows the scaling divides
    tie: torch.Tensor | None = None      # [K] producer output row feeding each input channel


@dataclass
class ScalingResult:
    scale: torch.Tensor                 # s [K], float64: x' = x / s, W' = W diag(s)
    weights: list[CodebookWeight]       # each site's quantized W diag(s) at the best s
    history: list[float]                # L(s) per iterate, s = 1 first
    best: int                           # index of the kept iterate in history


def _rel_output_error(w: torch.Tensor, wq: torch.Tensor, hmat: torch.Tensor) -> float:
    """``tr(E H E^T) / tr(W H W^T)`` with E = W - Wq (float64)."""
    e = w - wq
    return float((e @ hmat * e).sum() / (w @ hmat * w).sum().clamp_min(1e-300))


def learn_channel_scaling(
    weights: list[torch.Tensor],
    x: torch.Tensor | None,
    fmt: CodebookFormat,
    weighting: str = "magnitude",
    steps: int = 3,
    damping: float = 0.01,
    tie: torch.Tensor | None = None,
    **quantize_options,
) -> ScalingResult:
    """Learn ``s`` for sites with weights ``weights`` ([N_r, K] each) reading ``x`` [rows, K]
    (None: ``H = I``) by ``steps`` alternating minimisation steps of the calibration output
    error (see the module docstring); ``quantize_options`` go to
    :func:`lowbit.codebook.quantize_codebook` (k-means iterations, seed, init).
    ``weighting``: the k-means weighting (with "activation" the importance is
    ``mean (x / s)^2`` per channel). ``tie`` [K] (int): channels with equal
    ``tie`` share one scale (``t = P t'`` with P the one-hot [K, R] matrix of ``tie``: the
    quadratic step solves ``P^T M P t' = P^T r``). Returns the best iterate."""
    w64 = [w.detach().double() for w in weights]
    k = w64[0].shape[1]
    if x is not None:
        x64 = x.detach().double()
        hmat = x64.T @ x64 / max(1, x64.shape[0])
    else:
        hmat = torch.eye(k, dtype=torch.float64, device=w64[0].device)
    h = torch.diagonal(hmat).clone()
    rw = [1.0 / float((w @ hmat * w).sum().clamp_min(1e-300)) for w in w64]
    s = torch.ones(k, dtype=torch.float64, device=w64[0].device)
    history, best, kept = [], None, None
    for it in range(steps + 1):
        cws, cs = [], []
        for w in w64:
            imp = h / s ** 2 if weighting == "activation" else None
            cw = quantize_codebook((w * s).float(), fmt, weighting=weighting, importance=imp, **quantize_options)
            cws.append(cw)
            cs.append(cw.dequantize()[:, :k].double())
        loss = sum(_rel_output_error(w, c / s, hmat) for w, c in zip(w64, cs)) / len(w64)
        history.append(loss)
        if best is None or loss < history[best]:
            best, kept = it, (s.clone(), cws)
        if it == steps:
            break
        # the quadratic step: minimise sum_r w_r tr((W_r - C_r T) H (W_r - C_r T)^T) over T = diag(t)
        t_cur = 1.0 / s
        m = sum(r * (c.T @ c) for r, c in zip(rw, cs)) * hmat
        rhs = sum(r * (c * (w @ hmat)).sum(0) for r, c, w in zip(rw, cs, w64))
        if tie is not None:
            onehot = torch.nn.functional.one_hot(tie.to(m.device), int(tie.max()) + 1).double()
            m, rhs = onehot.T @ m @ onehot, onehot.T @ rhs
            t_cur = (onehot.T @ t_cur) / onehot.sum(0).clamp_min(1)
        d = torch.diagonal(m).clamp_min(1e-300)
        t = torch.linalg.solve(m + damping * torch.diag(d), rhs + damping * d * t_cur)
        t = torch.where(torch.isfinite(t) & (t > 0), t, t_cur)
        if tie is not None:
            t = t[tie.to(t.device)]
        s = 1.0 / t
        s = s / s.log().mean().exp()
    return ScalingResult(kept[0], kept[1], history, best)


def _producers(gm: torch.fx.GraphModule, sites: dict, modules: dict) -> dict[str, tuple[str, torch.Tensor]]:
    """Sites whose input is, channel for channel, a positive-homogeneous function of one
    row of another linear site's output: consumer name -> (producer name, tie).

    * attention output projections: their input is ``softmax(q k^T) v`` per head, linear in
      the value projection's rows; under grouped-query attention query head h reads value
      head ``h // (H / H_kv)``, so channel ``(h, d)`` is fed by value row ``(h // rep, d)``;
    * gated MLP down projections reading ``a * u`` where u is a linear site's output used
      nowhere else: channel k is fed by row k of u.
    Sites with prologues (either side) are left out."""
    from lowbit.passes.structure import find_attention_pairs

    aten = torch.ops.aten
    by_node = {s.node: s for s in sites.values()}
    plain = {n for n, s in sites.items() if not isinstance(modules.get(n), PrologueLinear)}
    found = {}
    try:
        pairs = find_attention_pairs(gm, sites)
    except StructureError:
        pairs = []
    for p in pairs:
        k, rows = p.output.in_features, get_attr_path(gm, p.value.weight).shape[0]
        if p.output.name in plain and p.value.name in plain and k % rows == 0 and rows % p.head_dim == 0:
            rep, c = k // rows, torch.arange(k)
            found[p.output.name] = (p.value.name, (c // p.head_dim // rep) * p.head_dim + c % p.head_dim)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, site in sites.items():
        mul = nodes[site.node].args[0] if site.node in nodes else None
        if name in found or name not in plain or not isinstance(mul, torch.fx.Node) \
                or mul.target is not aten.mul.Tensor or len(mul.users) != 1:
            continue
        ups = [a for a in mul.args if isinstance(a, torch.fx.Node) and a.name in by_node
               and len(a.users) == 1 and by_node[a.name].name in plain]
        if len(ups) == 1 and all(isinstance(a, torch.fx.Node) for a in mul.args):
            up = by_node[ups[0].name]
            if get_attr_path(gm, up.weight).shape[0] == site.in_features:
                found[name] = (up.name, torch.arange(site.in_features))
    return found


def scaling_groups(gm: torch.fx.GraphModule, chosen: set[str], prologue: bool = True) -> list[ScalingGroup]:
    """The sites of ``chosen`` grouped by where their scaling folds: first the sites fed by
    a producer site's rows (attention output and gated-MLP down projections, see
    :func:`_producers`), then the readers of each RMSNorm with a scale parameter (none of
    them with a prologue: one group per norm), then, when ``prologue``, every other chosen
    site alone (a prologue group; else it is left unscaled). Graphs without a
    recognisable residual stream get producer and prologue groups only."""
    first, groups, covered = [], [], set()
    try:
        stream = find_residual_stream(gm)
    except StructureError:
        stream = None
    sites = find_linear_sites(gm)
    modules = dict(gm.named_modules())
    for name, (producer, tie) in _producers(gm, sites, modules).items():
        if name in chosen:
            first.append(ScalingGroup([name], producer=producer, tie=tie))
            covered.add(name)
    if stream is not None:
        for norm in stream.norms:
            names = [r.name for r in norm.readers]
            if norm.weight is None or not any(n in chosen for n in names) \
                    or any(isinstance(modules.get(n), PrologueLinear) for n in names):
                continue
            groups.append(ScalingGroup([n for n in names if n in chosen], norm.weight,
                                       [n for n in names if n not in chosen]))
            covered |= set(names)
    if prologue:
        groups += [ScalingGroup([n]) for n in sites if n in chosen and n not in covered]
    return first + groups


def apply_channel_scaling(gm: torch.fx.GraphModule, group: ScalingGroup, s: torch.Tensor) -> None:
    """Rewrite ``gm`` so its group's sites read ``x / s`` and hold ``W diag(s)`` (float identity):
    fold ``1 / s`` into the norm's gamma, or wrap the site in a PrologueLinear with a
    ``channel_split`` prologue scaling by ``1 / s`` (after any prologue it had)."""
    s = s.detach().double()
    sites = find_linear_sites(gm)
    if group.norm_weight is not None:
        gamma = get_attr_path(gm, group.norm_weight).detach()
        set_param(gm, group.norm_weight, gamma.double() / s)
        for name in group.sites + group.others:
            w = get_attr_path(gm, sites[name].weight).detach()
            set_param(gm, sites[name].weight, w.double() * s)
        return
    (name,) = group.sites
    site = sites[name]
    if group.producer is not None:
        prod = sites[group.producer]
        rows = get_attr_path(gm, prod.weight).shape[0]
        s_rows = torch.ones(rows, dtype=torch.float64, device=s.device).index_copy(0, group.tie.to(s.device), s)
        wp = get_attr_path(gm, prod.weight).detach()
        set_param(gm, prod.weight, wp.double() / s_rows[:, None])
        if prod.bias:
            set_param(gm, prod.bias, get_attr_path(gm, prod.bias).detach().double() / s_rows)
        w = get_attr_path(gm, site.weight).detach()
        set_param(gm, site.weight, w.double() * s)
        return
    nodes = {n.name: n for n in gm.graph.nodes}
    node = nodes[site.node]
    existing = get_attr_path(gm, name) if node.op == "call_module" else None
    w = get_attr_path(gm, site.weight).detach()
    bias = get_attr_path(gm, site.bias).detach() if site.bias else None
    kw = w.shape[1]
    prologue = list(existing.prologue) if isinstance(existing, PrologueLinear) else []
    prologue.append(ChannelSplitPrologue(kw, kw, torch.arange(kw), (1.0 / s).float()))
    module = PrologueLinear.wrap((w.double() * s).to(w.dtype), bias, prologue)
    module.site_in_features = existing.site_in_features if isinstance(existing, PrologueLinear) else kw
    install_module(gm, name, module)
    if node.op != "call_module":
        call_module_in_place_of(gm, node, name)
    erase_unused_get_attrs(gm)
    gm.graph.lint()
    gm.recompile()


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
        scaling: bool = False,
        scaling_iterations: int = 3,
        scaling_prologue: bool = True,
        context: CompileContext | None = None,
    ):
        """``group_size=0``: one scale per row. ``ignore``: callable(site name) -> bool or
        fnmatch patterns (default: the recipe's ``is_ignored`` when the context has a recipe,
        else ``lowbit.recipes.DEFAULT_IGNORE``). ``only``: fnmatch patterns; when given, only
        matching sites are replaced (the rest is left to later passes). ``weighting``: one of
        ``lowbit.codebook.WEIGHTINGS`` or "auto" (activation with calibration data, else
        magnitude). ``scaling``: learn a per-input-channel scaling for each site group
        (``scaling_iterations`` alternating steps) and fold it into the preceding RMSNorm or,
        when ``scaling_prologue``, into a prologue where no norm precedes the site (see the
        module docstring)."""
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
        self.scaling = scaling
        self.scaling_iterations = scaling_iterations
        self.scaling_prologue = scaling_prologue
        self.details: dict = {}

    def _chosen(self, name: str) -> bool:
        if self.ignore(name):
            return False
        return self.only is None or any(fnmatch.fnmatchcase(name, p) for p in self.only)

    def _prologue_of(self, gm, site) -> list:
        node = next(n for n in gm.graph.nodes if n.name == site.node)
        existing = get_attr_path(gm, site.name) if node.op == "call_module" else None
        return list(existing.prologue) if isinstance(existing, PrologueLinear) else []

    def _learn_scalings(self, gm, groups, chosen, x_by_name, weighting) -> dict:
        """Learn and apply each group's scaling; returns the quantized weights by site name."""
        learned, before, after = {}, [], []
        for group in tqdm(groups, desc="channel scaling", disable=not self.context.progress, unit="group"):
            sites = find_linear_sites(gm)
            first = sites[group.sites[0]]
            x = x_by_name.get(first.name)
            with torch.no_grad():
                for op in self._prologue_of(gm, first):
                    x = op(x) if x is not None else None
                ws = [get_attr_path(gm, sites[n].weight).detach() for n in group.sites]
                res = learn_channel_scaling(ws, x, self.format, weighting, self.scaling_iterations,
                                            tie=group.tie, iterations=self.iterations, seed=self.seed,
                                            init=self.init)
                apply_channel_scaling(gm, group, res.scale)
            learned.pop(group.producer, None)   # its rows changed: quantized later, from the new weight
            s = res.scale
            kind = "norm" if group.norm_weight is not None else "producer" if group.producer else "prologue"
            for name, cw in zip(group.sites, res.weights):
                learned[name] = cw
                if kind != "prologue" and x_by_name.get(name) is not None:
                    x_by_name[name] = (x_by_name[name].double() / s).float()
                self.report.site(name).update(
                    channel_scaling=kind if kind != "producer" else f"producer {group.producer}",
                    scaling_objective=[res.history[0], res.history[res.best]], scaling_best_iterate=res.best,
                    scaling_range=[float(s.min()), float(s.max())])
            before.append(res.history[0])
            after.append(res.history[res.best])
        self.details_scaling = {
            "scaling_groups": len(groups),
            "scaling_norm_groups": sum(g.norm_weight is not None for g in groups),
            "scaling_producer_groups": sum(g.producer is not None for g in groups),
            "scaling_objective": [sum(before) / len(before), sum(after) / len(after)] if groups else None}
        return learned

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        groups = []
        if self.scaling:   # before the sites are listed: finding the norms may separate tied weights
            groups = scaling_groups(gm, {n for n in find_linear_sites(gm) if self._chosen(n)},
                                    self.scaling_prologue)
        sites = find_linear_sites(gm)
        chosen = {name: s for name, s in sites.items() if self._chosen(name)}
        skipped = [name for name in sites if name not in chosen]
        inputs = self.context.site_inputs(gm, [s.node for s in chosen.values()])
        weighting = self.weighting
        if weighting == "auto":
            weighting = "activation" if chosen and len(inputs) == len(chosen) else "magnitude"
        if weighting == "activation" and len(inputs) < len(chosen):
            raise ValueError("CodebookPass(weighting='activation') needs calibration data for every site")
        x_by_name = {name: inputs.get(s.node) for name, s in chosen.items()}
        self.details_scaling = {}
        learned = self._learn_scalings(gm, groups, chosen, x_by_name, weighting) if groups else {}
        if learned:
            sites = find_linear_sites(gm)
            chosen = {name: sites[name] for name in chosen}
        nodes = {n.name: n for n in gm.graph.nodes}
        errors = []
        for name, site in tqdm(chosen.items(), desc="codebook", disable=not self.context.progress, unit="site"):
            node = nodes[site.node]
            weight = get_attr_path(gm, site.weight).detach()
            bias = get_attr_path(gm, site.bias).detach() if site.bias else None
            x = x_by_name.get(name)
            existing = get_attr_path(gm, name) if node.op == "call_module" else None
            prologue = list(existing.prologue) if isinstance(existing, PrologueLinear) else []
            with torch.no_grad():
                x_weight = x
                for op in prologue:  # the product sees the activation after the prologue
                    x_weight = op(x_weight) if x_weight is not None else None
                importance = x_weight.pow(2).mean(0) if (x_weight is not None and weighting == "activation") \
                    else None
                in_features = existing.site_in_features if prologue else weight.shape[1]
                if name in learned:
                    cl = CodebookLinear.from_codebook_weight(learned[name], weight.shape[1], bias, in_features,
                                                             prologue)
                else:
                    cl = CodebookLinear.from_weight(
                        weight, bias, self.format, in_features=in_features, prologue=prologue,
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
            call_module_in_place_of(gm, node, name)
        erase_unused_get_attrs(gm)
        gm.graph.lint()
        gm.recompile()
        self.details = {"sites": len(chosen), "ignored": len(skipped), "ignored_sites": skipped,
                        "format": self.format.name, "weighting": weighting,
                        "mean_rel_error": sum(errors) / len(errors) if errors else None, **self.details_scaling}
        return PassResult(gm, bool(chosen))


def make_codebook_pass(options: dict | None, context: CompileContext | None = None, ignore=None) -> CodebookPass:
    """A CodebookPass from a recipe's ``codebook`` options (keys of :class:`CodebookPass`;
    missing keys take the ``btc`` preset's values, :data:`BTC_OPTIONS`)."""
    opts = {**BTC_OPTIONS, **dict(options or {})}
    if ignore is not None:
        opts["ignore"] = ignore
    return CodebookPass(context=context, **opts)
