"""Host (CPU) cost of one eager W2A16 call at batch 1, against ``F.linear`` in bf16.

    python bench/host_overhead.py            # on a CUDA machine; K = N = 4096, M = 1

Times 500 back-to-back eager calls of each entry below (CPU time until the last launch
returns, and wall time until the GPU is done), then prints a cProfile of 300 calls of
``torch.ops.lowbit.qlinear``. A call whose CPU time exceeds its GPU time is host-bound in eager
code; CUDA graphs and ``torch.compile`` replay the kernels without this cost.
"""
from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import make_weight  # noqa: E402  (bench/kernels.py)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/host_overhead.py needs a CUDA GPU", file=sys.stderr)
        return 1
    import lowbit.codegen.triton  # noqa: F401  (registers the CUDA kernels)
    from lowbit.codegen.triton import dispatch
    from lowbit.codegen.triton import w2a16 as tdot
    from lowbit.codegen.triton import w2a16_gluon as gluon

    n = k = 4096
    packed, scales, gscale = make_weight(n, k, "cuda", 0)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    words = gluon.repack_w2a16(packed)
    args = (x, packed, scales, gscale, None, 2, "int", 16, "e4m3", 0, "int", 16, "e4m3")
    from lowbit.formats import QFormat
    from lowbit.quant_linear import QuantLinear

    site = QuantLinear.from_weight(w_bf16, None, QFormat(2, "int", 16, "e4m3"))
    entries = {
        "F.linear bf16": lambda: F.linear(x, w_bf16),
        "QuantLinear.forward (eager: direct kernel call)": lambda: site(x),
        "torch.ops.lowbit.qlinear (Gluon route)": lambda: torch.ops.lowbit.qlinear(*args),
        "dispatch.qlinear_triton (no custom-op layer)": lambda: dispatch.qlinear_triton(*args),
        "w2a16_gluon on repacked words": lambda: gluon.w2a16_gluon(x, words, scales, gscale),
        "w2a16_linear (Triton tl.dot kernel)": lambda: tdot.w2a16_linear(x, packed, scales, gscale),
    }
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; M=1, K=N={k}")
    for name, fn in entries.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"{name:46s} CPU {1e6 * (t1 - t0) / 500:7.1f} us/call   wall {1e6 * (t2 - t0) / 500:7.1f} us/call",
              flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        torch.ops.lowbit.qlinear(*args)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
