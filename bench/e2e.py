"""End-to-end benchmark: a Llama-2-7B-shaped ``LlamaForCausalLM`` (random weights, bf16, GPU)
against ``lowbit.compile_quantized(model, recipe, backend="triton")`` of the same model, in
the same run.

    python bench/e2e.py                          # all 32 layers, w2a16
    python bench/e2e.py --layers 8               # fewer layers of the same shape
    python bench/e2e.py --recipes w2a16,w2a2     # which lowbit recipes (RTN, no calibration)
    python bench/e2e.py --no-compile             # skip the torch.compile variants
    python bench/e2e.py --variants graph,compile # only the CUDA-graph and torch.compile rows
    python bench/e2e.py --json out.json          # all rows
    python bench/e2e.py --skinny-config '{"ONE_DOT": true, "BLOCK_G": 16}'   # W2A16 kernel variant

Decode (tokens/s at batch 1). A hand-written greedy decode loop over the model's own modules
(embedding, RMSNorms, rotary table, the linear sites -- ``nn.Linear`` or lowbit's
``QuantLinear`` --, the head) with a static KV cache of fixed length (``--max-len``) and the
attention over the whole cache under a position mask (``F.scaled_dot_product_attention``), so
every step has the same shapes. This replaces transformers' ``StaticCache``, whose in-place
length counter made ``torch.compile(mode="reduce-overhead")`` skip CUDA graphs. The loop is
checked against the model's own forward (``check``: logits of every position of a prompt).
Variants of one step:

* ``eager``: the step as Python code, kernel by kernel;
* ``eager + CUDA graph``: one step (forward, argmax, position += 1) captured with
  ``torch.cuda.CUDAGraph`` and replayed once per token;
* ``torch.compile + CUDA graph``: the step compiled by ``torch.compile`` (default mode,
  inductor), then captured the same way.

Prefill (tokens/s of one forward over ``--prefill`` tokens, no cache, logits of the last token
only): the HF forward eager, and under ``torch.compile`` (default mode).

Each time is the median of several runs after warm-ups; every row is measured in the same
process, on the same random weights.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def llama7b_config(layers):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5)


def _rotate_half(t):
    a, b = t.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class StaticDecoder:
    """Greedy batch-1 decoding of a Llama-style HF model with a static KV cache (module docstring).

    ``step(tok)`` runs one token at position ``self.pos`` (a 1-element device tensor), writes
    its keys and values into the cache, and returns the logits ``[1, 1, vocab]``; it neither
    reads nor changes host state, so it can be captured in a CUDA graph or compiled.
    """

    def __init__(self, model, max_len, device="cuda"):
        cfg = model.config
        self.model = model
        self.inner = model.model
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.max_len = max_len
        dtype = self.inner.embed_tokens.weight.dtype
        shape = (1, self.kv_heads, max_len, self.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.inner.layers]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.inner.layers]
        self.pos = torch.zeros(1, device=device, dtype=torch.long)
        self.slots = torch.arange(max_len, device=device)

    def reset(self, pos=0):
        for t in self.k + self.v:
            t.zero_()
        self.pos.fill_(pos)

    def step(self, tok):
        inner = self.inner
        h = inner.embed_tokens(tok)  # [1, 1, hidden]
        cos, sin = inner.rotary_emb(h, self.pos.view(1, 1))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [1, 1, 1, head_dim]
        visible = (self.slots <= self.pos).view(1, 1, 1, self.max_len)
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            r = h
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k[i].index_copy_(2, self.pos, k)
            self.v[i].index_copy_(2, self.pos, v)
            o = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=visible,
                                               enable_gqa=self.kv_heads != self.heads)
            h = r + attn.o_proj(o.transpose(1, 2).reshape(1, 1, self.heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(inner.norm(h))


def check(model, dec, prompt=12):
    """Relative error of the decode loop's logits against the model's own forward (all positions)."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=dec.pos.device)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.float()
        dec.reset()
        outs = []
        for t in range(prompt):
            outs.append(dec.step(ids[:, t:t + 1]).float())
            dec.pos.add_(1)
        got = torch.cat(outs, dim=1)
    return ((got - ref).norm() / ref.norm()).item()


