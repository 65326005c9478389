"""Recipes: what to quantize, to which formats, with which passes.

A recipe is a plain dataclass that round-trips through JSON and YAML. ``passes`` is an
ordered list of ``{"name": ..., **options}`` entries for the passes that run before
quantization (for example ``{"name": "rotate"}``); ``ignore`` holds ``fnmatch``
patterns of site names left in high precision (the classifier head by default).
``overrides`` gives some sites other formats: entries ``{"sites": [patterns], "weight":
{...}, "activation": {...} | None}``, the first matching entry wins, and a site an entry
matches is quantized with its formats even when ``ignore`` matches it too (for example
the classifier at W4A16 in a W2A16 model: ``recipe.with_override("lm_head", "w4a16")``).
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from .formats import QFormat

DEFAULT_IGNORE = ["lm_head", "*.lm_head", "output", "classifier", "score"]


@dataclass
class Recipe:
    name: str
    weight: QFormat
    activation: QFormat | None = None
    weight_method: str = "rtn"
    weight_options: dict = field(default_factory=dict)   # e.g. GPTQ: {"act_order": true, "damp": 0.01}
    clip_search: bool = True
    # candidate activation clip ratios: with calibration data each site takes the one whose output
    # is closest to the float site's on its own inputs (empty: the activation format's clip for all)
    act_clip_search: list[float] = field(default_factory=list)
    passes: list[dict] = field(default_factory=list)
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    overrides: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.weight, dict):
            self.weight = QFormat.from_dict(self.weight)
        if isinstance(self.activation, dict):
            self.activation = QFormat.from_dict(self.activation)
        if self.weight.clip != 1.0:
            raise ValueError("a clip ratio belongs to the activation format; weights choose their clipping per "
                             "group (clip_search, GPTQ, learned scales)")
        if self.weight_method not in ("rtn", "gptq"):
            raise ValueError(f"weight_method must be 'rtn' or 'gptq', got {self.weight_method!r}")
        self.act_clip_search = [float(c) for c in self.act_clip_search]
        if self.act_clip_search and (self.activation is None or any(not 0 < c <= 1 for c in self.act_clip_search)):
            raise ValueError("act_clip_search needs an activation format and clip ratios in (0, 1], got "
                             f"{self.act_clip_search}")
        for p in self.passes:
            if not isinstance(p, dict) or "name" not in p:
                raise ValueError(f"each pass entry must be a dict with a 'name', got {p!r}")
        self.overrides = [_override_entry(o) for o in self.overrides]

    def is_ignored(self, site: str) -> bool:
        return any(fnmatch.fnmatchcase(site, pat) for pat in self.ignore)

    def formats_for(self, site: str) -> tuple[QFormat, QFormat | None] | None:
        """(weight format, activation format or None) of ``site``; None when it stays in float."""
        for o in self.overrides:
            if any(fnmatch.fnmatchcase(site, pat) for pat in o["sites"]):
                return o["weight"], o["activation"]
        return None if self.is_ignored(site) else (self.weight, self.activation)

    def with_override(self, sites: "str | list[str]", formats: "str | Recipe") -> "Recipe":
        """This recipe with ``sites`` (fnmatch patterns) quantized to the weight and
        activation formats of ``formats`` (a preset name such as "w4a16", or a Recipe)."""
        other = get_recipe(formats)
        entry = {"sites": [sites] if isinstance(sites, str) else list(sites),
                 "weight": other.weight, "activation": other.activation}
        return replace(self, overrides=list(self.overrides) + [entry])

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "weight": self.weight.to_dict(),
            "activation": self.activation.to_dict() if self.activation else None,
            "weight_method": self.weight_method,
            "weight_options": dict(self.weight_options),
            "clip_search": self.clip_search,
            "act_clip_search": list(self.act_clip_search),
            "passes": [dict(p) for p in self.passes],
            "ignore": list(self.ignore),
            "overrides": [{"sites": list(o["sites"]), "weight": o["weight"].to_dict(),
                           "activation": o["activation"].to_dict() if o["activation"] else None}
                          for o in self.overrides],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = {"name", "weight", "activation", "weight_method", "weight_options", "clip_search", "act_clip_search",
                 "passes", "ignore", "overrides"}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown recipe fields {sorted(extra)}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        return cls.from_dict(yaml.safe_load(text))

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        text = path.read_text()
        return cls.from_json(text) if path.suffix == ".json" else cls.from_yaml(text)

    def with_passes(self, *passes: dict) -> "Recipe":
        return replace(self, passes=list(self.passes) + list(passes))

    def with_gptq(self, **options) -> "Recipe":
        """This recipe with GPTQ weights (options: act_order, damp, calibration_rows)."""
        return replace(self, name=self.name + "-gptq", weight_method="gptq", weight_options=dict(options))


def _override_entry(o) -> dict:
    """A normalised ``overrides`` entry: sites as a list of patterns, formats as QFormats."""
    if not isinstance(o, dict) or "sites" not in o or "weight" not in o:
        raise ValueError(f"each override must be a dict with 'sites' and 'weight' (and optionally 'activation'), "
                         f"got {o!r}")
    extra = set(o) - {"sites", "weight", "activation"}
    if extra:
        raise ValueError(f"unknown override fields {sorted(extra)}; known: activation, sites, weight")
    sites = [o["sites"]] if isinstance(o["sites"], str) else list(o["sites"])
    if not sites or not all(isinstance(p, str) for p in sites):
        raise ValueError(f"override 'sites' must be a pattern or a non-empty list of patterns, got {o['sites']!r}")
    weight = o["weight"] if isinstance(o["weight"], QFormat) else QFormat.from_dict(o["weight"])
    act = o.get("activation")
    act = act if act is None or isinstance(act, QFormat) else QFormat.from_dict(act)
    return {"sites": sites, "weight": weight, "activation": act}


def _preset(name, wbits, abits, group=16):
    return Recipe(name, QFormat(wbits, "int", group, "e4m3"), QFormat(abits, "int", group, "e4m3") if abits else None)


def _btc() -> Recipe:
    """Sub-1-bit binary codebook weights (``lowbit.passes.codebook``, its ``BTC_OPTIONS``);
    sites the codebook pass leaves (none but the ignored ones) would get 1-bit signs."""
    from lowbit.passes.codebook import BTC_OPTIONS

    return Recipe("btc", QFormat(1, "half", 16, "e4m3"), passes=[{"name": "codebook", **BTC_OPTIONS}])


W2A2_HALF_CLIP = 0.55  # activation clip ratio of w2a2-half: rotated GPTQ start on SmolLM2, docs/qat.md
# with calibration data each w2a2-half site picks its own ratio among these (rotated GPTQ start on
# SmolLM2: 12,908 against 20,764 with 0.55 for all, docs/qat.md)
W2A2_HALF_CLIP_SEARCH = [0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 1.0]

PRESETS = {
    "w8a8": lambda: _preset("w8a8", 8, 8),
    "w4a16": lambda: _preset("w4a16", 4, 0),
    "w4a4": lambda: _preset("w4a4", 4, 4),
    "w3a16": lambda: _preset("w3a16", 3, 0),
    "w2a16": lambda: _preset("w2a16", 2, 0),
    # the symmetric 2-bit grid: values (q + 1/2) s, q in {-2, -1, 0, 1}, i.e. +-s/2 and +-3s/2
    "w2a16-half": lambda: Recipe("w2a16-half", QFormat(2, "half", 16, "e4m3")),
    "w2a2": lambda: _preset("w2a2", 2, 2),
    # symmetric grids for weights and activations, the activations clipped (lowbit.formats), each
    # site's ratio searched on calibration data: the best 2-bit start after rotation on SmolLM2
    "w2a2-half": lambda: Recipe("w2a2-half", QFormat(2, "half", 16, "e4m3"),
                                QFormat(2, "half", 16, "e4m3", W2A2_HALF_CLIP),
                                act_clip_search=list(W2A2_HALF_CLIP_SEARCH)),
    "btc": _btc,
}


def with_override_specs(recipe: "str | Recipe", specs: "list[str] | None") -> Recipe:
    """``recipe`` with command-line overrides ``"PATTERN=PRESET"`` (e.g. ``"lm_head=w4a16"``)."""
    recipe = get_recipe(recipe)
    for spec in specs or []:
        pattern, sep, preset = spec.partition("=")
        if not sep or not pattern or not preset:
            raise ValueError(f"override {spec!r}: expected PATTERN=PRESET, e.g. lm_head=w4a16")
        recipe = recipe.with_override(pattern, preset)
    return recipe


def get_recipe(recipe: "str | Recipe | dict | Path") -> Recipe:
    """A Recipe from a preset name, a dict, a Recipe, or a .json/.yaml file path."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    s = str(recipe)
    if s in PRESETS:
        return PRESETS[s]()
    if Path(s).suffix in (".json", ".yaml", ".yml") and Path(s).exists():
        return Recipe.from_file(s)
    raise ValueError(f"unknown recipe {s!r}: use one of {sorted(PRESETS)}, a Recipe, or a .json/.yaml file")
