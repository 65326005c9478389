"""Capture a model's graph with torch.fx and find its linear sites.

Capture strategy
----------------
``capture(model, example_args, example_kwargs)`` turns a module into a
``torch.fx.GraphModule`` that later passes can rewrite. Two tracers are tried:

1. ``torch.export.export(..., strict=False)`` followed by ``ExportedProgram.module()``.
   Non-strict export runs the real Python ``forward`` on fake tensors, so it copes
   with the dynamic Python of Hugging Face models (decorators, cache objects,
   mask builders) that ``torch.fx.symbolic_trace`` cannot get through. The
   unlifted module refers to parameters by their original paths (``get_attr``
   targets such as ``model.layers.0.self_attn.q_proj.weight``) and shares the very
   ``nn.Parameter`` objects of the model: nothing is copied, and tied weights stay
   tied. Linear layers appear as ``torch.ops.aten.linear.default(x, w, b)`` with
   ``node.meta["nn_module_stack"]`` naming the module that called them.
2. ``torch.fx.symbolic_trace`` as the fallback (``method="auto"``) for plain
   modules that export rejects. Linear layers stay ``call_module`` nodes, and
   functional calls are ``torch.nn.functional.linear`` nodes.

If both fail, :class:`CaptureError` names the submodule whose ``forward`` was
running when tracing failed (found from the traceback frames) and says what to
do about it; the original exception is chained as ``__cause__``.

Inputs. Keyword arguments whose values hold no tensor (``use_cache=False``,
``return_dict=True``) are constants of the graph: they are baked into the traced
``forward`` (a ``functools.partial`` installed on the instance for the duration of
the export; ``concrete_args`` for symbolic_trace), so the resulting graph does not
ask for them again. Tensor keyword arguments stay inputs of the graph (note that
an exported graph checks its keyword spec: pass exactly the tensor keywords that
were given at capture time). For a Hugging Face ``PreTrainedModel``:

* ``use_cache=False`` is added unless given (``DynamicCache`` outputs are not
  pytree-registered, and a compiled graph has no use for them);
* ``input_ids`` given as a keyword moves to the first positional argument, so the
  graph is called as ``gm(input_ids)``; with no example at all, a random
  ``input_ids`` of shape (2, 8) is made;
* with ``dynamic_seq`` the sequence dimension (dim 1 of ``input_ids``,
  ``attention_mask``, ``position_ids``, ...) is a ``torch.export.Dim`` with min 2
  and the batch dimension is ``Dim.AUTO``. Export specializes dimensions whose
  example size is 1, so an example batch of 1 is repeated to 2 for tracing only;
  the graph then runs on any batch size and any sequence length (a length of 1
  also runs, although export only reasons about lengths >= 2);
* the output has the model's own type (``CausalLMOutputWithPast`` with
  ``.logits``), since ``ModelOutput`` classes are pytree nodes.

For other modules ``dynamic_seq`` marks every dimension of size >= 2 of every
tensor input as ``Dim.AUTO`` and lets export decide which ones stay dynamic. If
export rejects the dynamic shapes (a constraint violation) it is retried with
static shapes and a warning.

The model is traced in eval mode (every submodule's ``training`` flag is restored
afterwards), so dropout never enters the graph.

Linear sites
------------
:func:`find_linear_sites` finds, in graph order,

* ``call_function`` ``aten.linear`` (export) and ``torch.nn.functional.linear``
  (symbolic_trace) whose weight is a ``get_attr`` of a parameter, and
* ``call_module`` nodes whose module is an ``nn.Linear`` (or subclass).

A site is named by the fully qualified name of its module: the innermost entry of
``nn_module_stack`` whose class is ``nn.Linear`` or a subclass, accepted when that
module's ``weight`` is the very tensor the node reads (checked by identity, which
is what makes a tied ``lm_head`` come out as ``lm_head`` whichever path export
gives its weight). Otherwise the name comes from the weight's parameter path
with a trailing ``.weight`` removed (``blk.w`` for ``F.linear(x, self.w)`` inside
``blk``). Sites whose weight is computed (not a ``get_attr`` of a parameter), or
whose bias is computed, are skipped. A module called more than once gives several
sites with the same ``name``; the dictionary keys of the later ones get ``@1``,
``@2``... appended, following export's own convention.

GPT-2's ``transformers.pytorch_utils.Conv1D`` is a linear layer with its weight
stored transposed (``[in, out]``), computed as ``aten.addmm(bias, x2d, weight)``.
It is not a linear site by default (passes expect ``aten.linear`` semantics), and
a warning says how many were left out; ``include_conv1d=True`` reports them with
``transposed=True``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

__all__ = [
    "CaptureError",
    "CapturedGraph",
    "LinearSite",
    "capture",
    "find_linear_sites",
]

# Hugging Face inputs laid out as [batch, seq, ...].
_HF_SEQ_INPUTS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "token_type_ids",
    "inputs_embeds",
    "labels",
)
_LINEAR_CLASS_NAMES = {
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.linear.NonDynamicallyQuantizableLinear",
}
_CONV1D_CLASS_NAME = "transformers.pytorch_utils.Conv1D"


class CaptureError(RuntimeError):
    """Neither torch.export nor torch.fx.symbolic_trace could capture the model.

    ``module_name`` / ``module_type`` name the submodule at fault when it could be
    found; ``errors`` maps each method tried to the exception it raised (the first
    one is also the ``__cause__``).
    """

    def __init__(
        self,
        message: str,
        *,
        module_name: str | None = None,
        module_type: str | None = None,
        errors: dict[str, BaseException] | None = None,
    ):
        super().__init__(message)
        self.module_name = module_name
        self.module_type = module_type
        self.errors = dict(errors or {})


@dataclass
class LinearSite:
    name: str  # fully qualified module name, e.g. "model.layers.3.mlp.down_proj"
    node: str  # name of the fx node computing the linear
    weight: str  # attribute path of the weight in the GraphModule
    bias: str | None
    in_features: int
    out_features: int
    # True for GPT-2 Conv1D sites (only with include_conv1d=True): the node is
    # aten.addmm(bias, x2d, weight) and the weight is stored [in_features, out_features].
    transposed: bool = False


@dataclass
class CapturedGraph:
    graph_module: torch.fx.GraphModule
    sites: dict[str, LinearSite]
    method: str  # "export" or "symbolic_trace"
    example_args: tuple
    example_kwargs: dict
    # The ExportedProgram the graph module was unlifted from (method="export").
    # It describes the graph as captured; it does not follow later rewrites.
    exported_program: Any = field(default=None, repr=False)


# --------------------------------------------------------------------------- capture


def capture(
    model: nn.Module,
    example_args=(),
    example_kwargs=None,
    *,
    method: str = "auto",
    dynamic_seq: bool = True,
    include_conv1d: bool = False,
) -> CapturedGraph:
    """Capture ``model`` as an FX GraphModule and find its linear sites.

    ``method`` is ``"auto"`` (export, then symbolic_trace), ``"export"`` or
    ``"symbolic_trace"``. See the module docstring for how inputs, dynamic shapes
    and Hugging Face models are handled. Raises :class:`CaptureError` when no
    method works.
    """
    if method not in ("auto", "export", "symbolic_trace"):
        raise ValueError(f"method must be 'auto', 'export' or 'symbolic_trace', got {method!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture expects an nn.Module, got {type(model).__name__}")

    args = tuple(example_args) if isinstance(example_args, (tuple, list)) else (example_args,)
    kwargs = dict(example_kwargs or {})
    is_hf = _is_hf_model(model)
    if is_hf:
        kwargs.setdefault("use_cache", False)
        if not args and "input_ids" in kwargs and _first_param_name(model) == "input_ids":
            args = (kwargs.pop("input_ids"),)
        if not args and not any(k in kwargs for k in ("input_ids", "inputs_embeds")):
            vocab = int(getattr(model.config, "vocab_size", 2) or 2)
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            args = (torch.randint(0, vocab, (2, 8), device=device),)

    const_kwargs = {k: v for k, v in kwargs.items() if not _has_tensor(v)}
    tensor_kwargs = {k: v for k, v in kwargs.items() if _has_tensor(v)}

    errors: dict[str, BaseException] = {}
    with _eval_mode(model):
        if method in ("auto", "export"):
            try:
                ep = _export(model, args, tensor_kwargs, const_kwargs, dynamic_seq, is_hf)
            except Exception as e:  # noqa: BLE001 - reported below, chained
                errors["export"] = e
            else:
                gm = ep.module()
                sites = find_linear_sites(gm, model, include_conv1d=include_conv1d)
                _warn_conv1d(model, include_conv1d)
                return CapturedGraph(gm, sites, "export", args, kwargs, ep)
        if method in ("auto", "symbolic_trace"):
            try:
                gm = _symbolic_trace(model, const_kwargs)
            except Exception as e:  # noqa: BLE001
                errors["symbolic_trace"] = e
            else:
                if "export" in errors:
                    warnings.warn(
                        f"torch.export could not capture {type(model).__name__} "
                        f"({_one_line(errors['export'])}); fell back to torch.fx.symbolic_trace",
                        stacklevel=2,
                    )
                sites = find_linear_sites(gm, model, include_conv1d=include_conv1d)
                _warn_conv1d(model, include_conv1d)
                return CapturedGraph(gm, sites, "symbolic_trace", args, kwargs, None)

    raise _capture_error(model, errors) from next(iter(errors.values()))


def _export(model, args, tensor_kwargs, const_kwargs, dynamic, is_hf):
    trace_args, trace_kwargs, shapes = args, tensor_kwargs, None
    if dynamic:
        trace_args, trace_kwargs, shapes = _dynamic_shapes(model, args, tensor_kwargs, is_hf)
    with _baked_forward(model, const_kwargs):
        try:
            return torch.export.export(
                model, trace_args, trace_kwargs, dynamic_shapes=shapes, strict=False
            )
        except Exception as e:
            if shapes is None or not _is_constraint_violation(e):
                raise
            warnings.warn(
                f"torch.export rejected dynamic shapes for {type(model).__name__} "
                f"({_one_line(e)}); capturing with static shapes",
                stacklevel=3,
            )
            return torch.export.export(model, args, tensor_kwargs, strict=False)


def _dynamic_shapes(model, args, kwargs, is_hf):
    """Return (args, kwargs, ShapesCollection) for export's dynamic_shapes."""
    shapes = torch.export.ShapesCollection()
    Dim = torch.export.Dim
    if not is_hf:
        for t in _tensors((args, kwargs)):
            spec = {i: Dim.AUTO for i, s in enumerate(t.shape) if s >= 2}
            if spec:
                shapes[t] = spec
        return args, kwargs, shapes

    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = dict(kwargs)
    named = {
        k: v
        for k, v in bound.items()
        if k in _HF_SEQ_INPUTS and isinstance(v, torch.Tensor) and v.dim() >= 2
    }
    if not named:
        return args, kwargs, None
    ref = named.get("input_ids", named.get("inputs_embeds", next(iter(named.values()))))
    seq_len = ref.shape[1]
    seq = None
    if seq_len >= 2:
        seq = Dim("seq", min=2)
    else:
        warnings.warn(
            f"example sequence length is {seq_len}; export needs at least 2 for a dynamic "
            "sequence dimension, so the graph is specialized to this length",
            stacklevel=4,
        )
    # An example batch of 1 would be specialized: trace with batch 2 instead.
    if all(t.shape[0] == 1 for t in named.values()):
        repl = {id(t): t.repeat(2, *([1] * (t.dim() - 1))) for t in named.values()}
        swap = lambda v: repl.get(id(v), v) if isinstance(v, torch.Tensor) else v  # noqa: E731
        args = tuple(swap(a) for a in args)
        kwargs = {k: swap(v) for k, v in kwargs.items()}
        named = {k: swap(v) for k, v in named.items()}
    for t in named.values():
        spec = {0: Dim.AUTO}
        if seq is not None and t.shape[1] == seq_len:
            spec[1] = seq
        shapes[t] = spec
    return args, kwargs, shapes


