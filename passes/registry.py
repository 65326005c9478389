"""Pass names used in recipes, mapped to the pass classes that implement them.

A recipe's ``passes`` entry ``{"name": "rotate", "seed": 0}`` becomes
``make({"name": "rotate", "seed": 0}, context)``: the class registered under "rotate",
built with the remaining keys as options and the compile context.
"""
from __future__ import annotations

import importlib

# name -> "module:Class", imported lazily so a pass's dependencies load only when used
PASSES: dict[str, str] = {
    "fold_norms": "lowbit.passes.fold_norms:FoldNormsPass",
    "rotate": "lowbit.passes.rotate:RotatePass",
    "split_outliers": "lowbit.passes.split_outliers:SplitOutliersPass",
    "codebook": "lowbit.passes.codebook:CodebookPass",
    "fuse": "lowbit.passes.fuse:FusePass",
}


def register(name: str, target: str) -> None:
    PASSES[name] = target


def make(entry: dict, context):
    opts = dict(entry)
    name = opts.pop("name")
    if name not in PASSES:
        raise ValueError(f"unknown pass {name!r} in recipe; known passes: {sorted(PASSES)}")
    module, cls = PASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)(context=context, **opts)


def weight_quantizer(recipe, context):
    """The weight quantizer for ``recipe.weight_method`` (None: the quantize pass's RTN)."""
    if recipe.weight_method == "rtn":
        return None
    if recipe.weight_method == "gptq":
        from lowbit.passes.gptq import GPTQWeightQuantizer

        opts = {k: v for k, v in recipe.weight_options.items() if k in ("act_order", "damp")}
        return GPTQWeightQuantizer(recipe.weight, clip_search=recipe.clip_search, **opts)
    raise ValueError(f"unknown weight_method {recipe.weight_method!r}")
