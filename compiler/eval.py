"""Perplexity evaluation for causal language models.

Protocol of :func:`perplexity`:

1. the whole text is tokenized once (:func:`lowbit.models.encode_text`: no special
   tokens; ``bos=True`` prepends one BOS to the whole stream);
2. ``windows`` consecutive, non-overlapping windows of ``window_len`` tokens are cut
   from the start of the token stream (the rest is ignored);
3. each window is scored on its own (no context carried across windows): the model
   predicts tokens 1..window_len-1 of the window from the tokens before them;
4. the reported ``loss`` is the mean next-token negative log-likelihood (nats) over
   all ``windows * (window_len - 1)`` predicted tokens, ``perplexity = exp(loss)``.

Reference figures (see ``../shared/data/README.md``):

* stories260K on ``text/tinystories_val_head.txt``, 40 windows of 512 tokens:
  loss 1.3184 with ``squeeze_blank_lines=True`` (and ``bos=False``).  The file
  separates paragraphs with blank lines, while the model was trained on stories whose
  paragraphs are separated by a single newline: scored as-is, the loss is 1.400, most
  of the difference coming from the second newline of each blank line (mean NLL 5.7
  nats per newline token as-is, 2.2 after squeezing).  Other protocols tried: BOS in
  front of the whole text 1.403; BOS in front of every blank-line-separated block
  1.407-1.413 (the blocks are paragraphs, not stories, so this inserts BOS mid-story);
  squeezed blank lines plus one leading BOS 1.3171.
* SmolLM2-135M-Instruct (dequantized Q4_1 GGUF, float32) on the first 200,000
  characters of ``text/wikitext2_raw_test.txt``, 8 windows of 512 tokens, defaults
  (no BOS, text as-is): perplexity 30.36.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from .models import encode_text

__all__ = ["perplexity", "squeeze_blank_lines", "window_token_ids"]

_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


def squeeze_blank_lines(text: str) -> str:
    """Replace every run of blank lines by a single newline.

    ``"a\\n\\nb\\n\\n\\nc"`` becomes ``"a\\nb\\nc"``.  Used for TinyStories, whose
    evaluation file separates paragraphs with blank lines that the training data
    does not have.
    """
    return _squeeze_blank_lines(text)


def _squeeze_blank_lines(text: str) -> str:
    # Separate from the public name, which perplexity() also uses as a keyword.
    return _BLANK_LINES.sub("\n", text)


def _bos_id(tokenizer) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError("bos=True but the tokenizer has no bos_token_id")
    return int(bos)


def window_token_ids(
    tokenizer,
    text: str,
    windows: int,
    window_len: int,
    *,
    bos: bool = False,
    squeeze_blank_lines: bool = False,
) -> torch.Tensor:
    """Token windows used by :func:`perplexity`, as a ``[windows, window_len]`` tensor.

    Raises ``ValueError`` when the text yields fewer than ``windows * window_len``
    tokens.
    """
    if windows < 1 or window_len < 2:
        raise ValueError(f"need windows >= 1 and window_len >= 2, got windows={windows}, window_len={window_len}")
    if squeeze_blank_lines:
        text = _squeeze_blank_lines(text)
    ids = encode_text(tokenizer, text)
    if bos:
        ids = [_bos_id(tokenizer)] + ids
    needed = windows * window_len
    if len(ids) < needed:
        raise ValueError(
            f"text too short for the requested windows: it has {len(ids)} tokens, "
            f"{windows} windows of {window_len} tokens need {needed} "
            f"(at most {len(ids) // window_len} full windows fit)"
        )
    return torch.tensor(ids[:needed], dtype=torch.long).view(windows, window_len)


def _logits_function(model):
    """``input_ids [b, s] -> logits [b, s, vocab]`` (a torch tensor) for a PyTorch causal LM or
    a :class:`lowbit.runtime.Session` (an ONNX export on onnxruntime: one call of its graph with
    an empty KV cache, so each window is scored exactly as the PyTorch model scores it)."""
    if isinstance(model, torch.nn.Module):
        try:
            device = next(model.parameters()).device
        except StopIteration:  # pragma: no cover - parameterless model
            device = torch.device("cpu")
        return lambda input_ids: model(input_ids.to(device), use_cache=False).logits
    from lowbit.runtime.session import Session

    if isinstance(model, Session):
        return lambda input_ids: torch.from_numpy(model.forward(input_ids.numpy())[0])
    raise TypeError(f"perplexity needs a torch.nn.Module or a lowbit.runtime.Session, got {type(model).__name__}")


def perplexity(
    model,
    tokenizer,
    text: str,
    windows: int = 8,
    window_len: int = 512,
    progress: bool = True,
    batch_size: int = 1,
    *,
    bos: bool = False,
    squeeze_blank_lines: bool = False,
) -> dict:
    """Perplexity of ``model`` on ``text`` over non-overlapping token windows.

    ``model``: a PyTorch causal LM (float, compiled or loaded) or a
    :class:`lowbit.runtime.Session` of an ONNX export, scored by the same code.
    See the module docstring for the protocol.  ``bos=True`` prepends the tokenizer's
    BOS token once, in front of the whole token stream (so only the first window
    starts with it); ``squeeze_blank_lines=True`` applies :func:`squeeze_blank_lines`
    to the text before tokenizing (needed to reproduce the stories260K reference).
    ``batch_size`` windows are run per forward pass; results do not depend on it
    beyond float rounding.

    Returns a dict with ``perplexity``, ``loss`` (mean next-token NLL in nats),
    ``tokens`` (number of predicted tokens) and ``windows``.  Raises ``ValueError``
    when the text has too few tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    batch = window_token_ids(
        tokenizer, text, windows, window_len, bos=bos, squeeze_blank_lines=squeeze_blank_lines
    )
    logits_of = _logits_function(model)

    total_nll = 0.0
    total_tokens = 0
    with torch.no_grad(), tqdm(total=windows, desc="perplexity", unit="window", disable=not progress) as bar:
        for start in range(0, windows, batch_size):
            input_ids = batch[start:start + batch_size]
            logits = logits_of(input_ids)
            input_ids = input_ids.to(logits.device)
            # Position t predicts token t+1; score in float32 whatever the model dtype.
            pred = logits[:, :-1, :].float()
            target = input_ids[:, 1:]
            nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += target.numel()
            bar.update(input_ids.shape[0])

    loss = total_nll / total_tokens
    return {
        "perplexity": math.exp(loss),
        "loss": loss,
        "tokens": total_tokens,
        "windows": windows,
    }