def _symbolic_trace(model, const_kwargs):
    gm = torch.fx.symbolic_trace(model, concrete_args=const_kwargs or None)
    if const_kwargs:
        # symbolic_trace keeps a placeholder for each concrete arg, with the
        # *original* default, and asserts that it equals the concrete value: make
        # the concrete value the default so the graph can be called without it.
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            for name, value in const_kwargs.items():
                if re.fullmatch(rf"{re.escape(name)}(_\d+)?", str(node.target)):
                    node.args = (value,)
        gm.recompile()
    return gm


# ----------------------------------------------------------------------- linear sites


def find_linear_sites(
    gm: torch.fx.GraphModule,
    root: nn.Module | None = None,
    *,
    include_conv1d: bool = False,
) -> dict[str, LinearSite]:
    """Find the linear sites of ``gm`` in graph order.

    ``root`` is the model ``gm`` was captured from (module paths in ``gm`` are
    those of ``root``); it resolves module classes and tied weights. Without it,
    ``gm`` itself is used, and class names recorded by export are imported.
    """
    lookup = root if root is not None else gm
    sites: dict[str, LinearSite] = {}
    count: dict[str, int] = {}

    for node in gm.graph.nodes:
        site = None
        if node.op == "call_module":
            site = _call_module_site(gm, node)
        elif node.op == "call_function":
            if node.target in (torch.ops.aten.linear.default, F.linear, torch._C._nn.linear):
                site = _functional_site(gm, lookup, node)
            elif include_conv1d and node.target == torch.ops.aten.addmm.default:
                site = _conv1d_site(gm, lookup, node)
        if site is None:
            continue
        k = count.get(site.name, 0)
        count[site.name] = k + 1
        sites[site.name if k == 0 else f"{site.name}@{k}"] = site
    return sites


