"""Calibration data: token-id batches from a text file or from the model's own samples.

Both sources are seeded and reproducible. ``from_generations`` is data-free (as in
LLM-QAT): the model samples sequences from random first tokens, so no dataset, and in
particular no evaluation text, is needed.
"""
from __future__ import annotations

from pathlib import Path

import torch


def from_text(tokenizer, text: str | Path, samples: int = 16, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens at seeded random offsets of a text (or file)."""
    from .models import encode_text

    if isinstance(text, Path) or (isinstance(text, str) and len(text) < 4096 and Path(text).is_file()):
        text = Path(text).read_text()
    ids = torch.tensor(encode_text(tokenizer, text), dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def from_generations(model, samples: int = 16, seq_len: int = 512, seed: int = 0, temperature: float = 1.0,
                     top_k: int = 0, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Sequences sampled from the model itself (data-free), from seeded random first tokens."""
    from tqdm.auto import tqdm

    vocab = model.config.vocab_size
    dev = next(model.parameters()).device
    out = []
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        first = torch.randint(0, vocab, (samples, 1))
        for i in tqdm(range(0, samples, batch_size), desc="sampling calibration", disable=not progress):
            start = first[i:i + batch_size].to(dev)
            gen = model.generate(start, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, do_sample=True,
                                 temperature=temperature, top_k=top_k or None, top_p=None,
                                 attention_mask=torch.ones_like(start), pad_token_id=0)
            out.append(gen[:, :seq_len].cpu())
    return torch.cat(out)
