"""Artifacts: ``lowbit.save(qmodel, dir)`` and ``lowbit.load(dir)``.

An artifact folder holds
* ``model.safetensors``: every parameter and buffer (packed codes as uint8, E4M3 scales
  as float8_e4m3fn, global scales fp32, unquantized weights as they were);
* ``manifest.json``: ``format`` ("lowbit"), ``format_version``, the recipe, the model's
  class and config, the configuration of each QuantLinear site, the compile report,
  and the sha256 and size of every file.

Loading reads JSON and safetensors only (never pickle). It checks the manifest's format
and version and every file's size and checksum before it builds anything, so a
corrupted, truncated or mismatched artifact raises :class:`ArtifactError` and loads
nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.runtime.manifest import MANIFEST_FILE, ManifestError, file_entry, load_checked

from . import quant_linear  # noqa: F401  (registers QuantLinear)
from . import codebook  # noqa: F401  (registers CodebookLinear)
from .sites import is_site_module, site_config, site_module_from_config

FORMAT = "lowbit"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


class ArtifactError(ManifestError):
    """A lowbit artifact is missing, corrupted, truncated or of another format version."""


def quant_sites(model: nn.Module) -> dict[str, dict]:
    """Config of every site module (QuantLinear, PrologueLinear, ...) by module name."""
    from . import prologue  # noqa: F401  (registers PrologueLinear)

    return {name: site_config(m) for name, m in model.named_modules() if is_site_module(m)}


def save(qmodel: nn.Module, directory: str | Path, tokenizer=None, source: str | None = None) -> Path:
    """Save a compiled Hugging Face model (and optionally its tokenizer) to ``directory``.

    ``source``: where the float model came from (a ``lowbit.models.load_model`` name or
    path), recorded so tools can find its tokenizer when none is saved.
    """
    from safetensors.torch import save_model

    config = getattr(qmodel, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError("lowbit.save supports compiled Hugging Face models (with a .config); "
                        "for a rewritten GraphModule use torch.export.save on an export of it")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(qmodel, str(directory / WEIGHTS_FILE))
    extra_files = []
    if tokenizer is not None:
        if not hasattr(tokenizer, "save_pretrained"):
            raise TypeError("tokenizer must have save_pretrained() (a Hugging Face tokenizer)")
        tok_dir = directory / "tokenizer"
        tokenizer.save_pretrained(str(tok_dir))
        extra_files = [p for p in sorted(tok_dir.rglob("*")) if p.is_file()]
    files = {}
    for p in [directory / WEIGHTS_FILE, *extra_files]:
        files[str(p.relative_to(directory))] = file_entry(p)
    report = getattr(qmodel, "lowbit_report", None)
    recipe = getattr(qmodel, "lowbit_recipe", None)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"class": type(qmodel).__name__, "config": config.to_dict(), "source": source},
        "recipe": recipe.to_dict() if recipe is not None else None,
        "sites": quant_sites(qmodel),
        "files": files,
        "report": report.to_dict() if report is not None else None,
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str))
    return directory


def read_manifest(directory: str | Path, verify: bool = True) -> dict:
    """Read and check ``manifest.json`` (format, version, and file sizes and checksums)."""
    return load_checked(directory, FORMAT, FORMAT_VERSION, ("model", "sites", "files"), verify=verify,
                        error=ArtifactError, what="lowbit artifact",
                        hints={"lowbit-onnx": " (an ONNX export: run it with lowbit run or lowbit.runtime.Session)"})


def load(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a compiled model saved by :func:`save`. Verifies everything before building."""
    import transformers
    from safetensors.torch import load_model

    from .pass_manager import CompileReport
    from .recipes import Recipe

    directory = Path(directory)
    manifest = read_manifest(directory, verify=True)
    cls_name = manifest["model"]["class"]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ArtifactError(f"model class {cls_name} is not in this transformers version")
    cfg_dict = dict(manifest["model"]["config"])
    config = transformers.AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    model = cls(config)
    for name, site in manifest["sites"].items():
        try:
            module = site_module_from_config(site)
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{directory}: site {name} cannot be rebuilt: {e}") from e
        model.set_submodule(name, module)
    if any(type(m).__name__ == "FusedSlice" for m in model.modules()):  # sites joined by the fuse pass
        from .fused import link_fused_sites

        link_fused_sites(model)  # also checks that every fused sibling was rebuilt
    try:
        missing, unexpected = load_model(model, str(directory / WEIGHTS_FILE), strict=False)
    except Exception as e:  # safetensors header errors, shape mismatches
        raise ArtifactError(f"{directory / WEIGHTS_FILE} could not be loaded: {e}") from e
    if unexpected or missing:
        raise ArtifactError(f"{directory}: weights do not match the model (missing {list(missing)[:5]}, "
                            f"unexpected {list(unexpected)[:5]})")
    model.eval().to(device)
    if manifest.get("recipe"):
        model.lowbit_recipe = Recipe.from_dict(manifest["recipe"])
    if manifest.get("report"):
        model.lowbit_report = CompileReport.from_dict(manifest["report"])
    return model


def load_tokenizer(directory: str | Path):
    """The tokenizer saved beside an artifact, or None."""
    tok_dir = Path(directory) / "tokenizer"
    if not tok_dir.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))