def _sync():
    torch.cuda.synchronize()


def decode_tps(dec, step, new_tokens, graph, reps=5, prompt=16):
    """Greedy decode tokens/s (median of ``reps`` timed runs of ``new_tokens`` steps, after a warm-up)."""
    tok = torch.zeros(1, 1, device="cuda", dtype=torch.long)

    def one():
        logits = step(tok)
        tok.copy_(logits[:, -1:].argmax(-1))
        dec.pos.add_(1)

    with torch.no_grad():
        dec.reset(prompt)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (and compilation) outside any capture
            for _ in range(3):
                one()
        torch.cuda.current_stream().wait_stream(side)
        _sync()
        g = None
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                one()
        times = []
        for r in range(reps + 1):
            dec.reset(prompt)
            tok.fill_(1)
            _sync()
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                if g is not None:
                    g.replay()
                else:
                    one()
            _sync()
            if r:
                times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times)


def prefill_tps(fwd, vocab, tokens, reps=5):
    ids = torch.randint(0, vocab, (1, tokens), device="cuda")
    times = []
    with torch.no_grad():
        for r in range(reps + 2):
            _sync()
            t0 = time.perf_counter()
            fwd(input_ids=ids, use_cache=False, logits_to_keep=1)
            _sync()
            if r >= 2:
                times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times)


class _AliasFinder:
    """Import hook: ``httpx2[.x]`` -> ``httpx[.x]``, ``httpcore2[.x]`` -> ``httpcore[.x]``."""
    ALIASES = {"httpx2": "httpx", "httpcore2": "httpcore"}

    def find_spec(self, name, path=None, target=None):
        import importlib.util

        top = name.split(".")[0]
        if top not in self.ALIASES:
            return None
        real = self.ALIASES[top] + name[len(top):]
        finder = self

        class Loader:
            def create_module(self, spec):
                import importlib

                return importlib.import_module(real)

            def exec_module(self, module):
                pass

        return importlib.util.spec_from_loader(name, Loader())


def _httpx2_shim():
    """One device image's huggingface_hub imports ``httpx2`` and ``httpcore2``, which it does not
    ship; this benchmark downloads nothing, so ``httpx`` and ``httpcore`` stand in for them there
    (no effect where they exist)."""
    import importlib.util

    if importlib.util.find_spec("httpx2") is None:
        sys.meta_path.append(_AliasFinder())


def _recipe(spec: str):
    """A preset or recipe file, with ``+fuse`` appended for the horizontal-fusion pass
    (``w2a16+fuse``: q/k/v and gate/up as one site each)."""
    import lowbit

    base, plus, extra = spec.partition("+")
    if not plus:
        return spec
    if extra != "fuse":
        raise ValueError(f"unknown recipe suffix {extra!r} in {spec!r} (only '+fuse')")
    return lowbit.get_recipe(base).with_passes({"name": "fuse"})


NO_GLUON = " [no Gluon]"


@contextlib.contextmanager
def _w2a16_kernels(model_name: str):
    """For the ``[no Gluon]`` rows: W2A16 calls run the Triton ``tl.dot`` kernel at every row count."""
    from lowbit.codegen.triton import dispatch

    saved = dispatch.GLUON_MAX_M
    if model_name.endswith(NO_GLUON):
        dispatch.GLUON_MAX_M = 0
    try:
        yield
    finally:
        dispatch.GLUON_MAX_M = saved


