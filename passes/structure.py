"""Transformer structure found in a captured ATen graph (no model-specific names).

What the rotation and norm-folding passes need to know, read from the graph alone:

* the **residual stream**: the token embedding's output and every node reached from it
  through value-preserving ops (dtype casts, copies, slices of leading dimensions) and
  residual additions ``r + branch``;
* its **writers**: the linear sites whose output is the branch of a residual addition;
* its **norms**: RMSNorm patterns ``x * rsqrt(mean(x^2, -1) + eps) [* gamma]`` (as
  decomposed ops or ``aten.rms_norm``) reading a residual node;
* its **readers**: the linear sites reading a norm's output;
* **attention value/output pairs**: for each ``scaled_dot_product_attention``, the
  linear site producing its values and the one consuming its output, with the head size.

Anything else touching the residual stream (a LayerNorm, a linear reading it without a
norm, a non-linear branch) makes :func:`find_residual_stream` raise
:class:`StructureError` naming the node, so passes refuse instead of guessing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from lowbit.capture import LinearSite, find_linear_sites

aten = torch.ops.aten


class StructureError(ValueError):
    """The graph does not have the structure a pass needs."""


_CASTS = {
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.dropout.default,
    aten.type_as.default, aten.to.device,
}
_NO_VALUE_USE = {aten._assert_tensor_metadata.default, aten.sym_size.int, aten.size.default}
_SHAPE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.expand.default, aten.slice.Tensor, aten.unsqueeze.default, aten.squeeze.dim,
    aten.permute.default, aten.clone.default, aten.contiguous.default, aten.to.dtype,
    aten._to_copy.default, aten.alias.default,
}


def _shape(n) -> tuple | None:
    v = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _ignorable_user(u: torch.fx.Node) -> bool:
    return u.op == "call_function" and u.target in _NO_VALUE_USE


def _row_preserving(u: torch.fx.Node, x: torch.fx.Node, width: int) -> bool:
    """u applies the same map to every row of x's last dimension of size ``width``."""
    if u.op != "call_function" or not u.args or u.args[0] is not x:
        return False
    if u.target in _CASTS:
        return True
    shape_in, shape_out = _shape(x), _shape(u)
    if shape_in is None or shape_out is None or shape_out[-1:] != (width,) or shape_in[-1:] != (width,):
        return False
    nd = len(shape_in)
    if u.target in (aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim):
        dim = u.args[1] if len(u.args) > 1 else 0
        dim = dim + (nd + (1 if u.target is aten.unsqueeze.default else 0)) if dim < 0 else dim
        return dim != (nd if u.target is aten.unsqueeze.default else nd - 1)
    if u.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return True  # last dim unchanged (checked above) and row-major: rows map to rows
    return False


@dataclass
class RMSNorm:
    input: torch.fx.Node                 # residual node read
    output: torch.fx.Node                # normalized (and scaled) value read by the linears
    weight: str | None                   # get_attr target of gamma, if any
    internal: set = field(default_factory=set)
    readers: list[LinearSite] = field(default_factory=list)


@dataclass
class ResidualStream:
    width: int
    embedding: torch.fx.Node
    embedding_weight: str
    nodes: set
    writers: list[LinearSite]
    norms: list[RMSNorm]

    @property
    def readers(self) -> list[LinearSite]:
        return [s for n in self.norms for s in n.readers]


def _match_rmsnorm(r: torch.fx.Node, width: int) -> RMSNorm | None:
    """An RMSNorm reading r, recognised from its pow/mean/add/rsqrt/mul decomposition."""
    for u in r.users:
        if u.op == "call_function" and u.target is aten.rms_norm.default:
            w = u.args[2] if len(u.args) > 2 else None
            return RMSNorm(r, u, w.target if isinstance(w, torch.fx.Node) and w.op == "get_attr" else None, {u})
    pw = next((u for u in r.users if u.op == "call_function" and u.target is aten.pow.Tensor_Scalar
               and u.args[1] == 2), None)
    if pw is None:
        return None
    internal = {pw}
    node = pw
    for tgt in (aten.mean.dim, aten.add.Tensor, aten.rsqrt.default):
        nxt = [u for u in node.users if u.op == "call_function" and u.target is tgt]
        if len(nxt) != 1 or len(node.users) != 1:
            return None
        node = nxt[0]
        internal.add(node)
    rs = node
    mul = next((u for u in rs.users if u.target is aten.mul.Tensor and r in u.args), None)
    if mul is None or len(rs.users) != 1:
        return None
    internal.add(mul)
    out = mul
    # casts, then an optional multiplication by a [width] parameter
    while True:
        users = [u for u in out.users if not _ignorable_user(u)]
        if len(users) != 1:
            break
        u = users[0]
        if u.op == "call_function" and u.target in _CASTS:
            internal.add(u)
            out = u
            continue
        if u.op == "call_function" and u.target is aten.mul.Tensor:
            other = u.args[0] if u.args[1] is out else u.args[1]
            if isinstance(other, torch.fx.Node) and other.op == "get_attr" and _shape(other) in ((width,), None):
                internal.add(u)
                return RMSNorm(r, u, other.target, internal)
        break
    return RMSNorm(r, out, None, internal)


