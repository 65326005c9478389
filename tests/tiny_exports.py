"""Small Llama models compiled and exported once per test session, shared by
tests/test_onnx_export.py and tests/test_runtime.py (an export takes seconds)."""
import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

VOCAB = 256
EOS = 10


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS)
    return LlamaForCausalLM(cfg).eval()


def calibration():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def byte_tokenizer():
    """Byte-level tokenizer with exactly 256 tokens (one per byte, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="lowbit_onnx_tests_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def w2a16():
    """(compiled model, export folder): 2 layers, W2A16, byte tokenizer, EOS id 10."""
    import lowbit
    from lowbit.codegen.onnx import export_onnx

    q = lowbit.compile_quantized(tiny_llama(), "w2a16", calibration=calibration(), progress=False)
    return q, export_onnx(q, _root() / "w2a16", tokenizer=byte_tokenizer())