@contextlib.contextmanager
def _launch_pdl(on: bool):
    """Programmatic dependent launch for the kernels compiled and launched inside: inductor's
    Triton kernels and lowbit's Gluon W2A16 kernel."""
    import torch._inductor.config as inductor_config
    from lowbit.codegen.triton import w2a16_gluon

    if on and not hasattr(inductor_config.triton, "enable_pdl"):
        raise RuntimeError(f"this torch ({torch.__version__}) has no torch._inductor.config.triton.enable_pdl")
    saved = (getattr(inductor_config.triton, "enable_pdl", False), w2a16_gluon.DEFAULTS["PDL"])
    if on:
        inductor_config.triton.enable_pdl = True
        w2a16_gluon.DEFAULTS["PDL"] = True
    try:
        yield
    finally:
        if hasattr(inductor_config.triton, "enable_pdl"):
            inductor_config.triton.enable_pdl = saved[0]
        w2a16_gluon.DEFAULTS["PDL"] = saved[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new", type=int, default=128, help="decode steps timed")
    ap.add_argument("--max-len", type=int, default=256, help="static KV cache length")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--recipes", default="w2a16", help="comma-separated presets or recipe files; NAME+fuse adds "
                                                        "the fuse pass, e.g. w2a16,w2a16+fuse")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--variants", default="eager,graph,compile,prefill",
                    help="which rows to time (comma-separated): eager (decode, kernel by kernel), graph (decode, "
                         "CUDA graph), compile (torch.compile rows, decode and prefill), prefill (prefill rows)")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds: skip the remaining steps after this")
    ap.add_argument("--json", default=None)
    ap.add_argument("--compare-gluon", action="store_true",
                    help="also time each lowbit model's decode with the Gluon W2A16 path off (the Triton "
                         "tl.dot kernel at every row count)")
    ap.add_argument("--skinny-config", default=None,
                    help='JSON overrides of the W2A16 skinny defaults for this run, e.g. \'{"ONE_DOT": true, "BLOCK_G": 16}\'')
    ap.add_argument("--pdl", action="store_true",
                    help="also time each model's torch.compile decode with programmatic dependent launch: "
                         "inductor's Triton kernels (torch._inductor.config.triton.enable_pdl) and lowbit's Gluon "
                         "W2A16 kernel request their first loads before waiting for the previous kernel")
    args = ap.parse_args(argv)
    wanted = set(args.variants.split(","))
    unknown = wanted - {"eager", "graph", "compile", "prefill"}
    if unknown:
        ap.error(f"unknown --variants {sorted(unknown)}")
    if args.no_compile:
        wanted.discard("compile")
    if not torch.cuda.is_available():
        print("bench/e2e.py needs a CUDA GPU", file=sys.stderr)
        return 1
    _httpx2_shim()
    from transformers import LlamaForCausalLM

    import lowbit

    if args.skinny_config:
        from lowbit.codegen.triton import w2a16 as _w2a16

        _w2a16._DEFAULTS["skinny"].update(json.loads(args.skinny_config))
        _w2a16._default_config.cache_clear()
        print(f"# W2A16 skinny defaults for this run: {_w2a16._DEFAULTS['skinny']}", flush=True)
    t_start = time.time()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; Llama-2-7B shape, {args.layers} layers, "
          f"random weights (bf16)", flush=True)
    rows = []

    def left():
        return args.budget - (time.time() - t_start)

    def record(model_name, kind, variant, value, extra=None):
        row = dict(model=model_name, kind=kind, variant=variant, tokens_per_s=value, **(extra or {}))
        rows.append(row)
        print(f"{model_name:18s} {kind:8s} {variant:34s} {value:10.1f} tok/s  ({time.time() - t_start:.0f} s)",
              flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)

    def attempt(label, fn):
        if left() <= 0:
            print(f"# skipped (time budget): {label}", flush=True)
            return None
        try:
            return fn()
        except Exception as e:  # one failing variant must not hide the others
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"# FAILED {label}: {msg}", flush=True)
            rows.append(dict(variant=label, error=msg))
            return None

    with torch.device("cuda"):
        base = LlamaForCausalLM(llama7b_config(args.layers)).to(torch.bfloat16)
    base.eval()
    print(f"# bf16 model built ({time.time() - t_start:.0f} s)", flush=True)
    models = [("bf16", base)]
    for recipe in args.recipes.split(","):
        t0 = time.time()
        q = attempt(f"compile_quantized {recipe}",
                    lambda: lowbit.compile_quantized(base, _recipe(recipe), backend="triton", progress=False))
        if q is not None:
            meta = q.lowbit_report.meta
            print(f"# compile_quantized(model, {recipe!r}, backend='triton'): {time.time() - t0:.0f} s "
                  f"(capture {meta.get('capture_method')} {meta.get('capture_seconds', 0):.0f} s)", flush=True)
            models.append((f"lowbit {recipe}", q))
    torch.cuda.empty_cache()
    if args.compare_gluon:
        models += [(name + NO_GLUON, m) for name, m in models if name.startswith("lowbit")]

    decs = {}
    for name, m in models:
        dec = StaticDecoder(m, args.max_len)
        err = attempt(f"{name} decode-loop check", lambda: check(m, dec))
        if err is not None:
            print(f"# {name}: decode loop vs model forward, relative error of the logits {err:.2e}", flush=True)
        decs[name] = dec
    # decode: eager, eager + graph (all models), then prefill eager, then the compiled variants
    for name, m in models:
        dec = decs[name]
        for variant, graph in (("eager", False), ("eager + CUDA graph", True)):
            if ("graph" if graph else "eager") not in wanted:
                continue
            with _w2a16_kernels(name):
                v = attempt(f"{name} decode {variant}", lambda: decode_tps(dec, dec.step, args.new, graph))
            if v is not None:
                record(name, "decode", variant, v)
    for name, m in models:
        if name.endswith(NO_GLUON) or "prefill" not in wanted:
            continue  # prefill rows are above the Gluon path's row limit either way
        v = attempt(f"{name} prefill eager", lambda: prefill_tps(m, m.config.vocab_size, args.prefill))
        if v is not None:
            record(name, "prefill", "eager", v)
    if "compile" in wanted:
        for pdl in (False, True) if args.pdl else (False,):
            for name, m in models:
                dec = decs[name]
                t0 = time.time()
                variant = "torch.compile + CUDA graph" + (" + PDL" if pdl else "")
                with _w2a16_kernels(name), _launch_pdl(pdl):
                    cstep = torch.compile(dec.step)
                    v = attempt(f"{name} decode {variant}", lambda: decode_tps(dec, cstep, args.new, True))
                if v is not None:
                    record(name, "decode", variant, v, dict(compile_and_run_s=time.time() - t0))
                torch._dynamo.reset()
        for name, m in models:
            if name.endswith(NO_GLUON) or "prefill" not in wanted:
                continue
            t0 = time.time()
            cfwd = torch.compile(m.forward)
            v = attempt(f"{name} prefill torch.compile", lambda: prefill_tps(cfwd, m.config.vocab_size, args.prefill))
            if v is not None:
                record(name, "prefill", "torch.compile", v, dict(compile_and_run_s=time.time() - t0))
            torch._dynamo.reset()

    print()
    ref = {}
    for r in rows:
        if "error" not in r and r["model"] == "bf16":
            ref.setdefault(r["kind"], {})[r["variant"]] = r["tokens_per_s"]
    best = {kind: max(v.values()) for kind, v in ref.items()}
    print(f"| model ({args.layers} layers of Llama-2-7B) | | variant | tokens/s | vs best bf16 |")
    print("|---|---|---|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | | failed: {r['error'][:80]} | | |")
            continue
        b = best.get(r["kind"])
        print(f"| {r['model']} | {r['kind']} | {r['variant']} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / b:.2f}x |" if b else "| |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
