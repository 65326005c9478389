"""Calibration data: token-id batches from a text file or from the model's own samples.

Both sources are seeded and reproducible. ``from_generations`` is data-free (as in
LLM-QAT): the model samples sequences from random first tokens, so no dataset, and in
particular no evaluation text, is needed.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
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
                     top_k: int = 0, batch_size: int = 8, progress: bool = True, amp: str = "auto") -> torch.Tensor:
    """``[samples, seq_len]`` int64 token ids (on the CPU) sampled from the model itself (data-free).

    Each sequence starts from a seeded uniformly random first token; the other ``seq_len - 1``
    tokens are sampled from the model, ``batch_size`` sequences at a time, at ``temperature``
    (``0`` is greedy decoding) and, when ``top_k`` > 0, from the ``top_k`` most likely tokens
    only. The first tokens are those of ``torch.manual_seed(seed)``'s ``randint``, as before, and,
    as ``generate(min_new_tokens=...)`` did, end-of-sequence tokens are never sampled.

    Hugging Face causal LMs with full-attention layers only (transformers >= 4.56, tested with
    5.17 and 5.24) run :func:`_decode`, a decoding loop of our own: one preallocated key/value
    buffer per batch (no per-step concatenation), one token per step, sampling on the model's
    device with a seeded ``torch.Generator`` (Gumbel-max; see :func:`_sample`). Other models go through
    ``model.generate``. Same ``seed``, ``batch_size``, model and device give the same ids;
    another ``batch_size`` or device gives other (equally valid) samples, and the ids differ
    from those of earlier lowbit versions, which called ``model.generate`` for every model.

    ``amp``: ``"auto"`` (default) runs a float32 model on a CUDA device under bfloat16 autocast,
    so that attention runs in a fused bfloat16 kernel (float32 attention with grouped-query
    heads falls back to PyTorch's math kernel); ``"bf16"`` autocasts on any device; ``"none"``
    keeps the model's own dtype. Logits are sampled in float32 either way.
    """
    from tqdm.auto import tqdm

    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise TypeError(f"from_generations needs a causal LM with config.vocab_size, got {type(model).__name__}")
    if seq_len < 1 or batch_size < 1 or samples < 0:
        raise ValueError(f"need seq_len >= 1, batch_size >= 1 and samples >= 0 (got {seq_len}, {batch_size}, "
                         f"{samples})")
    if amp not in ("auto", "bf16", "none"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {amp!r}")
    if temperature < 0 or top_k < 0:
        raise ValueError(f"need temperature >= 0 and top_k >= 0 (got {temperature}, {top_k})")
    dev = next(model.parameters()).device
    float32 = next(model.parameters()).dtype == torch.float32
    bf16 = amp == "bf16" or (amp == "auto" and dev.type == "cuda" and float32)
    precision = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    cpu_gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, vocab, (samples, 1), generator=cpu_gen)
    if not _own_loop_supported(model):
        with precision:
            return _generate_with_hf(model, samples, seq_len, seed, temperature, top_k, batch_size, progress)
    # the device generator's seed comes from the first tokens' stream, so the two never coincide
    banned = _end_of_sequence_ids(model)
    gen = torch.Generator(device=dev).manual_seed(int(torch.randint(2 ** 62, (1,), generator=cpu_gen)))
    out = []
    bar = tqdm(total=samples * (seq_len - 1), desc="sampling from the model", unit="tok", unit_scale=True,
               disable=not progress)
    # fork_rng: a model left in training mode draws its dropout from the global generator
    with bar, precision, torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, samples, batch_size):
            ids = _decode(model, first[i:i + batch_size].to(dev), seq_len, gen, temperature, top_k, banned,
                          on_step=lambda step, logits: bar.update(logits.shape[0]))
            out.append(ids.cpu())
    return torch.cat(out) if out else torch.empty(0, seq_len, dtype=torch.long)


def _end_of_sequence_ids(model) -> tuple[int, ...]:
    """The model's end-of-sequence token ids (its generation config's, else its config's), which
    ``generate(min_new_tokens=...)`` never samples; :func:`_decode` bans them likewise."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return tuple(sorted({int(t) for t in eos if 0 <= int(t) < model.config.vocab_size}))


def _own_loop_supported(model) -> bool:
    """Whether :func:`_decode` can run ``model``: a transformers causal LM whose forward takes a
    ``Cache`` object, with a cache of this transformers version's layer API, and only full
    attention layers (no sliding windows, recurrent or shared-KV layers)."""
    try:
        from transformers import PreTrainedModel
        from transformers.cache_utils import Cache, DynamicLayer  # noqa: F401  (transformers >= 4.56)
    except ImportError:
        return False
    if not isinstance(model, PreTrainedModel) or _cache_argument(model) is None:
        return False
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "num_kv_shared_layers", None):
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return all(t == "full_attention" for t in layer_types)


