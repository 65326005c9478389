"""Registry of the module types a pass may put at a linear site.

Materialization moves every such module into the original module tree, and artifacts
save each one's ``config()`` (with its class name) and rebuild it with
``from_config(cfg)`` before loading the tensors.
"""
from __future__ import annotations

from torch import nn

SITE_MODULES: dict[str, type] = {}

# site module classes defined in modules that artifacts do not import themselves
_DEFINED_IN = {"FusedSlice": "lowbit.fused"}


def register_site_module(cls):
    """Class decorator for modules that implement ``config()`` and ``from_config(cfg)``."""
    SITE_MODULES[cls.__name__] = cls
    return cls


def is_site_module(module: nn.Module) -> bool:
    return type(module).__name__ in SITE_MODULES and isinstance(module, SITE_MODULES[type(module).__name__])


def site_config(module: nn.Module) -> dict:
    return {"class": type(module).__name__, **module.config()}


def site_module_from_config(cfg: dict) -> nn.Module:
    cfg = dict(cfg)
    name = cfg.pop("class", "QuantLinear")
    if name not in SITE_MODULES and name in _DEFINED_IN:
        import importlib

        importlib.import_module(_DEFINED_IN[name])
    if name not in SITE_MODULES:
        raise ValueError(f"unknown site module class {name!r}; known: {sorted(SITE_MODULES)}")
    return SITE_MODULES[name].from_config(cfg)
