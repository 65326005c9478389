"""fuse: horizontal fusion of linear sites that read the same activation (q/k/v; gate/up).

Sites ``y_i = P(x) W_i^T + b_i`` (i = 1..n) that read the same graph node ``x`` through
the same prologue ``P`` (none, or equal online Hadamard / channel split ops) become one
site

    y = P(x) W^T + b,   W = [W_1; ...; W_n] (rows concatenated),  b = [b_1; ...; b_n]

(a member without bias contributes zeros), followed by slices ``y_i = y[..., s_i:s_i+N_i]``.
In float this is an identity: each output element is the same dot product as before.

What the quantize pass (which runs after every recipe pass) then makes of the fused site
is one ``QuantLinear``: one GEMM and one dynamic activation quantization for the group
(activation quantization depends on x alone, so the members' activation codes are the
ones each unfused site would have computed), one Hessian for GPTQ (same inputs), and one
fp32 global weight scale for the group, where unfused sites had one each; the group
scales (per row and 16 inputs) stay per member row. So fused numerics differ from unfused
ones only through that shared global scale, and are what ``torch.ops.lowbit.qlinear``
computes on the fused weight.

Rules. A site takes part when it is a plain linear (``aten.linear`` / ``F.linear`` /
``nn.Linear`` call) or a ``PrologueLinear`` without pass-made codes, is not ignored by the
recipe, matches ``sites`` (fnmatch patterns), is not a repeated call (``name@1``) and its
weight tensor has no other reader. Members of a group share the input node, the parent
module (``...self_attn``), weight dtype and device, and prologue (same configs and
buffers). Groups have at least ``min_group`` members, in graph order.

Graph and module tree. The fused site is a ``call_module`` of a ``PrologueLinear`` (holding
the members' prologue, often none) installed at ``<parent>.fused_<leaf1>_<leaf2>...``; each
member's uses read ``aten.slice`` of it. A ``lowbit.fused.FusedSlice`` is installed at each member's
name (not called by the graph): materialization moves it, with the fused site module,
into a Hugging Face model, whose own forward then calls the fused site once per group.

Order. Run it after the passes that read the model's structure or per-site weights
(``fold_norms``, ``rotate``, ``codebook``); the pass refuses a recipe that lists them after
``fuse``. ``split_outliers`` after ``fuse`` splits the fused site as one site.

Invariants: the graph's outputs are unchanged in float (up to the order of float
accumulation); only member nodes (and the weight ``get_attr`` nodes they alone used) are
replaced; the report records each group (``details["groups"]``) and, per member site,
``fused_into``.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from lowbit.capture import find_linear_sites
from lowbit.fused import FusedSlice
from lowbit.pass_manager import CompileContext, LowbitPass
from lowbit.passes.weights import erase_unused_get_attrs, get_attr_path, has_attr_path, install_module
from lowbit.prologue import PrologueLinear

#: passes that must run before ``fuse`` (they read per-site structure or weights)
MUST_PRECEDE = ("fold_norms", "rotate", "codebook")


def _same_prologue(a: list[nn.Module], b: list[nn.Module]) -> bool:
    if len(a) != len(b):
        return False
    for pa, pb in zip(a, b):
        if type(pa) is not type(pb) or pa.config() != pb.config():
            return False
        ba, bb = dict(pa.named_buffers()), dict(pb.named_buffers())
        if ba.keys() != bb.keys() or any(not torch.equal(ba[k], bb[k]) for k in ba):
            return False
    return True


class _Member:
    def __init__(self, name, site, node, weight, bias, prologue, in_features):
        self.name, self.site, self.node = name, site, node
        self.weight, self.bias = weight, bias
        self.prologue, self.in_features = prologue, in_features
        self.parent, _, self.leaf = name.rpartition(".")


class FusePass(LowbitPass):
    name = "fuse"

    def __init__(self, context: CompileContext | None = None, sites: list[str] | tuple = ("*",),
                 min_group: int = 2):
        """``sites``: fnmatch patterns of the sites that may be fused (all by default)."""
        super().__init__(context)
        if min_group < 2:
            raise ValueError("min_group must be at least 2")
        self.patterns, self.min_group = list(sites), int(min_group)
        recipe = self.context.recipe
        if recipe is not None:
            names = [p["name"] for p in recipe.passes]
            if "fuse" in names:
                late = [n for n in names[names.index("fuse") + 1:] if n in MUST_PRECEDE]
                if late:
                    raise ValueError(f"the fuse pass must come after {late} in the recipe's passes "
                                     "(they read per-site structure or weights)")
        self.details: dict = {}

    # -- finding groups ------------------------------------------------------------------
    def _member(self, gm, name, site, node, readers) -> tuple[_Member | None, str | None]:
        """The site as a fusion candidate, or (None, why not)."""
        recipe = self.context.recipe
        if "@" in name:
            return None, "called more than once"
        if recipe is not None and recipe.formats_for(name) is None:
            return None, None
        if recipe is not None and recipe.formats_for(name) != (recipe.weight, recipe.activation):
            return None, "has its own formats (a recipe override)"
        if not any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
            return None, None
        if getattr(site, "transposed", False) or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None, "not a plain linear"
        if "." not in name:
            return None, "no parent module"
        prologue, in_features = [], site.in_features
        if node.op == "call_module":
            mod = get_attr_path(gm, node.target)
            if isinstance(mod, PrologueLinear):
                if getattr(mod, "weight_qtensor", None) is not None:
                    return None, "holds pass-made codes"
                prologue, in_features = list(mod.prologue), mod.site_in_features
            elif type(mod) is not nn.Linear:
                return None, f"a {type(mod).__name__}"
        elif node.target not in (torch.ops.aten.linear.default, torch.nn.functional.linear, torch._C._nn.linear):
            return None, "not a plain linear"
        for path in (site.weight, site.bias):
            if path and readers.get(path, 0) > 1:
                return None, "its weight has other readers"
        weight = get_attr_path(gm, site.weight).detach()
        bias = get_attr_path(gm, site.bias).detach() if site.bias else None
        return _Member(name, site, node, weight, bias, prologue, in_features), None

    def find_groups(self, gm: torch.fx.GraphModule) -> tuple[list[list[_Member]], dict]:
        nodes = {n.name: n for n in gm.graph.nodes}
        readers: dict[str, int] = {}  # get_attr target -> number of nodes reading it
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                readers[n.target] = readers.get(n.target, 0) + len(n.users)
        groups: list[list[_Member]] = []
        skipped: dict = {}
        for name, site in find_linear_sites(gm).items():
            m, why = self._member(gm, name, site, nodes[site.node], readers)
            if m is None:
                if why:
                    skipped[name] = why
                continue
            for g in groups:
                h = g[0]
                if (h.node.args[0] is m.node.args[0] and h.parent == m.parent and h.weight.dtype == m.weight.dtype
                        and h.weight.device == m.weight.device and h.weight.shape[1] == m.weight.shape[1]
                        and h.in_features == m.in_features and _same_prologue(h.prologue, m.prologue)):
                    g.append(m)
                    break
            else:
                groups.append([m])
        return [g for g in groups if len(g) >= self.min_group], skipped

    # -- rewriting -----------------------------------------------------------------------
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        groups, skipped = self.find_groups(gm)
        record = {}
        for group in groups:
            fused_name = self._fuse(gm, group)
            record[fused_name] = [m.name for m in group]
            for m in group:
                self.report.site(m.name)["fused_into"] = fused_name
        erase_unused_get_attrs(gm)
        gm.graph.lint()
        gm.recompile()
        self.details = {"groups": record, "fused_sites": sum(len(v) for v in record.values()),
                        "skipped": skipped}
        return PassResult(gm, bool(groups))

    def _fuse(self, gm: torch.fx.GraphModule, group: list[_Member]) -> str:
        head = group[0]
        fused_name = f"{head.parent}.fused_" + "_".join(m.leaf for m in group)
        if has_attr_path(gm, fused_name):
            raise RuntimeError(f"fuse: {fused_name} exists already")
        weight = torch.cat([m.weight for m in group], 0)
        bias = None
        if any(m.bias is not None for m in group):
            bias = torch.cat([m.bias if m.bias is not None else
                              torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device)
                              for m in group], 0).to(weight.dtype)
        module = PrologueLinear.wrap(weight, bias, head.prologue)  # a site module even without a prologue
        module.site_in_features = head.in_features
        module.requires_grad_(False)
        install_module(gm, fused_name, module)
        graph = gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min(group, key=lambda m: order[m.node]).node
        with graph.inserting_before(first):
            fused = graph.call_module(fused_name, (head.node.args[0],))
        fused.meta = {k: v for k, v in first.meta.items() if k not in ("val", "tensor_meta")}
        vals = [m.node.meta.get("val") for m in group]
        if all(v is not None for v in vals):
            try:
                fused.meta["val"] = torch.cat(vals, -1)
            except Exception:  # noqa: BLE001  (meta is informative only)
                pass
        start = 0
        for i, m in enumerate(group):
            stop = start + m.weight.shape[0]
            with graph.inserting_before(m.node):
                piece = graph.call_function(torch.ops.aten.slice.Tensor, (fused, -1, start, stop))
            piece.meta = dict(m.node.meta)
            m.node.replace_all_uses_with(piece)
            graph.erase_node(m.node)
            install_module(gm, m.name, FusedSlice(fused_name.rpartition(".")[2], start, stop, i, len(group)))
            start = stop
        return fused_name
