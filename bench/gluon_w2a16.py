"""Benchmark of the Gluon W2A16 kernel (codegen/triton/w2a16_gluon.py) against cuBLAS bf16
(``F.linear`` on the dequantized weight) and the existing Triton skinny kernel
(``lowbit.codegen.triton.w2a16.w2a16_linear``), in the same run.

    python bench/gluon_w2a16.py                        # default config, the shapes below
    python bench/gluon_w2a16.py --sweep                # plus the built-in tile variants
    python bench/gluon_w2a16.py --configs '[{"BLOCK_N": 128}, {"PREFETCH": false}]'
    python bench/gluon_w2a16.py --shapes 0,3 --json out.json

Same method as bench/kernels.py (whose helpers it imports): medians over CUDA-graph replays of
many calls that cycle through copies of the weights totalling more than the L2 cache, so the
weights stream from HBM; x is reused. The repacking of the weight is offline (outside the
timing). Each line also reports the relative Frobenius error of the fp32 output against a
float64 product of the dequantized operands.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import STREAM_BYTES, make_weight, time_graph  # noqa: E402  (bench/kernels.py)

SHAPES = [  # (M, K, N, label)
    (1, 8192, 8192, "decode 8192x8192"),
    (1, 4096, 4096, "decode 4096x4096"),
    (1, 8192, 28672, "decode 8192->28672"),
    (16, 8192, 8192, "M=16 8192x8192"),
    (1, 4096, 11008, "decode 4096->11008 (up)"),
    (1, 11008, 4096, "decode 11008->4096 (down)"),
]

SWEEP = [
    dict(BLOCK_N=128), dict(BLOCK_N=32, num_warps=2), dict(BLOCK_N=128, num_warps=8), dict(BLOCK_N=256, num_warps=8),
    dict(PREFETCH=False), dict(UNROLL2=False), dict(SPLIT_K=2), dict(SPLIT_K=8), dict(BLOCK_N=128, SPLIT_K=8),
]


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def run(shapes, configs, calls=50, replays=20):
    import lowbit.codegen.triton as lt
    from lowbit.codegen.triton import w2a16_gluon as wg
    from lowbit.formats import QFormat
    from lowbit.ops import dequantize_weight

    dev = "cuda"
    rows = []
    for m, k, n, label in shapes:
        t0 = time.time()
        packed, stored, gscale = make_weight(n, k, dev, seed=n + k)
        w = dequantize_weight(packed, stored, gscale, QFormat(2, "int"))
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = x.double() @ w.double().T

        def emit(name, t, base, err, gbs=None, extra=""):
            row = dict(shape=label, m=m, k=k, n=n, variant=name, us=t, ratio=base / t, err=err)
            rows.append(row)
            gb = f"{gbs:6.0f} GB/s(w)" if gbs else " " * 14
            print(f"{label:26s} {name:46s} {t:8.2f} us  x{base / t:5.2f}  {gb}  err {err:.1e}{extra}", flush=True)
            return row

        wb = w.to(torch.bfloat16)
        nb = max(1, math.ceil(STREAM_BYTES / wb.nbytes))
        wbs = [wb] + [wb.clone() for _ in range(nb - 1)]
        t_cublas = time_graph(lambda i: F.linear(x, wbs[i]), nb, calls, replays)
        emit("cuBLAS bf16 (F.linear)", t_cublas, t_cublas, _rel(F.linear(x, wb), ref))
        wbs = wb = None  # free before the next allocations

        wbytes = packed.nbytes + stored.nbytes
        npk = max(1, math.ceil(STREAM_BYTES / wbytes))
        sets = [(packed, stored)] + [(packed.clone(), stored.clone()) for _ in range(npk - 1)]
        y = lt.w2a16_linear(x, packed, stored, gscale, out_dtype=torch.float32)
        t_sk = time_graph(lambda i: lt.w2a16_linear(x, sets[i][0], sets[i][1], gscale), npk, calls, replays)
        emit(f"Triton {lt.default_path(m)} (w2a16_linear default)", t_sk, t_cublas, _rel(y, ref), wbytes / t_sk / 1e3)
        sets = None

        words = wg.repack_w2a16(packed)  # offline
        gsets = [(words, stored)] + [(words.clone(), stored.clone()) for _ in range(npk - 1)]
        for cfg in configs:
            full = wg.default_config(m, n, k, **cfg)
            name = "Gluon " + (" ".join(f"{a}={b}" for a, b in cfg.items()) if cfg else "default") + \
                f" [{full['BLOCK_N']}x{full['num_warps']}w split{full['SPLIT_K']}{' u2' if full['UNROLL2'] else ''}]"
            try:
                y = wg.w2a16_gluon(x, words, stored, gscale, out_dtype=torch.float32, **cfg)
                torch.cuda.synchronize()
                err = _rel(y, ref)
                t = time_graph(lambda i, cfg=cfg: wg.w2a16_gluon(x, gsets[i][0], gsets[i][1], gscale, **cfg),
                               npk, calls, replays)
                flag = "" if err < 1e-3 else "  <-- error above 1e-3"
                row = emit(name, t, t_cublas, err, wbytes / t / 1e3, f"  ({t_sk / t:.2f}x the Triton kernel){flag}")
                row["vs_triton"] = t_sk / t
            except Exception as e:  # keep going: one failing variant must not hide the others
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                rows.append(dict(shape=label, m=m, k=k, n=n, variant=name, error=msg))
                print(f"{label:26s} {name:46s} FAILED {msg}", flush=True)
        gsets = None
        torch.cuda.empty_cache()
        print(f"#   ({time.time() - t0:.0f} s)", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="all", help="comma-separated indices into SHAPES, or 'all'")
    ap.add_argument("--sweep", action="store_true", help="also time the built-in variants (SWEEP)")
    ap.add_argument("--configs", default="[]", help="JSON list of w2a16_gluon keyword sets timed at every shape")
    ap.add_argument("--json", default=None, help="write all rows to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gluon_w2a16.py needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    configs = [{}] + (SWEEP if args.sweep else []) + json.loads(args.configs)
    rows = run(shapes, configs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
