"""``Session``: run an exported lowbit model on onnxruntime, with a KV cache.

Imports onnxruntime, numpy, ``tokenizers`` (only when text is encoded or decoded) and
the standard library; never torch.

    from lowbit.runtime import Session
    s = Session("out/")                       # checks every file's sha256 first
    for piece in s.stream("Once upon a time", max_new_tokens=32):
        print(piece, end="", flush=True)
    g = s.generate("Once upon a time", max_new_tokens=32, temperature=0.8, top_p=0.9, seed=0)
    g.text, g.token_ids

Decoding: prefill runs the whole prompt with empty past tensors (length 0); each step
then feeds one token, the presents of the previous step as past, ``position_ids`` =
its position and an ``attention_mask`` of ones over past + 1. Greedy decoding
(``temperature=0``) takes the first index of the largest logit, like ``torch.argmax``.
Sampling divides the logits by ``temperature``, keeps the ``top_k`` largest, then the
smallest set of most likely tokens whose probability reaches ``top_p`` (Hugging Face's
order of warpers), and draws from the softmax with ``numpy.random.default_rng(seed)``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from . import manifest as mf

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class Generation:
    """The result of :meth:`Session.generate`."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str  # "eos", "length" or "max_position"
    prefill_seconds: float = 0.0
    decode_seconds: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        t = sum(self.decode_seconds)
        return len(self.decode_seconds) / t if t > 0 else float("nan")


def pick_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Execution providers to use: ``requested`` (each must be available) or, by default,
    those of :data:`DEFAULT_PROVIDERS` this onnxruntime build has (CPU always)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ValueError(f"execution providers {missing} are not available; this onnxruntime has {available}")
        return list(requested)
    chosen = [p for p in DEFAULT_PROVIDERS if p in available]
    return chosen or ["CPUExecutionProvider"]


