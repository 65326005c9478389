"""W2A2 at prefill sizes: FP8 accumulation with and without fp32 promotion.

    python bench/w2a2_accumulation.py            # CUDA, compute capability 9.0

For each shape, in one run: cuBLAS bf16 (``F.linear`` on the dequantized weight), cuBLAS FP8
(``torch._scaled_mm`` on the exact E4M3 operands, given) with ``use_fast_accum`` off and on, and
lowbit's whole W2A2 linear (activation prologue + weight dequantization to E4M3 + ``_scaled_mm``)
with ``fast_accum`` off and on. Times are medians of 5 replays of a CUDA graph of 10 calls;
errors are relative (Frobenius) against float64 on the same quantized operands, over the first
256 rows. ``lowbit.codegen.triton.w2a2.SCALED_MM_FAST_ACCUM_MAX_K`` was set from this table.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

SHAPES = [(4096, 8192, 8192), (2048, 4096, 4096), (4096, 4096, 11008), (4096, 11008, 4096)]


def graph_time_us(fn, per_graph: int = 10, reps: int = 5) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(2):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (2 * per_graph))
    return sorted(times)[len(times) // 2]


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/w2a2_accumulation.py needs a CUDA GPU", file=sys.stderr)
        return 1
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "gpu"))
    from gpu_weights import random_2bit_weight  # the GPU tests' random 2-bit weights

    from lowbit.codegen.triton import w2a2 as k2

    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| M, K, N | cuBLAS bf16 | cuBLAS FP8 (promoted / fast) | lowbit W2A2 (promoted / fast) "
          "| error (promoted / fast) |")
    print("|---|---:|---:|---:|---:|")
    for m, k, n in SHAPES:
        packed, stored, gscale, w = random_2bit_weight(n, k, "int", seed=1, device="cuda")
        x = (torch.randn(m, k, device="cuda") * torch.rand(k, device="cuda") * 4).to(torch.bfloat16)
        wb = w.to(torch.bfloat16)
        a8, _, a_global = k2.act_quant(x, fp8_values=True)
        w8 = k2.weight_e4m3(packed, stored)
        rows = 256
        ref = (a8[:rows].double() * a_global[:rows].double()) @ (w8.double() * gscale.double()).T

        def rel(y):
            return ((y[:rows].double() - ref).norm() / ref.norm()).item()

        t_bf16 = graph_time_us(lambda: F.linear(x, wb))
        sa, sb = a_global.reshape(m, 1), gscale.reshape(1, 1).expand(1, n).contiguous()
        fp8, full, err = [], [], []
        for fast in (False, True):
            fp8.append(graph_time_us(lambda: torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sb,
                                                              out_dtype=torch.bfloat16, use_fast_accum=fast)))
            full.append(graph_time_us(lambda: k2.w2a2_linear(x, packed, stored, gscale, fast_accum=fast)))
            err.append(rel(k2.w2a2_linear(x, packed, stored, gscale, out_dtype=torch.float32, fast_accum=fast)))
        print(f"| {m}, {k}, {n} | {t_bf16:.1f} us | {fp8[0]:.1f} ({t_bf16 / fp8[0]:.2f}x) / {fp8[1]:.1f} "
              f"({t_bf16 / fp8[1]:.2f}x) | {full[0]:.1f} ({t_bf16 / full[0]:.2f}x) / {full[1]:.1f} "
              f"({t_bf16 / full[1]:.2f}x) | {err[0]:.1e} / {err[1]:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