def _cache_argument(model) -> str | None:
    """The name of the forward argument that takes the KV cache (``cache`` in recent
    transformers, ``past_key_values`` before), or None."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _make_cache(model, max_len: int):
    """A transformers ``Cache`` whose layers preallocate ``max_len`` positions on first use
    (see :class:`_PreallocatedLayer`)."""
    from transformers.cache_utils import Cache

    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[_preallocated_layer_class()(max_len) for _ in range(layers)])


@functools.lru_cache(maxsize=None)
def _preallocated_layer_class():
    """:class:`_PreallocatedLayer`, defined on first use so that importing this module does not
    import transformers."""
    from transformers.cache_utils import DynamicLayer

    class _PreallocatedLayer(DynamicLayer):
        """A full-attention cache layer that allocates ``[batch, kv_heads, max_len, head_dim]``
        key and value buffers once, writes each step's keys and values in place and hands the
        attention views of the filled prefix.

        Unlike ``DynamicLayer`` nothing is concatenated (a concatenation copies the whole cache
        every step); unlike ``StaticCache`` the attention sees only the filled positions, so
        decoding needs no attention mask (SDPA then attends grouped-query heads without
        repeating the keys and values in the flash kernel) and reads half the cache on average. It is a
        ``DynamicLayer`` for the rest of transformers (lengths, mask sizes), not compileable.
        """

        def __init__(self, max_len: int):
            super().__init__()
            self.max_len = max_len

        def lazy_initialization(self, key_states, value_states):
            batch, heads, _, _ = key_states.shape
            self.device = key_states.device
            # Under autocast, rotary embeddings leave the keys in float32 while the values come
            # out of the projection in the autocast dtype; attention, autocast too, would cast
            # the whole float32 key prefix down at every step. Storing the keys in the autocast
            # dtype does that cast once per token, with the same result.
            key_dtype, value_dtype = key_states.dtype, value_states.dtype
            if _autocast_dtype(self.device) is not None:
                key_dtype = value_dtype = _autocast_dtype(self.device)
            self.dtype = key_dtype
            self.key_buffer = key_states.new_empty(batch, heads, self.max_len, key_states.shape[-1],
                                                   dtype=key_dtype)
            self.value_buffer = value_states.new_empty(batch, value_states.shape[1], self.max_len,
                                                       value_states.shape[-1], dtype=value_dtype)
            self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.keys.shape[-2]
            end = start + key_states.shape[-2]
            if end > self.max_len:
                raise RuntimeError(f"the preallocated cache holds {self.max_len} positions, asked for {end}")
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

    return _PreallocatedLayer


def _autocast_dtype(device: torch.device):
    """The autocast dtype in force for ``device``'s type, or None when autocast is off there."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _decode(model, first: torch.Tensor, seq_len: int, generator: torch.Generator, temperature: float,
            top_k: int, banned: tuple[int, ...] = (), on_step=None) -> torch.Tensor:
    """``[batch, seq_len]`` ids on ``first``'s device: ``first`` (``[batch, 1]``) followed by
    ``seq_len - 1`` tokens sampled one at a time with :func:`_sample`, never one of ``banned``.

    Each step feeds the last token alone at the next position, with a cache from
    :func:`_make_cache` sized for the whole sequence, and asks for the last position's logits
    only. Nothing waits for the device inside the loop. ``on_step(step, logits)`` is called
    with each step's ``[batch, vocab]`` logits (before temperature and top-k) if given.
    """
    batch = first.shape[0]
    ids = torch.empty(batch, seq_len, dtype=torch.long, device=first.device)
    ids[:, :1] = first
    if seq_len == 1:
        return ids
    params = inspect.signature(model.forward).parameters
    cache = _make_cache(model, seq_len - 1)  # the last token is sampled, never fed
    kwargs = {_cache_argument(model): cache, "use_cache": True}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    banned = torch.tensor(banned, dtype=torch.long, device=first.device)
    with torch.inference_mode(), _attention_kernels():
        for step in range(seq_len - 1):
            if "position_ids" in params:
                kwargs["position_ids"] = torch.full((1, 1), step, dtype=torch.long, device=first.device)
            logits = model(input_ids=ids[:, step:step + 1], **kwargs).logits[:, -1]
            if on_step is not None:
                on_step(step, logits)
            logits = logits.float()
            if banned.numel():
                logits = logits.index_fill(-1, banned, float("-inf"))
            ids[:, step + 1] = _sample(logits, generator, temperature, top_k)
    return ids


