"""Readers for Andrej Karpathy's llama2.c model and tokenizer files.

Two formats are supported:

* the "v0" (legacy) checkpoint: a header of seven little-endian int32 fields
  ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len`` followed by
  the fp32 weights in a fixed order (see :func:`load_llama2c`).  A negative
  ``vocab_size`` means the classifier has its own weights instead of sharing the
  token embedding.
* the tokenizer file: an int32 ``max_token_length``, then for every token a float32
  merge score, an int32 byte length and the token's bytes.

:func:`load_llama2c` turns a checkpoint into a Hugging Face ``LlamaForCausalLM`` so the
rest of lowbit can treat it like any other Llama.  :class:`Llama2cTokenizer` is a
plain-Python implementation of llama2.c's greedy BPE encoder and its decoder.

This module imports neither torch nor transformers at import time: the tokenizer and
:func:`shared_data_dir` work without them.
"""

from __future__ import annotations

import heapq
import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "Llama2cConfig",
    "Llama2cTokenizer",
    "load_llama2c",
    "read_llama2c_checkpoint",
    "shared_data_dir",
]


# ---------------------------------------------------------------------------------------
# shared data folder
# ---------------------------------------------------------------------------------------

def shared_data_dir() -> Path | None:
    """Return the folder holding the project's shared evaluation data, or ``None``.

    The environment variable ``LOWBIT_DATA`` wins when set (it is returned even if
    the folder does not exist, so a typo shows up as a missing file rather than being
    silently ignored).  Otherwise the first existing folder of
    ``<repository root>/../shared/data`` (the repository root being the parent of the
    ``compiler/`` folder this file lives in) and ``./../shared/data`` (relative to the
    current working directory) is returned.
    """
    env = os.environ.get("LOWBIT_DATA")
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parent.parent
    for candidate in (repo_root / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


# ---------------------------------------------------------------------------------------
# checkpoint
# ---------------------------------------------------------------------------------------

class Llama2cConfig:
    """The seven header fields of a llama2.c v0 checkpoint."""

    HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")

    def __init__(self, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len):
        self.dim = int(dim)
        self.hidden_dim = int(hidden_dim)
        self.n_layers = int(n_layers)
        self.n_heads = int(n_heads)
        self.n_kv_heads = int(n_kv_heads)
        # llama2.c stores a negative vocab size when the classifier is not shared.
        self.shared_classifier = int(vocab_size) > 0
        self.vocab_size = abs(int(vocab_size))
        self.seq_len = int(seq_len)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        fields = ", ".join(f"{k}={getattr(self, k)}" for k in self.HEADER_FIELDS)
        return f"Llama2cConfig({fields}, shared_classifier={self.shared_classifier})"


def read_llama2c_checkpoint(checkpoint_path) -> tuple[Llama2cConfig, dict[str, np.ndarray]]:
    """Read a llama2.c v0 checkpoint into a config and a dict of float32 numpy arrays.

    The arrays keep llama2.c's own layout and names (``token_embedding``, ``wq``,
    ``wk`` ... stacked over layers); no RoPE permutation is applied here.  Raises
    ``ValueError`` when the file size does not match what the header announces.
    """
    path = Path(checkpoint_path)
    raw = path.read_bytes()
    header_size = 7 * 4
    if len(raw) < header_size:
        raise ValueError(f"{path}: too short to be a llama2.c checkpoint ({len(raw)} bytes)")
    cfg = Llama2cConfig(*struct.unpack("<7i", raw[:header_size]))
    if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"{path}: inconsistent header {cfg!r}")

    data = np.frombuffer(raw, dtype="<f4", offset=header_size)
    d, h, L, V, hd = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.vocab_size, cfg.head_dim
    kv_dim = cfg.n_kv_heads * hd
    layout = [
        ("token_embedding", (V, d)),
        ("rms_att", (L, d)),
        ("wq", (L, d, d)),
        ("wk", (L, kv_dim, d)),
        ("wv", (L, kv_dim, d)),
        ("wo", (L, d, d)),
        ("rms_ffn", (L, d)),
        ("w1", (L, h, d)),
        ("w2", (L, d, h)),
        ("w3", (L, h, d)),
        ("rms_final", (d,)),
        # Legacy RoPE tables (cos and sin, each seq_len x head_dim/2); unused.
        ("freq_cis_real", (cfg.seq_len, hd // 2)),
        ("freq_cis_imag", (cfg.seq_len, hd // 2)),
    ]
    if not cfg.shared_classifier:
        layout.append(("wcls", (V, d)))

    needed = sum(int(np.prod(shape)) for _, shape in layout)
    if data.size != needed:
        raise ValueError(
            f"{path}: expected {needed} float32 values after the header for {cfg!r}, "
            f"found {data.size}"
        )
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in layout:
        n = int(np.prod(shape))
        tensors[name] = data[offset:offset + n].reshape(shape)
        offset += n
    return cfg, tensors


def _interleaved_to_half_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of a query/key projection for HF's rotary convention.

    llama2.c rotates the pairs of adjacent features ``(2i, 2i+1)`` of each head by the
    i-th frequency; Hugging Face's ``rotate_half`` rotates the pairs ``(i, i + hd/2)``.
    Within each head, the new row ``i`` is old row ``2i`` and the new row ``i + hd/2``
    is old row ``2i + 1``.  Attention scores are a dot product over all features of a
    head, so reordering the features of q and k identically leaves them unchanged.
    """
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    return (
        w.reshape(n_heads, head_dim // 2, 2, in_features)
        .transpose(0, 2, 1, 3)
        .reshape(out_features, in_features)
    )


def load_llama2c(checkpoint_path):
    """Load a llama2.c v0 checkpoint as a float32 ``transformers.LlamaForCausalLM``.

    The model is in eval mode, with ``rope_theta=10000``, ``rms_norm_eps=1e-5``,
    ``max_position_embeddings=seq_len``, no biases, SwiGLU MLP (``w1`` -> gate_proj,
    ``w3`` -> up_proj, ``w2`` -> down_proj), and tied input/output embeddings when the
    checkpoint shares its classifier (the usual case, positive ``vocab_size`` in the
    header).  The rows of ``wq`` and ``wk`` are permuted per head to move from
    llama2.c's interleaved RoPE pairs to Hugging Face's half-split pairs, so the
    resulting model computes the same function as llama2.c's ``run.c``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg, t = read_llama2c_checkpoint(checkpoint_path)
    hf_config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=cfg.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    # Older configs keep rope_theta as an attribute, newer ones in rope_parameters;
    # the constructor above fills in whichever this transformers version uses.
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))

    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": tensor(t["token_embedding"]),
        "model.norm.weight": tensor(t["rms_final"]),
    }
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = tensor(t["rms_att"][i])
        state[p + "post_attention_layernorm.weight"] = tensor(t["rms_ffn"][i])
        state[p + "self_attn.q_proj.weight"] = tensor(_interleaved_to_half_rotary(t["wq"][i], cfg.n_heads))
        state[p + "self_attn.k_proj.weight"] = tensor(_interleaved_to_half_rotary(t["wk"][i], cfg.n_kv_heads))
        state[p + "self_attn.v_proj.weight"] = tensor(t["wv"][i])
        state[p + "self_attn.o_proj.weight"] = tensor(t["wo"][i])
        state[p + "mlp.gate_proj.weight"] = tensor(t["w1"][i])
        state[p + "mlp.down_proj.weight"] = tensor(t["w2"][i])
        state[p + "mlp.up_proj.weight"] = tensor(t["w3"][i])
    if cfg.shared_classifier:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    else:
        state["lm_head.weight"] = tensor(t["wcls"])

    model.load_state_dict(state, strict=True, assign=True)
    if cfg.shared_classifier:
        model.tie_weights()
    # Non-persistent buffers (the rotary inverse frequencies) are still on the meta
    # device; rebuild the rotary module on CPU.
    rotary_cls = type(model.model.rotary_emb)
    model.model.rotary_emb = rotary_cls(config=hf_config)
    for name, buf in model.named_buffers():
        if buf.is_meta:  # pragma: no cover - defensive, depends on transformers version
            raise RuntimeError(f"buffer {name} was not initialised while loading {checkpoint_path}")
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model.float().eval()


# ---------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------

class Llama2cTokenizer:
    """llama2.c's tokenizer: greedy score-ordered BPE over UTF-8 with byte fallback.

    ``encode`` follows ``run.c``: a dummy space is prepended to non-empty text, every
    UTF-8 character becomes its own token when the vocabulary has it and otherwise
    the byte-fallback tokens ``byte + 3``; then, as long as some adjacent pair of
    tokens concatenates to a vocabulary entry, the pair whose merged entry has the
    highest score (the leftmost one on ties) is merged.  The merge loop uses a heap
    with lazy invalidation, so encoding a whole evaluation file is fast while giving
    exactly the result of the quadratic reference loop.

    ``decode`` drops the BOS/EOS markers (unless asked not to), removes the leading
    space of the token that follows BOS (the dummy prefix), and turns byte tokens
    such as ``<0x0A>`` into raw bytes before decoding the UTF-8 stream.
    """

    bos_token_id = 1
    eos_token_id = 2
    unk_token_id = 0
    BYTE_OFFSET = 3

    def __init__(self, path):
        self.path = Path(path)
        raw = self.path.read_bytes()
        (self.max_token_length,) = struct.unpack_from("<i", raw, 0)
        offset = 4
        pieces: list[bytes] = []
        scores: list[float] = []
        while offset < len(raw):
            score, length = struct.unpack_from("<fi", raw, offset)
            offset += 8
            if length < 0 or offset + length > len(raw):
                raise ValueError(f"{self.path}: corrupt token entry at byte {offset - 8}")
            pieces.append(raw[offset:offset + length])
            scores.append(score)
            offset += length
        self.pieces: list[bytes] = pieces
        self.scores: list[float] = scores
        # First id wins if a string occurs twice (it does not in llama2.c's files).
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(pieces):
            self._ids.setdefault(piece, i)
        self._byte_values: dict[int, int] = {}
        for i, piece in enumerate(pieces):
            if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
                try:
                    self._byte_values[i] = int(piece[3:5], 16)
                except ValueError:
                    pass

    # -- basic properties --------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    def token_to_id(self, piece: str | bytes) -> int | None:
        """Id of a vocabulary entry given as text or bytes, or ``None``."""
        if isinstance(piece, str):
            piece = piece.encode("utf-8")
        return self._ids.get(piece)

    def id_to_piece(self, token_id: int) -> bytes:
        """Raw bytes of a vocabulary entry as stored in the file."""
        return self.pieces[token_id]

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"Llama2cTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    # -- encoding ----------------------------------------------------------------------

    def _initial_tokens(self, text: str) -> list[int]:
        tokens: list[int] = []
        if text:
            space = self._ids.get(b" ")
            tokens.append(space if space is not None else ord(" ") + self.BYTE_OFFSET)
        for ch in text:
            encoded = ch.encode("utf-8", errors="surrogatepass")
            tid = self._ids.get(encoded)
            if tid is not None:
                tokens.append(tid)
            else:
                tokens.extend(b + self.BYTE_OFFSET for b in encoded)
        return tokens

    def _merge(self, tokens: list[int]) -> list[int]:
        n = len(tokens)
        if n < 2:
            return tokens
        ids, scores, pieces = self._ids, self.scores, self.pieces
        tok = list(tokens)
        nxt = list(range(1, n + 1))  # n marks the end
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, int, int, int]] = []

        def push(left: int) -> None:
            right = nxt[left]
            if right >= n:
                return
            merged = ids.get(pieces[tok[left]] + pieces[tok[right]])
            if merged is not None:
                # Highest score first, then leftmost position: run.c's choice.
                heapq.heappush(heap, (-scores[merged], left, tok[left], tok[right], merged))

        for i in range(n - 1):
            push(i)
        while heap:
            _, left, left_tok, right_tok, merged = heapq.heappop(heap)
            if not alive[left] or tok[left] != left_tok:
                continue
            right = nxt[left]
            if right >= n or tok[right] != right_tok:
                continue
            tok[left] = merged
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[right] < n:
                prv[nxt[right]] = left
            if prv[left] >= 0:
                push(prv[left])
            push(left)
        return [tok[i] for i in range(n) if alive[i]]

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS prepended and/or EOS appended on request."""
        ids = self._merge(self._initial_tokens(text))
        if bos:
            ids.insert(0, self.bos_token_id)
        if eos:
            ids.append(self.eos_token_id)
        return ids

    __call__ = encode

    # -- decoding ----------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of a sequence of token ids.

        Accepts any iterable of ints (a list, a 1-D tensor or array).  The leading
        space of a token directly after BOS is removed, mirroring the dummy prefix
        added by :meth:`encode`.  Invalid UTF-8 (for example a sequence cut in the
        middle of a multi-byte character) is replaced by U+FFFD.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = bytearray()
        prev = None
        for tid in ids:
            tid = int(tid)
            if tid in (self.bos_token_id, self.eos_token_id) and skip_special_tokens:
                prev = tid
                continue
            byte = self._byte_values.get(tid)
            if byte is not None:
                out.append(byte)
            else:
                piece = self.pieces[tid]
                if prev == self.bos_token_id and piece.startswith(b" "):
                    piece = piece[1:]
                out += piece
            prev = tid
        return out.decode("utf-8", errors="replace")

    def batch_decode(self, sequences: Sequence[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        """Decode several sequences (for example the rows of ``model.generate``'s output)."""
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]
