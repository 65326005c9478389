"""Kernel benchmark: Triton W2A16 kernels against cuBLAS bf16 (``F.linear``) in the same run.

    python bench/kernels.py                 # default configurations, all shapes
    python bench/kernels.py --variants      # also the tile-size variants (slower: more compiles)
    python bench/kernels.py --json out.json # full numbers

Every timing replays a CUDA graph of many calls (launch gaps out of the way) that cycle
through enough copies of the weights to exceed the L2 cache (50 MB on an H100), so weights
stream from device memory as in a real model; x stays the same (it is small). Each line
also checks the result against a float64 product of the dequantized operands (relative
Frobenius error; the kernels round only in the fp32 accumulation and the final bf16 store).
Results go to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

L2_BYTES = 50 * 2**20
STREAM_BYTES = 3 * L2_BYTES  # bytes of weights a graph cycles through

SHAPES = [  # (M, K, N, label)
    (1, 8192, 8192, "decode 8192x8192"),
    (1, 4096, 4096, "decode 4096x4096"),
    (1, 8192, 28672, "decode 8192->28672"),
    (16, 8192, 8192, "M=16 8192x8192"),
    (4096, 8192, 8192, "GEMM 4096x8192x8192"),
]

DEFAULT = [{}]
_SK = dict(path="skinny")
VARIANTS = {  # by (M, K, N); the full sweep behind the defaults is in docs/benchmarks.md
    (1, 8192, 8192): [
        dict(_SK, SPLIT_K=1),
        dict(_SK, SPLIT_K=4),
        dict(_SK, BLOCK_N=64, BLOCK_G=32, num_warps=4, SPLIT_K=2),
        dict(_SK, BLOCK_N=64, BLOCK_G=32, num_warps=4, SPLIT_K=4),
        dict(_SK, ASM=False),
        dict(path="gemv"),
    ],
    (1, 4096, 4096): [
        dict(_SK, SPLIT_K=2),
        dict(_SK, SPLIT_K=8),
        dict(_SK, BLOCK_N=64, BLOCK_G=32, num_warps=4, SPLIT_K=4),
        dict(path="gemv"),
    ],
    (1, 8192, 28672): [dict(_SK, SPLIT_K=2)],
    (16, 8192, 8192): [dict(_SK, BLOCK_N=64, BLOCK_G=32, num_warps=4, SPLIT_K=1),
                       dict(_SK, BLOCK_N=64, BLOCK_G=32, num_warps=4, SPLIT_K=2)],
    (4096, 8192, 8192): [dict(path="gemm", BLOCK_M=128, BLOCK_G=16, XPERM=False)],
}


def make_weight(n, k, device, seed):
    """Random valid 2-bit weight: codes in [-2, 1], E4M3 scales, fp32 global scale."""
    from lowbit.formats import pack_codes

    g = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(-2, 2, (n, k), generator=g, device=device, dtype=torch.int8)
    stored = (torch.rand(n, k // 16, generator=g, device=device) * 224).to(torch.float8_e4m3fn)
    return pack_codes(codes, 2), stored, torch.tensor(1e-4, device=device)


def time_graph(fn, nsets, calls, replays):
    """Median microseconds per call of fn(i) (i cycling over nsets) from CUDA-graph replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(min(nsets, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in range(calls):
            fn(c % nsets)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def run(shapes, with_variants, dtype=torch.bfloat16):
    import triton

    import lowbit.codegen.triton as lt
    from lowbit.formats import QFormat
    from lowbit.ops import dequantize_weight

    dev = "cuda"
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
    rows = []
    for m, k, n, label in shapes:
        t0 = time.time()
        packed, stored, gscale = make_weight(n, k, dev, seed=n + k)
        w = dequantize_weight(packed, stored, gscale, QFormat(2, "int"))  # fp32 [N, K]
        x = torch.randn(m, k, device=dev, dtype=dtype)
        mr = min(m, 256)  # rows checked in float64
        ref = (x[:mr].double() @ w.double().T)
        big = m >= 1024
        calls, replays = (4, 5) if big else (50, 20)

        # cuBLAS bf16 on the dequantized weight (the same values)
        wb = w.to(dtype)
        nb = max(1, math.ceil(STREAM_BYTES / wb.nbytes)) if not big else 1
        wbs = [wb] + [wb.clone() for _ in range(nb - 1)]
        t_cublas = time_graph(lambda i: F.linear(x, wbs[i]), nb, calls, replays)
        y = F.linear(x, wb)
        err_cublas = ((y[:mr].double() - ref).norm() / ref.norm()).item()
        rows.append(dict(shape=label, m=m, k=k, n=n, variant="cuBLAS bf16", us=t_cublas, ratio=1.0, err=err_cublas))
        print(f"{label:24s} {'cuBLAS bf16':42s} {t_cublas:9.1f} us  err {err_cublas:.1e}", flush=True)
        del wbs, wb

        wbytes = packed.nbytes + stored.nbytes
        npk = max(1, math.ceil(STREAM_BYTES / wbytes)) if not big else 1
        sets = [(packed, stored)] + [(packed.clone(), stored.clone()) for _ in range(npk - 1)]
        variants = [dict(v) for v in DEFAULT]
        if with_variants:
            variants += [dict(v) for v in VARIANTS.get((m, k, n), [])]
        variants.append(dict(op=True))
        for v in variants:
            name = "torch.ops.lowbit.qlinear" if v.get("op") else \
                (lt.default_path(m) + " default" if not v else " ".join(f"{a}={b}" for a, b in v.items()))
            try:
                if v.get("op"):
                    def fn(i):
                        p, s = sets[i]
                        return torch.ops.lowbit.qlinear(x, p, s, gscale, None, 2, "int", 16, "e4m3", 0, "int", 16,
                                                        "e4m3")
                else:
                    def fn(i, v=v):
                        p, s = sets[i]
                        return lt.w2a16_linear(x, p, s, gscale, **v)
                y = fn(0)
                torch.cuda.synchronize()
                err = ((y[:mr].double() - ref).norm() / ref.norm()).item()
                if not v.get("op"):
                    y32 = lt.w2a16_linear(x, packed, stored, gscale, out_dtype=torch.float32, **v)
                    err32 = ((y32[:mr].double() - ref).norm() / ref.norm()).item()
                else:
                    err32 = float("nan")
                t = time_graph(fn, npk, calls, replays)
                gbs = wbytes / t / 1e3
                row = dict(shape=label, m=m, k=k, n=n, variant=name, us=t, ratio=t_cublas / t, err=err, err_fp32=err32,
                           weight_GBps=gbs)
                rows.append(row)
                flag = "" if err32 != err32 or err32 < 1e-3 else "  <-- fp32 error above 1e-3"
                print(f"{label:24s} {name:42s} {t:9.1f} us  x{t_cublas / t:5.2f}  {gbs:6.0f} GB/s(w)  "
                      f"err {err:.1e} / fp32 {err32:.1e}{flag}", flush=True)
            except Exception as e:  # keep going: one failing variant must not hide the others
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                rows.append(dict(shape=label, m=m, k=k, n=n, variant=name, error=msg))
                print(f"{label:24s} {name:42s} FAILED {msg}", flush=True)
        del sets, w, ref
        torch.cuda.empty_cache()
        print(f"#   ({time.time() - t0:.0f} s)", flush=True)
    return rows


def table(rows):
    """Markdown table: best Triton time per shape and the defaults, as ratios to cuBLAS."""
    out = ["| shape (M, K, N) | variant | time (us) | speed-up vs cuBLAS bf16 | rel. error (bf16 out) |",
           "|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['m']}, {r['k']}, {r['n']} | {r['variant']} | failed | | |")
        else:
            out.append(f"| {r['m']}, {r['k']}, {r['n']} | {r['variant']} | {r['us']:.1f} | {r['ratio']:.2f}x | "
                       f"{r['err']:.1e} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", action="store_true", help="also time tile-size variants")
    ap.add_argument("--shapes", default="all", help="comma-separated indices into SHAPES, or 'all'")
    ap.add_argument("--json", default=None, help="write all rows to this file")
    ap.add_argument("--once", action="store_true",
                    help="run the default kernel of each shape twice and exit (for ncu / nsys)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 1
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    if args.once:
        import lowbit.codegen.triton as lt

        for m, k, n, _ in shapes:
            packed, stored, gscale = make_weight(n, k, "cuda", seed=0)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for _ in range(2):
                lt.w2a16_linear(x, packed, stored, gscale)
        torch.cuda.synchronize()
        return 0
    rows = run(shapes, args.variants)
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
