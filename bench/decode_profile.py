"""Where a decode step's GPU time goes, kernel by kernel, for lowbit and for bf16.

One compiled decode step (torch.compile, replayed in a CUDA graph) of the Llama-2-7B-shaped
model with random weights and the decode loop of ``bench/e2e.py``.

    python bench/decode_profile.py --layers 4 [--recipe w2a16+fuse] [--pdl]

For each model: the step time (median of CUDA-graph replays), then the torch profiler's kernel
list over 5 replays, per step and grouped (lowbit's kernels, dense GEMMs and GEMVs, attention,
everything else), with the per-layer share.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402  (bench/e2e.py: model config, StaticDecoder, recipe parsing)

GROUPS = [  # (group, substrings of kernel names), first match wins
    ("lowbit kernels", ("w2a16", "w2a2", "codebook", "act_quant", "fwht")),
    ("attention", ("attention", "fmha", "flash", "cudnn", "sdpa")),
    ("dense GEMM / GEMV (cuBLAS)", ("gemv", "gemm", "cutlass", "sm90_xmma", "nvjet")),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(key in low for key in keys):
            return group
    return "other (inductor / elementwise)"


def profile_step(name, model, layers, pdl, max_len=256, replays=50):
    from torch.profiler import ProfilerActivity, profile

    dec = e2e.StaticDecoder(model, max_len)
    tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    with e2e._launch_pdl(pdl):
        step = torch.compile(dec.step)
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step(tok)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(tok)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays // 5):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (replays // 5))
    step_us = sorted(times)[2]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.count / 5, e.device_time_total / 5) for e in prof.key_averages()
                   if e.device_time_total > 0), key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    print(f"\n## {name}: step {step_us:.1f} us in a CUDA graph ({layers} layers{', PDL' if pdl else ''}); "
          f"kernel time {total:.1f} us, {sum(r[1] for r in rows):.0f} kernels per step")
    groups = {}
    for key, count, t in rows:
        g = groups.setdefault(group_of(key), [0.0, 0.0])
        g[0] += t
        g[1] += count
    print("| group | us per step | us per layer | kernels per step |")
    print("|---|---:|---:|---:|")
    for g, (t, c) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        print(f"| {g} | {t:.1f} | {t / layers:.1f} | {c:.0f} |")
    print("\ntop kernels (us per step, calls per step, name):")
    for key, count, t in rows[:25]:
        print(f"  {t:8.1f}  x{count:4.0f}  {key[:110]}")
    torch._dynamo.reset()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--recipe", default="w2a16+fuse", help="as bench/e2e.py's --recipes (one)")
    ap.add_argument("--pdl", action="store_true", help="programmatic dependent launch (bench/e2e.py --pdl)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/decode_profile.py needs a CUDA GPU", file=sys.stderr)
        return 1
    e2e._httpx2_shim()
    from transformers import LlamaForCausalLM

    import lowbit

    torch.manual_seed(0)
    with torch.device("cuda"):
        base = LlamaForCausalLM(e2e.llama7b_config(args.layers)).to(torch.bfloat16)
    base.eval()
    quantized = lowbit.compile_quantized(base, e2e._recipe(args.recipe), backend="triton", progress=False)
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; Llama-2-7B shape, {args.layers} layers")
    for name, model in ((f"lowbit {args.recipe}", quantized), ("bf16", base)):
        profile_step(name, model, args.layers, args.pdl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