def _call_module_site(gm, node):
    try:
        mod = gm.get_submodule(node.target)
    except AttributeError:
        return None
    if not isinstance(mod, nn.Linear) or not isinstance(mod.weight, nn.Parameter):
        return None
    return LinearSite(
        name=node.target,
        node=node.name,
        weight=f"{node.target}.weight",
        bias=f"{node.target}.bias" if mod.bias is not None else None,
        in_features=mod.weight.shape[1],
        out_features=mod.weight.shape[0],
    )


def _functional_site(gm, lookup, node):
    w = _arg(node, 1, "weight")
    b = _arg(node, 2, "bias")
    weight = _param_attr(gm, w)
    if weight is None:
        return None  # computed weight
    bias = None
    if b is not None:
        if _param_attr(gm, b) is None and not _attr_tensor(gm, b):
            return None  # computed bias
        bias = b.target
    w_path, w_tensor = weight
    name = _site_name(node, lookup, w_tensor, w_path, nn.Linear)
    return LinearSite(
        name=name,
        node=node.name,
        weight=w_path,
        bias=bias,
        in_features=w_tensor.shape[1],
        out_features=w_tensor.shape[0],
    )


def _conv1d_site(gm, lookup, node):
    """aten.addmm(bias, x, weight) called from a transformers Conv1D."""
    conv1d = _conv1d_class()
    if conv1d is None or len(node.args) < 3:
        return None
    weight = _param_attr(gm, node.args[2])
    bias = _param_attr(gm, node.args[0])
    if weight is None or bias is None:
        return None
    w_path, w_tensor = weight
    owner = _stack_owner(node, lookup, w_tensor, w_path, conv1d)
    if owner is None:
        return None  # an addmm that is not a Conv1D layer
    return LinearSite(
        name=owner,
        node=node.name,
        weight=w_path,
        bias=bias[0],
        in_features=w_tensor.shape[0],
        out_features=w_tensor.shape[1],
        transposed=True,
    )