def _reader_sites(out: torch.fx.Node, width: int, site_by_node: dict) -> list[LinearSite]:
    readers, stack = [], [out]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.name in site_by_node and u.args[0] is n:
                readers.append(site_by_node[u.name])
            elif _ignorable_user(u):
                continue
            elif _row_preserving(u, n, width):
                stack.append(u)
            else:
                raise StructureError(f"the normalized value {out.name} feeds {u.target} ({u.name}), not only linear "
                                     "sites: its norm cannot be folded")
    return readers


def _writer_site(n, site_by_node: dict, width: int) -> LinearSite | None:
    while isinstance(n, torch.fx.Node):
        if n.name in site_by_node:
            return site_by_node[n.name]
        if n.op == "call_function" and n.target in _CASTS and len(n.users) == 1:
            n = n.args[0]
            continue
        return None
    return None


def find_residual_stream(gm: torch.fx.GraphModule, sites: dict[str, LinearSite] | None = None) -> ResidualStream:
    """The residual stream of a captured decoder-only transformer (see module docstring)."""
    from lowbit.passes.weights import separate_shared_weights

    if separate_shared_weights(gm):
        sites = None
    sites = sites if sites is not None else find_linear_sites(gm)
    site_by_node = {s.node: s for s in sites.values()}
    embs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.embedding.default
            and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "get_attr"]
    if len(embs) != 1:
        raise StructureError(f"expected one token embedding (aten.embedding of a parameter), found {len(embs)}; "
                             "the residual stream cannot be identified")
    emb = embs[0]
    width = _shape(emb.args[0])[1] if _shape(emb.args[0]) else _shape(emb)[-1]
    residual, norms, writers, queue = set(), [], [], [emb]
    norm_internal: set = set()
    while queue:
        r = queue.pop()
        if r in residual:
            continue
        residual.add(r)
        norm = None
        for u in list(r.users):
            if u in norm_internal or _ignorable_user(u):
                continue
            if _row_preserving(u, r, width):
                queue.append(u)
                continue
            if u.op == "call_function" and u.target is aten.add.Tensor and len(u.args) == 2 \
                    and all(isinstance(a, torch.fx.Node) for a in u.args):
                other = u.args[1] if u.args[0] is r else u.args[0]
                if other in residual:
                    raise StructureError(f"residual node {r.name} is added to itself at {u.name}")
                w = _writer_site(other, site_by_node, width)
                if w is None:
                    raise StructureError(f"residual addition {u.name} adds {other.name}, which is not the output of "
                                         "a linear site; the residual stream cannot be rotated")
                writers.append(w)
                queue.append(u)
                continue
            if norm is None:
                norm = _match_rmsnorm(r, width)
                if norm is not None and u in norm.internal:
                    norm_internal |= norm.internal
                    norm.readers = _reader_sites(norm.output, width, site_by_node)
                    norms.append(norm)
                    continue
            where = u.meta.get("nn_module_stack")
            mod = list(where.values())[-1][0] if where else "?"
            raise StructureError(f"the residual stream feeds {u.target} ({u.name}, in module {mod}), which is neither "
                                 "an RMSNorm, a residual addition nor a cast; rotations need RMSNorm pre-norm blocks "
                                 "(LayerNorm with mean subtraction is not supported)")
    return ResidualStream(width, emb, emb.args[0].target, residual, writers, norms)


@dataclass
class AttentionPair:
    value: LinearSite
    output: LinearSite
    head_dim: int


def _back_to_site(n, site_by_node):
    while isinstance(n, torch.fx.Node):
        if n.name in site_by_node:
            return site_by_node[n.name]
        if n.op == "call_function" and n.target in _SHAPE_OPS:
            n = n.args[0]
            continue
        return None
    return None


def _forward_to_site(n, site_by_node):
    while True:
        users = [u for u in n.users if not _ignorable_user(u)]
        if len(users) != 1:
            return None
        u = users[0]
        if u.name in site_by_node and u.args[0] is n:
            return site_by_node[u.name]
        if u.op == "call_function" and u.target in _SHAPE_OPS and u.args[0] is n:
            n = u
            continue
        return None


def find_attention_pairs(gm: torch.fx.GraphModule, sites: dict[str, LinearSite] | None = None) -> list[AttentionPair]:
    """Value/output projection pairs around each scaled_dot_product_attention."""
    sites = sites if sites is not None else find_linear_sites(gm)
    site_by_node = {s.node: s for s in sites.values()}
    pairs = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in (aten.scaled_dot_product_attention.default,):
            continue
        v, o = _back_to_site(n.args[2], site_by_node), _forward_to_site(n, site_by_node)
        shape = _shape(n.args[2])
        if v is None or o is None or shape is None:
            raise StructureError(f"attention {n.name}: cannot trace its value projection and output projection "
                                 "through shape ops only")
        pairs.append(AttentionPair(v, o, shape[-1]))
    return pairs
