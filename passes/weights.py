"""Weight edits on a GraphModule, shared by the passes.

Passes never modify a tensor in place: they put a new ``nn.Parameter`` at the edited
path. Tensors shared between paths (tied embeddings) therefore come apart exactly where
a pass makes them differ, and materialization sees which tensors changed.
"""
from __future__ import annotations

import torch
from torch import nn


def get_attr_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def has_attr_path(root: nn.Module, path: str) -> bool:
    try:
        get_attr_path(root, path)
        return True
    except AttributeError:
        return False


def set_param(root: nn.Module, path: str, value: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """Put ``value`` (cast to the dtype/device of ``like`` or of the current tensor) at ``path``."""
    *parents, leaf = path.split(".")
    owner = get_attr_path(root, ".".join(parents)) if parents else root
    old = getattr(owner, leaf, None)
    ref = like if like is not None else old
    if ref is not None:
        value = value.to(dtype=ref.dtype, device=ref.device)
    param = nn.Parameter(value.detach().clone(), requires_grad=False)
    if leaf in owner._parameters or leaf not in owner._buffers:
        owner._parameters[leaf] = param
        owner._buffers.pop(leaf, None)
        if leaf in owner.__dict__:
            del owner.__dict__[leaf]
    else:
        owner._buffers[leaf] = param.data


def install_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``name``, creating parent modules where missing."""
    parent = root
    *parents, leaf = name.split(".")
    for p in parents:
        if not hasattr(parent, p):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
    if leaf in parent._parameters:
        del parent._parameters[leaf]
    setattr(parent, leaf, module)


def call_module_in_place_of(gm: "torch.fx.GraphModule", node, name: str):
    """Replace site ``node`` by a ``call_module`` of the module installed at ``name`` on the
    node's first argument (same meta); returns the new node."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (node.args[0],))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def erase_unused_get_attrs(gm: "torch.fx.GraphModule") -> None:
    """Drop ``get_attr`` nodes nobody reads (the weights of replaced sites)."""
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)


def _module_path(node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def separate_shared_weights(gm: "torch.fx.GraphModule") -> int:
    """Give each user of a shared ``get_attr`` weight (tied embedding and classifier) its own
    ``get_attr`` node at its own module's path, holding the same tensor for now.

    After this, editing one module's weight (``set_param``) cannot silently edit the other.
    Returns the number of uses separated.
    """
    import torch.fx  # noqa: F401

    separated = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or len(node.users) < 2:
            continue
        tensor = get_attr_path(gm, node.target)
        if not isinstance(tensor, torch.Tensor):
            continue
        for user in list(node.users):
            mod = _module_path(user)
            if mod is None:
                continue
            path = f"{mod}.weight"
            if path == node.target:
                continue
            if has_attr_path(gm, path):
                if get_attr_path(gm, path) is not tensor:
                    continue
            else:
                *parents, leaf = path.split(".")
                owner = gm
                for p in parents:
                    if not hasattr(owner, p):
                        owner.add_module(p, nn.Module())
                    owner = getattr(owner, p)
                owner._parameters[leaf] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
            with gm.graph.inserting_before(user):
                new = gm.graph.get_attr(path)
            new.meta = dict(node.meta)
            user.replace_input_with(node, new)
            separated += 1
    if separated:
        gm.graph.lint()
        gm.recompile()
    return separated
