"""End-to-end benchmark: a Llama-2-7B-shaped ``LlamaForCausalLM`` (random weights, bf16, GPU)
against its lowbit versions on the Triton backend, in the same run.

    python bench/e2e.py                       # all 32 layers
    python bench/e2e.py --layers 4            # a shorter model for a first figure
    python bench/e2e.py --recipes w2a16,w2a2  # which lowbit variants

Decode: tokens/s at batch 1 with a static KV cache (prompt of 16 tokens, then ``--new``
greedy steps, each a forward of one token). Prefill: tokens/s of one forward over 2048 tokens
without a cache. Variants: bf16 eager, bf16 ``torch.compile(mode="reduce-overhead")`` (CUDA
graphs), the lowbit model eager and under the same ``torch.compile``.

The lowbit models are built by replacing every linear site of the decoder layers (the
classifier head stays bf16, as in the presets) with a ``lowbit.QuantLinear`` holding random
valid packed codes and E4M3 scales: the same modules and kernels that ``compile_quantized(model,
recipe, backend="triton")`` produces, without running round-to-nearest on 7B weights (which only
changes the values, not the work).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def llama7b_config(layers):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       torch_dtype=torch.bfloat16)


def quantize_random(model, recipe):
    """Swap each decoder linear for a QuantLinear with random codes (module docstring)."""
    from lowbit.formats import QFormat
    from lowbit.quant_linear import QuantLinear

    wfmt = QFormat(2)
    afmt = QFormat(2) if recipe == "w2a2" else None
    g = torch.Generator(device="cuda").manual_seed(0)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                ql = QuantLinear(lin.in_features, lin.out_features, wfmt, afmt, lin.bias is not None, device="cuda")
                ql.weight_packed = torch.randint(0, 256, ql.weight_packed.shape, generator=g, device="cuda",
                                                 dtype=torch.uint8)
                ql.weight_scales = (torch.rand(ql.weight_scales.shape, generator=g, device="cuda") * 224).to(
                    torch.float8_e4m3fn)
                ql.weight_global = torch.tensor(1.6e-4, device="cuda")  # weights of std ~0.02
                setattr(parent, name, ql)
    return model


def _static_cache(model, max_len):
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_batch_size=1, max_cache_len=max_len, device="cuda",
                           dtype=torch.bfloat16)
    except TypeError:
        return StaticCache(config=model.config, max_cache_len=max_len)


def decode_tps(model, fwd, new_tokens, prompt=16, reps=3):
    """Greedy decode tokens/s at batch 1 (median of reps, after a warm-up run)."""
    ids = torch.randint(0, 32000, (1, prompt), device="cuda")
    times = []
    for r in range(reps + 1):
        cache = _static_cache(model, prompt + new_tokens + 1)
        with torch.no_grad():
            out = fwd(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device="cuda"),
                      use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(new_tokens):
                pos = torch.tensor([prompt + i], device="cuda")
                out = fwd(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1).clone()
            torch.cuda.synchronize()
        if r:
            times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times)


def prefill_tps(fwd, tokens=2048, reps=3):
    ids = torch.randint(0, 32000, (1, tokens), device="cuda")
    times = []
    with torch.no_grad():
        for r in range(reps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fwd(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
            if r:
                times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new", type=int, default=64, help="decode steps timed")
    ap.add_argument("--recipes", default="w2a16,w2a2")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/e2e.py needs a CUDA GPU", file=sys.stderr)
        return 1
    from transformers import LlamaForCausalLM

    import lowbit.codegen.triton  # noqa: F401  (the Triton kernels of the lowbit ops)

    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}; Llama-2-7B shape, {args.layers} layers, random weights", flush=True)
    rows = []

    def measure(label, model, compiled):
        model.eval()
        fwd = torch.compile(model.forward, mode="reduce-overhead") if compiled else model.forward
        t0 = time.time()
        d = decode_tps(model, fwd, args.new)
        p = prefill_tps(model.forward if compiled else fwd)  # prefill: eager kernels (one large forward)
        rows.append((label, d, p))
        print(f"{label:40s} decode {d:8.1f} tok/s   prefill(2048) {p:9.0f} tok/s   ({time.time() - t0:.0f} s)",
              flush=True)

    with torch.device("cuda"):
        model = LlamaForCausalLM(llama7b_config(args.layers)).to(torch.bfloat16)
    measure("bf16 eager", model, False)
    if not args.no_compile:
        measure("bf16 torch.compile reduce-overhead", model, True)
        torch._dynamo.reset()
    for recipe in args.recipes.split(","):
        qmodel = quantize_random(model, recipe)  # in place: the bf16 weights are freed
        torch.cuda.empty_cache()
        measure(f"lowbit {recipe} (triton) eager", qmodel, False)
        if not args.no_compile:
            measure(f"lowbit {recipe} (triton) torch.compile", qmodel, True)
            torch._dynamo.reset()
        if recipe != args.recipes.split(",")[-1]:
            with torch.device("cuda"):
                model = LlamaForCausalLM(llama7b_config(args.layers)).to(torch.bfloat16)
    base = {r[0]: r for r in rows}
    ref = base.get("bf16 torch.compile reduce-overhead", rows[0])
    print()
    print(f"| variant ({args.layers} layers) | decode tok/s | vs bf16 compiled | prefill tok/s (2048) | vs bf16 compiled |")
    print("|---|---:|---:|---:|---:|")
    for label, d, p in rows:
        print(f"| {label} | {d:.1f} | {d / ref[1]:.2f}x | {p:.0f} | {p / ref[2]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
