"""The manifest of an exported ONNX artifact (``manifest.json``); standard library only.

An artifact folder written by :func:`lowbit.codegen.onnx.export_onnx` holds::

    model.onnx           the graph (opset 23 + com.microsoft), inputs/outputs named as Optimum names them
    model.onnx.data      its initializers, when they are large (external data)
    tokenizer.json       the tokenizer (Hugging Face ``tokenizers`` format), when exported
    manifest.json        this file

``manifest.json`` keys: ``format`` ("lowbit-onnx"), ``format_version``, ``model`` (class,
Hugging Face config, cache geometry, bos/eos ids), ``recipe`` (the lowbit recipe or
null for a float export), ``bits_per_weight``, ``onnx`` (file, opset, IR version, input
and output names, weight kernel), ``session_options`` (onnxruntime config entries the
runtime must set), ``tokenizer`` (file and special token ids, or null) and ``files``
(``{name: {"sha256", "bytes"}}`` for every other file in the folder).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "lowbit-onnx"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"


class ManifestError(RuntimeError):
    """An exported artifact is missing, corrupted, truncated or of another format version."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def read_manifest(directory: str | Path, verify: bool = True) -> dict:
    """Read ``manifest.json`` and check format, version and (``verify``) every file's
    size and sha256. Raises :class:`ManifestError` on any mismatch."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{directory} is not a lowbit ONNX artifact: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is corrupted: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        hint = " (a PyTorch artifact from lowbit.save: export it with lowbit.export_onnx)" if fmt == "lowbit" else ""
        raise ManifestError(f"{path} is not a lowbit ONNX manifest (format={fmt!r}){hint}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{directory} has format version {manifest.get('format_version')!r}; this runtime "
                            f"reads version {FORMAT_VERSION}")
    for key in ("model", "onnx", "files"):
        if key not in manifest:
            raise ManifestError(f"{path} lacks the '{key}' entry")
    if verify:
        verify_files(directory, manifest)
    return manifest


def verify_files(directory: Path, manifest: dict) -> None:
    for name, meta in manifest["files"].items():
        p = Path(directory) / name
        if not p.is_file():
            raise ManifestError(f"{directory}: file {name} listed in the manifest is missing")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise ManifestError(f"{directory}: {name} has {size} bytes, the manifest says {meta['bytes']} "
                                "(truncated or replaced)")
        if sha256_file(p) != meta["sha256"]:
            raise ManifestError(f"{directory}: {name} fails its sha256 check (corrupted)")
