"""Tests for lowbit.eval.perplexity."""

import math

import pytest
import torch

from lowbit.eval import perplexity, squeeze_blank_lines, window_token_ids
from lowbit.llama2c import Llama2cTokenizer, load_llama2c, shared_data_dir

VOCAB = 97


class ByteTokenizer:
    """Minimal stand-in for a Hugging Face tokenizer: one token per UTF-8 byte."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        ids = [2 + b % (VOCAB - 2) for b in text.encode()]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


TEXT = "The quick brown fox jumps over the lazy dog. " * 8  # 360 bytes


def _reference_loss(model, windows):
    """Mean next-token NLL in float64 with a hand-written log-softmax."""
    total, count = 0.0, 0
    for w in windows:
        with torch.no_grad():
            logits = model(torch.tensor([w])).logits[0].double()
        logits = logits[:-1]
        shifted = logits - logits.max(dim=-1, keepdim=True).values
        log_probs = shifted - shifted.exp().sum(dim=-1, keepdim=True).log()
        target = torch.tensor(w[1:])
        total -= log_probs.gather(1, target[:, None]).sum().item()
        count += len(w) - 1
    return total / count


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_manual_computation(tiny_model, batch_size):
    tok = ByteTokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    windows, window_len = 5, 48
    expected = _reference_loss(tiny_model, [ids[i * window_len:(i + 1) * window_len] for i in range(windows)])
    got = perplexity(tiny_model, tok, TEXT, windows=windows, window_len=window_len, progress=False,
                     batch_size=batch_size)
    assert got["windows"] == windows and got["tokens"] == windows * (window_len - 1)
    assert got["loss"] == pytest.approx(expected, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_perplexity_bos_prepended_once(tiny_model):
    tok = ByteTokenizer()
    ids = [tok.bos_token_id] + tok(TEXT, add_special_tokens=False)["input_ids"]
    batch = window_token_ids(tok, TEXT, 3, 40, bos=True)
    assert batch.tolist() == [ids[0:40], ids[40:80], ids[80:120]]
    expected = _reference_loss(tiny_model, batch.tolist())
    got = perplexity(tiny_model, tok, TEXT, windows=3, window_len=40, progress=False, bos=True)
    assert got["loss"] == pytest.approx(expected, rel=1e-5)


def test_perplexity_text_too_short(tiny_model):
    with pytest.raises(ValueError, match="too short"):
        perplexity(tiny_model, ByteTokenizer(), "only a few words", windows=2, window_len=16, progress=False)
    with pytest.raises(ValueError, match="too short"):
        perplexity(tiny_model, ByteTokenizer(), TEXT, windows=8, window_len=48, progress=False)


def test_squeeze_blank_lines():
    assert squeeze_blank_lines("a\n\nb\n\n\nc\n \nd\ne") == "a\nb\nc\nd\ne"
    assert squeeze_blank_lines("no newline") == "no newline"


def test_stories260k_reference_loss():
    data = shared_data_dir()
    needed = ["stories260K/stories260K.bin", "stories260K/tok512.bin", "text/tinystories_val_head.txt"]
    if data is None or not all((data / f).is_file() for f in needed):
        pytest.skip("shared data folder with stories260K/ and text/ not found (set LOWBIT_DATA or provide ../shared/data)")
    model = load_llama2c(data / needed[0])
    tok = Llama2cTokenizer(data / needed[1])
    text = (data / needed[2]).read_text()
    # README reference: about 1.318 nats over 40 windows of 512 tokens (see lowbit.eval's
    # docstring for why blank lines are squeezed).
    result = perplexity(model, tok, text, windows=40, window_len=512, progress=False, batch_size=8,
                        squeeze_blank_lines=True)
    assert result["tokens"] == 40 * 511
    assert result["loss"] == pytest.approx(1.318, abs=0.01), result
