"""Manifests (``manifest.json``): the ONNX artifact's format, and the checks every lowbit
artifact gets (format, version, each file's size and sha256: :func:`load_checked`, also
used by ``lowbit.load`` for the PyTorch artifacts of ``lowbit.save``). Standard library only.

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
    """The manifest's record of a file: ``{"sha256", "bytes"}``."""
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def load_checked(directory: str | Path, fmt: str, version: int, required: tuple[str, ...], *,
                 verify: bool = True, error: type[Exception] = ManifestError, what: str = "lowbit artifact",
                 hints: dict | None = None) -> dict:
    """Read ``directory/manifest.json`` and check it: ``format == fmt``, ``format_version ==
    version``, the ``required`` keys present and (``verify``) every file of its ``files``
    entry present with its size and sha256. Raises ``error`` (a message naming the
    problem) on any mismatch. The one reader of both manifest formats: the PyTorch
    artifacts of ``lowbit.save`` and the ONNX artifacts of ``lowbit.export_onnx``.
    ``hints``: extra text for a manifest of another known format, by format name."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise error(f"{directory} is not a {what}: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is corrupted: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        hint = (hints or {}).get(found, "")
        raise error(f"{path} is not a {what} manifest (format={found!r}){hint}")
    found = manifest.get("format_version")
    if found != version:
        raise error(f"{directory} has format version {found!r}; this lowbit reads version {version}. "
                    "Re-export it with a matching lowbit version.")
    for key in required:
        if key not in manifest:
            raise error(f"{path} lacks the '{key}' entry")
    if verify:
        verify_files(directory, manifest["files"], error)
    return manifest


def verify_files(directory: str | Path, files: dict, error: type[Exception] = ManifestError) -> None:
    """Check each ``{name: {"sha256", "bytes"}}`` entry against the file in ``directory``."""
    for name, meta in files.items():
        p = Path(directory) / name
        if not p.is_file():
            raise error(f"{directory}: file {name} listed in the manifest is missing")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise error(f"{directory}: {name} has {size} bytes, the manifest says {meta['bytes']} "
                        "(truncated or replaced)")
        if sha256_file(p) != meta["sha256"]:
            raise error(f"{directory}: {name} fails its sha256 check (corrupted)")


def read_manifest(directory: str | Path, verify: bool = True) -> dict:
    """Read an ONNX artifact's ``manifest.json`` and check format, version and
    (``verify``) every file's size and sha256. Raises :class:`ManifestError` on any mismatch."""
    return load_checked(directory, FORMAT, FORMAT_VERSION, ("model", "onnx", "files"), verify=verify,
                        what="lowbit ONNX artifact",
                        hints={"lowbit": " (a PyTorch artifact from lowbit.save: export it with lowbit.export_onnx)"})