def _site_name(node, lookup, w_tensor, w_path, cls):
    owner = _stack_owner(node, lookup, w_tensor, w_path, cls)
    if owner is not None:
        return owner
    return w_path[: -len(".weight")] if w_path.endswith(".weight") else w_path


def _stack_owner(node, lookup, w_tensor, w_path, cls):
    """Innermost nn_module_stack module of class ``cls`` whose weight is ``w_tensor``."""
    stack = node.meta.get("nn_module_stack") or {}
    for fqn, mod_cls in reversed(list(stack.values())):
        fqn = re.sub(r"@\d+$", "", fqn)
        if not fqn or not _is_subclass(lookup, fqn, mod_cls, cls):
            continue
        if f"{fqn}.weight" == w_path:
            return fqn
        try:
            owner_weight = lookup.get_parameter(f"{fqn}.weight")
        except AttributeError:
            continue
        if owner_weight is w_tensor:  # the same tensor under another path: tied
            return fqn
    return None


def _is_subclass(lookup, fqn, mod_cls, cls) -> bool:
    try:
        mod = lookup.get_submodule(fqn)
        if type(mod) is not nn.Module:  # a real module, not export's empty mirror
            return isinstance(mod, cls)
    except AttributeError:
        pass
    if isinstance(mod_cls, type):
        return issubclass(mod_cls, cls)
    if isinstance(mod_cls, str):
        resolved = _import_class(mod_cls)
        if resolved is not None:
            return issubclass(resolved, cls)
        return cls is nn.Linear and mod_cls in _LINEAR_CLASS_NAMES
    return False


@functools.lru_cache(maxsize=256)
def _import_class(qualified: str):
    parts = qualified.split(".")
    for i in range(len(parts) - 1, 0, -1):
        mod = sys.modules.get(".".join(parts[:i]))
        if mod is None:
            try:
                mod = importlib.import_module(".".join(parts[:i]))
            except Exception:  # noqa: BLE001
                continue
        obj = mod
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            return None
        return obj if isinstance(obj, type) else None
    return None


def _conv1d_class():
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def _arg(node, i, name):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name)