def _attention_kernels():
    """Scaled-dot-product attention without the cuDNN kernel, which (we take it) builds an
    execution plan for every new key length, i.e. every decoding step: on an H200, bf16 decoding
    of a SmolLM2-sized model took ~65 ms per step whatever the batch with it, 21.5 ms per step at
    batch 1024 without it. The flash, memory-efficient and math kernels need no plan."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _sample(logits: torch.Tensor, generator: torch.Generator, temperature: float, top_k: int) -> torch.Tensor:
    """One token per row of ``[batch, vocab]`` logits, on their device.

    Temperature 0 or ``top_k == 1`` is the argmax. Otherwise the logits, in float32, are
    divided by ``temperature``, all but the ``top_k`` largest (ties included) set to -inf when
    ``top_k`` > 0, and the token drawn by the Gumbel-max trick: argmax of ``logits - log(E)``
    with ``E`` standard exponential noise from ``generator``, which samples exactly from
    softmax(logits) with one noise draw and one reduction, no normalization or cumulative sum.
    """
    logits = logits.float()
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    if temperature != 1:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    noise = torch.empty_like(logits).exponential_(generator=generator)
    return (logits - noise.clamp_min_(torch.finfo(noise.dtype).tiny).log_()).argmax(-1)


def _generate_with_hf(model, samples: int, seq_len: int, seed: int, temperature: float, top_k: int,
                      batch_size: int, progress: bool) -> torch.Tensor:
    """The ``model.generate`` path, for models :func:`_decode` does not run: the ids of earlier
    lowbit versions where ``amp`` leaves the dtype alone (same first tokens, then ``generate``'s
    sampling from the global generator seeded with ``seed``)."""
    from tqdm.auto import tqdm

    dev = next(model.parameters()).device
    out = []
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=None)
    if temperature == 0 or top_k == 1:
        sampling = dict(do_sample=False)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        first = torch.randint(0, model.config.vocab_size, (samples, 1))
        for i in tqdm(range(0, samples, batch_size), desc="sampling from the model", disable=not progress):
            start = first[i:i + batch_size].to(dev)
            gen = model.generate(start, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                                 attention_mask=torch.ones_like(start), pad_token_id=0, **sampling)
            out.append(gen[:, :seq_len].cpu())
    return torch.cat(out) if out else torch.empty(0, seq_len, dtype=torch.long)