class Session:
    """An exported model folder, loaded for inference.

    ``directory``: the folder written by ``lowbit.export_onnx``. ``providers``: onnxruntime
    execution providers (default: :func:`pick_providers`). ``threads``: intra-op threads
    (default: onnxruntime's choice). ``verify``: check the sha256 of every file listed in
    the manifest before loading (raises :class:`lowbit.runtime.ManifestError`).
    ``session_options``: extra onnxruntime config entries, applied after the manifest's
    (the manifest sets ``session.qdq_matmulnbits_accuracy_level`` explicitly).
    """

    def __init__(self, directory: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None, verify: bool = True, session_options: dict | None = None):
        import onnxruntime as ort

        t0 = time.perf_counter()
        self.directory = Path(directory)
        self.manifest = mf.read_manifest(self.directory, verify=verify)
        model = self.manifest["model"]
        self.num_layers = int(model["num_layers"])
        self.num_kv_heads = int(model["num_kv_heads"])
        self.head_dim = int(model["head_dim"])
        self.vocab_size = int(model["vocab_size"])
        self.max_positions = int(model.get("max_position_embeddings") or 1 << 30)
        self.dtype = _NP_DTYPES.get(model.get("dtype", "float32"), np.float32)
        eos = model.get("eos_token_id")
        tok = self.manifest.get("tokenizer") or {}
        if eos is None:
            eos = tok.get("eos_token_id")
        self.eos_token_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        entries = {"session.qdq_matmulnbits_accuracy_level": "0"}
        entries.update(self.manifest.get("session_options") or {})
        entries.update(session_options or {})
        for key, value in entries.items():
            so.add_session_config_entry(key, str(value))
        self.session_config = entries
        self.providers = pick_providers(providers)
        onnx_file = self.directory / self.manifest["onnx"]["file"]
        self.session = ort.InferenceSession(str(onnx_file), so, providers=self.providers)
        _release_freed_heap()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        expected = self.manifest["onnx"].get("inputs")
        if expected and list(expected) != self.input_names:
            raise mf.ManifestError(f"{onnx_file}: inputs {self.input_names} differ from the manifest's {expected}")
        self._tokenizer = None
        self.load_seconds = time.perf_counter() - t0

    # -- tokenizer -----------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` saved with the model (loaded on first use)."""
        if self._tokenizer is None:
            entry = self.manifest.get("tokenizer")
            if not entry:
                raise ValueError(f"{self.directory} has no tokenizer: pass token ids instead of text")
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.directory / entry["file"]))
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (with the special tokens the tokenizer adds, e.g. BOS)."""
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- model -------------------------------------------------------------------------
    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        """Past key/value tensors of length 0 (prefill)."""
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, self.dtype) for _ in range(2 * self.num_layers)]

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None,
                attention_mask: np.ndarray | None = None, position_ids: np.ndarray | None = None):
        """One call of the graph: returns ``(logits [b, s, vocab], presents)``.

        ``input_ids`` [b, s] int64; ``past``: 2 * layers arrays [b, kv_heads, p, head_dim]
        (default: empty); ``attention_mask`` [b, p + s] (default: ones);
        ``position_ids`` [b, s] (default: p, p + 1, ...).
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        b, s = input_ids.shape
        past = self.empty_past(b) if past is None else past
        p = past[0].shape[2]
        if attention_mask is None:
            attention_mask = np.ones((b, p + s), np.int64)
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s))
        feed = {"input_ids": input_ids, "attention_mask": np.asarray(attention_mask, np.int64),
                "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64)}
        for i in range(self.num_layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        outs = self.session.run(self.output_names, feed)
        return outs[0], outs[1:]

    # -- generation ---------------------------------------------------------------------
    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        return ids

    def generate_ids(self, prompt: str | Sequence[int], max_new_tokens: int = 32, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                     stop_at_eos: bool = True, stats: dict | None = None) -> Iterator[int]:
        """Yield generated token ids one at a time (the core loop; see the module docstring).

        ``stats`` (a dict), when given, receives ``prompt_ids``, ``prefill_seconds``,
        ``decode_seconds`` (per step) and ``finish_reason``.
        """
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        ids = self._prompt_ids(prompt)
        stats = {} if stats is None else stats
        stats.update(prompt_ids=ids, decode_seconds=[], finish_reason="length")
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        logits, past = self.forward(np.asarray([ids], np.int64))
        stats["prefill_seconds"] = time.perf_counter() - t0
        pos = len(ids)
        for step in range(max_new_tokens):
            token = select_token(logits[0, -1], temperature, top_k, top_p, rng)
            yield token
            if stop_at_eos and token in self.eos_token_ids:
                stats["finish_reason"] = "eos"
                return
            if step == max_new_tokens - 1:
                return
            if pos >= self.max_positions:
                stats["finish_reason"] = "max_position"
                return
            t0 = time.perf_counter()
            logits, past = self.forward(np.asarray([[token]], np.int64), past)
            stats["decode_seconds"].append(time.perf_counter() - t0)
            pos += 1

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 32, **options) -> Iterator[str]:
        """Yield the generated text piece by piece as tokens arrive (incremental decoding:
        a piece is emitted once it no longer ends in an incomplete UTF-8 sequence)."""
        ids: list[int] = []
        emitted = ""
        for token in self.generate_ids(prompt, max_new_tokens, **options):
            ids.append(token)
            text = self.decode(ids)
            if text.endswith("\ufffd"):
                continue
            if text.startswith(emitted):
                piece, emitted = text[len(emitted):], text
                if piece:
                    yield piece
        text = self.decode(ids)
        if len(text) > len(emitted) and text.startswith(emitted):
            yield text[len(emitted):]

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 on_token: Callable[[int | None, str], None] | None = None, stop_at_eos: bool = True) -> Generation:
        """Generate up to ``max_new_tokens`` tokens after ``prompt`` (text, or token ids).

        ``temperature=0`` is greedy decoding; ``on_token(token_id, piece)`` is called for
        every token as it is produced (``piece``: its text, "" while a character is
        incomplete or when the artifact has no tokenizer), and once more with
        ``token_id=None`` if text held back at the end remains to be shown.
        """
        stats: dict = {}
        ids: list[int] = []
        emitted = ""
        has_tok = bool(self.manifest.get("tokenizer"))
        for token in self.generate_ids(prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                       stop_at_eos, stats):
            ids.append(token)
            if on_token is not None:
                piece = ""
                if has_tok:
                    text = self.decode(ids)
                    if not text.endswith("\ufffd") and text.startswith(emitted):
                        piece, emitted = text[len(emitted):], text
                on_token(token, piece)
        text = self.decode(ids) if has_tok else ""
        if on_token is not None and len(text) > len(emitted) and text.startswith(emitted):
            on_token(None, text[len(emitted):])  # flush what an incomplete character held back
        return Generation(text, ids, stats["prompt_ids"], stats["finish_reason"],
                          stats.get("prefill_seconds", 0.0), stats["decode_seconds"])


def _release_freed_heap() -> None:
    """Give memory freed while onnxruntime loaded the model back to the OS (glibc only).

    Loading folds the weight-unpacking nodes into new initializers; the temporaries are
    freed, but glibc keeps the freed heap mapped, so the process's resident memory would
    include it (about +180 MiB for SmolLM2 at W2). ``malloc_trim(0)`` returns it.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not os.uname().sysname == "Linux":
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def select_token(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 rng: np.random.Generator | None = None) -> int:
    """Next token from one row of logits: argmax when ``temperature == 0``, else a draw
    after temperature, top-k and top-p filtering (see the module docstring)."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(logits))
    rng = rng or np.random.default_rng()
    z = logits / temperature
    if 0 < top_k < z.shape[-1]:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = cum - p[order] < top_p  # tokens before which the mass is still below top_p
        keep[0] = True
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.shape[-1], p=p))