def _param_attr(gm, n):
    """(path, parameter) if ``n`` is a get_attr node of a parameter, else None."""
    if not isinstance(n, torch.fx.Node) or n.op != "get_attr":
        return None
    try:
        return n.target, gm.get_parameter(n.target)
    except AttributeError:
        return None


def _attr_tensor(gm, n) -> bool:
    if not isinstance(n, torch.fx.Node) or n.op != "get_attr":
        return False
    try:
        obj = gm
        for p in n.target.split("."):
            obj = getattr(obj, p)
    except AttributeError:
        return False
    return isinstance(obj, torch.Tensor)


# --------------------------------------------------------------------------- helpers


def _is_hf_model(model) -> bool:
    tf = sys.modules.get("transformers")
    if tf is None:
        return False
    try:
        from transformers import PreTrainedModel
    except Exception:  # noqa: BLE001
        return False
    return isinstance(model, PreTrainedModel)


def _first_param_name(model):
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    return params[0] if params else None


def _tensors(tree):
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _has_tensor(value) -> bool:
    return bool(_tensors(value))


class _eval_mode:
    """Put every submodule in eval mode; restore each one's flag on exit."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode
        return False


class _baked_forward:
    """Install ``functools.partial(model.forward, **const)`` on the instance."""

    def __init__(self, model, const):
        self.model, self.const = model, const

    def __enter__(self):
        self.had = "forward" in self.model.__dict__
        self.old = self.model.__dict__.get("forward")
        if self.const:
            self.model.forward = functools.partial(self.model.forward, **self.const)

    def __exit__(self, *exc):
        if not self.const:
            return False
        if self.had:
            self.model.forward = self.old
        else:
            del self.model.forward
        return False


def _is_constraint_violation(e) -> bool:
    try:
        from torch._dynamo.exc import UserError, UserErrorType
    except Exception:  # noqa: BLE001
        return False
    return isinstance(e, UserError) and e.error_type == UserErrorType.CONSTRAINT_VIOLATION


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    msg = f"{type(e).__name__}: {text[0] if text else ''}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _module_at_fault(exc: BaseException, model: nn.Module):
    """Innermost submodule of ``model`` whose frame is on the exception's traceback."""
    names: dict[int, str] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), name)
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        found = None
        tb = e.__traceback__
        while tb is not None:
            try:
                obj = tb.tb_frame.f_locals.get("self")
            except Exception:  # noqa: BLE001
                obj = None
            if isinstance(obj, nn.Module) and id(obj) in names:
                found = (names[id(obj)], type(obj))
            tb = tb.tb_next
        if found is not None:
            return found
        e = e.__cause__ or e.__context__
    return None


def _capture_error(model, errors: dict[str, BaseException]) -> CaptureError:
    fault = None
    for e in errors.values():
        fault = _module_at_fault(e, model)
        if fault is not None and fault[0]:
            break
    model_cls = type(model).__name__
    tried = " or ".join(
        {"export": "torch.export", "symbolic_trace": "torch.fx.symbolic_trace"}[m] for m in errors
    )
    lines = [f"Could not capture {model_cls} with {tried}."]
    mod_name = mod_type = None
    if fault is not None:
        mod_name, cls = fault
        mod_type = f"{cls.__module__}.{cls.__qualname__}"
        where = f"submodule '{mod_name}' ({cls.__qualname__})" if mod_name else f"the model's own forward ({cls.__qualname__})"
        lines.append(f"Tracing failed in {where}.")
        target = f"'{mod_name}'" if mod_name else model_cls
    else:
        target = model_cls
    for m, e in errors.items():
        lines.append(f"  {m}: {_one_line(e)}")
    lines.append(
        "What you can do: make "
        f"{target}.forward traceable (no Python control flow on tensor values such as "
        "`if x.sum() > 0:`; use torch.where or torch.cond), pass different example inputs "
        "(the path they take must be traceable), or quantize without capture (module "
        "swapping of nn.Linear layers) where that is supported for this model."
    )
    return CaptureError(
        "\n".join(lines), module_name=mod_name, module_type=mod_type, errors=errors
    )


def _warn_conv1d(model, include_conv1d):
    if include_conv1d:
        return
    conv1d = _conv1d_class()
    if conv1d is None:
        return
    n = sum(isinstance(m, conv1d) for m in model.modules())
    if n:
        warnings.warn(
            f"{type(model).__name__} has {n} transformers Conv1D layers (GPT-2 style, weight "
            "stored [in, out]); they are not linear sites. Pass include_conv1d=True to report "
            "them with transposed=True.",
            stacklevel=3,
        )
