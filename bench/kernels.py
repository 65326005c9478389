"""Kernel benchmark: Triton W2A16, W2A2 and codebook kernels against cuBLAS bf16 (``F.linear``)
(and, for W2A2, cuBLAS FP8 ``torch._scaled_mm``) in the same run.

    python bench/kernels.py                 # default configurations, all shapes, all suites
    python bench/kernels.py --suites w2a2   # w2a16, w2a2, codebook (comma-separated)
    python bench/kernels.py --variants      # also the tile-size variants (slower: more compiles)
    python bench/kernels.py --suites codebook --variants --codebook-variants table  # table path tiles
    python bench/kernels.py --suites w2a16 --grid half   # W2A16 on the symmetric half grid (w2a16-half)
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
    # Llama-2-7B decode shapes (bench/e2e.py), separate and as a `fuse` pass would join them
    (1, 4096, 11008, "decode 4096->11008 (up)"),
    (1, 11008, 4096, "decode 11008->4096 (down)"),
    (1, 4096, 12288, "decode 4096->12288 (qkv)"),
    (1, 4096, 22016, "decode 4096->22016 (gate+up)"),
    # where the "dequant" path (W values to bf16, then cuBLAS) overtakes the fused GEMM
    (64, 8192, 8192, "M=64 8192x8192"),
    (256, 8192, 8192, "M=256 8192x8192"),
    (2048, 4096, 4096, "prefill 2048x4096x4096"),
    (2048, 4096, 11008, "prefill 2048x4096->11008"),
]

DEFAULT = [{}]
_SK = dict(path="skinny")
_OD = dict(_SK, ONE_DOT=True)  # one tensor-core product per tile (codegen/triton/w2a16.py, _tile_dot)
_GV = dict(path="gemv")
VARIANTS = {  # by (M, K, N); the full sweep behind the defaults is in docs/benchmarks.md
    (1, 8192, 8192): [
        dict(_SK, EVEN=False), dict(_SK, num_stages=2), dict(_SK, BLOCK_G=16, BLOCK_N=256, SPLIT_K=8),
        dict(_SK, BLOCK_G=16, BLOCK_N=256, SPLIT_K=4), dict(_SK, BLOCK_G=16, SPLIT_K=8),
        dict(_SK, XPERM=False), dict(_SK, XPERM=False, prepermuted=True),
        dict(_SK, XPERM=False, prepermuted=True, BLOCK_G=16, BLOCK_N=256, SPLIT_K=8),
        dict(_GV), dict(_GV, SPLIT_K=2), dict(_GV, BLOCK_N=64, num_warps=8), dict(_GV, BLOCK_N=16, num_warps=2),
        dict(_GV, BLOCK_G=64, num_warps=8), dict(_GV, FPS=2), dict(_GV, PAIRS=False), dict(_GV, BLOCK_N=64),
    ],
    (1, 4096, 4096): [
        dict(_SK, EVEN=False), dict(_SK, BLOCK_G=16, SPLIT_K=8), dict(_SK, BLOCK_G=16, BLOCK_N=256, SPLIT_K=8),
        dict(_SK, XPERM=False, prepermuted=True),
        dict(_GV), dict(_GV, SPLIT_K=1), dict(_GV, SPLIT_K=4), dict(_GV, BLOCK_N=16, num_warps=2),
        dict(_GV, BLOCK_N=64, num_warps=8),
    ],
    (1, 8192, 28672): [dict(_SK, EVEN=False), dict(_SK, BLOCK_G=16, BLOCK_N=256, SPLIT_K=2), dict(_GV),
                       dict(_GV, BLOCK_N=64, num_warps=8)],
    (16, 8192, 8192): [dict(_SK, EVEN=False), dict(_SK, BLOCK_G=16, BLOCK_N=256, SPLIT_K=8)],
    (1, 4096, 11008): [dict(_SK, EVEN=False), dict(_SK, BLOCK_G=16, BLOCK_N=256, SPLIT_K=8), dict(_GV),
                       dict(_GV, BLOCK_N=64, num_warps=8)],
    (1, 11008, 4096): [dict(_SK, EVEN=False), dict(_SK, BLOCK_G=16, BLOCK_N=256, SPLIT_K=8), dict(_GV),
                       dict(_GV, BLOCK_N=64, num_warps=8)],
    (4096, 8192, 8192): [dict(path="gemm"), dict(path="gemm", EVEN=False)],
    (64, 8192, 8192): [dict(path="skinny")],
    (2048, 4096, 4096): [dict(path="gemm")],
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
        for i in range(max(nsets, 3)):  # every set once: first-call conversions stay out of the capture
            fn(i % nsets)
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


def run(shapes, with_variants, dtype=torch.bfloat16, extra=(), grid="int"):
    import triton

    import lowbit.codegen.triton as lt
    from lowbit.formats import QFormat
    from lowbit.ops import dequantize_weight

    dev = "cuda"
    rows = []
    for m, k, n, label in shapes:
        t0 = time.time()
        packed, stored, gscale = make_weight(n, k, dev, seed=n + k)
        w = dequantize_weight(packed, stored, gscale, QFormat(2, grid))  # fp32 [N, K]
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
        rows.append(dict(shape=label, m=m, k=k, n=n, grid=grid, variant="cuBLAS bf16", us=t_cublas, ratio=1.0,
                         err=err_cublas))
        print(f"{label:24s} {'cuBLAS bf16':42s} {t_cublas:9.1f} us  err {err_cublas:.1e}", flush=True)
        del wbs, wb

        wbytes = packed.nbytes + stored.nbytes
        npk = max(1, math.ceil(STREAM_BYTES / wbytes)) if not big else 1
        sets = [(packed, stored)] + [(packed.clone(), stored.clone()) for _ in range(npk - 1)]
        variants = [dict(v) for v in DEFAULT]
        if with_variants:
            variants += [dict(v) for v in VARIANTS.get((m, k, n), [])]
        variants += [dict(v) for v in extra]
        variants.append(dict(op=True))
        for v in variants:
            name = "torch.ops.lowbit.qlinear" if v.get("op") else \
                (lt.default_path(m) + " default" if not v else " ".join(f"{a}={b}" for a, b in v.items()))
            try:
                if v.get("op"):
                    def fn(i):
                        p, s = sets[i]
                        return torch.ops.lowbit.qlinear(x, p, s, gscale, None, 2, grid, 16, "e4m3", 0, "int", 16,
                                                        "e4m3")
                elif v.get("prepermuted"):
                    # bound for a kernel layout whose x needs no permutation: the x permutation
                    # (a separate copy kernel on the XPERM=False path) is done once, outside the timing
                    import lowbit.codegen.triton.w2a16 as w2a16_mod
                    xp = w2a16_mod.permute_pairs(x.reshape(-1, k))
                    kv = {a: b for a, b in v.items() if a != "prepermuted"}

                    def fn(i, kv=kv, xp=xp):
                        p, s = sets[i]
                        real, w2a16_mod.permute_pairs = w2a16_mod.permute_pairs, lambda _x: xp
                        try:
                            return lt.w2a16_linear(x, p, s, gscale, grid=grid, **kv)
                        finally:
                            w2a16_mod.permute_pairs = real
                    v = kv
                else:
                    def fn(i, v=v):
                        p, s = sets[i]
                        return lt.w2a16_linear(x, p, s, gscale, grid=grid, **v)
                y = fn(0)
                torch.cuda.synchronize()
                err = ((y[:mr].double() - ref).norm() / ref.norm()).item()
                if not v.get("op"):
                    y32 = lt.w2a16_linear(x, packed, stored, gscale, grid=grid, out_dtype=torch.float32, **v)
                    err32 = ((y32[:mr].double() - ref).norm() / ref.norm()).item()
                else:
                    err32 = float("nan")
                t = time_graph(fn, npk, calls, replays)
                gbs = wbytes / t / 1e3
                row = dict(shape=label, m=m, k=k, n=n, grid=grid, variant=name, us=t, ratio=t_cublas / t, err=err,
                           err_fp32=err32, weight_GBps=gbs)
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


W2A2_SHAPES = [  # (M, K, N, label)
    (4096, 8192, 8192, "W2A2 GEMM 4096x8192x8192"),
    (2048, 4096, 4096, "W2A2 GEMM 2048x4096x4096"),
    (16, 8192, 8192, "W2A2 M=16 8192x8192"),
    (1, 8192, 8192, "W2A2 decode 8192x8192"),
]
W2A2_VARIANTS = {
    4096: [dict(PAIRS=True, BLOCK_M=128, BLOCK_N=128, BLOCK_G=16),
           dict(BLOCK_M=256, BLOCK_N=128, BLOCK_G=8),
           dict(BLOCK_M=128, BLOCK_N=256, BLOCK_G=8),
           dict(BLOCK_M=128, BLOCK_N=128, BLOCK_G=8, IMPRECISE=128),
           dict(BLOCK_M=128, BLOCK_N=128, BLOCK_G=16, num_stages=2),
           dict(path="scaled_mm")],
    2048: [dict(path="scaled_mm")],
    16: [dict(SPLIT_K=1), dict(SPLIT_K=8), dict(PAIRS=False, BLOCK_G=8)],
    1: [dict(SPLIT_K=1), dict(SPLIT_K=8), dict(PAIRS=False, BLOCK_G=8)],
}


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def _row(rows, label, m, k, n, name, t, base, err=float("nan"), extra=""):
    rows.append(dict(shape=label, m=m, k=k, n=n, variant=name, us=t, ratio=base / t, err=err))
    shown = "" if math.isnan(err) else f"err {err:.1e} "  # nan: a row that is not compared with a reference
    print(f"{label:28s} {name:52s} {t:9.1f} us  x{base / t:5.2f}  {shown}{extra}", flush=True)


def run_w2a2(with_variants, shapes=W2A2_SHAPES, dtype=torch.bfloat16):
    """W2A2: prologue against a plain copy of x; GEMMs against cuBLAS bf16 and cuBLAS FP8."""
    import lowbit.codegen.triton as lt
    from lowbit import ops as lowbit_ops
    from lowbit.codegen.triton import w2a2 as k2
    from lowbit.formats import QFormat

    dev = "cuda"
    rows = []
    for m, k, n, label in shapes:
        t0 = time.time()
        packed, stored, gscale = make_weight(n, k, dev, seed=n + k + 1)
        x = torch.randn(m, k, device=dev, dtype=dtype) * torch.rand(k, device=dev, dtype=dtype) * 4
        big = m >= 1024
        calls, replays = (4, 5) if big else (50, 20)
        # the exact operands: quantized activations and dequantized weights
        a8, a_sc, a_g = k2.act_quant(x, fp8_values=True)
        codes, sc_ref, g_ref = lowbit_ops.quantize_act._init_fn(x, 2, "int", 16, "e4m3")
        exact = torch.equal(a8.float(), (codes.float().view(m, -1, 16) * sc_ref.float().unsqueeze(-1)).view(m, k)) \
            and torch.equal(a_sc.view(torch.uint8), sc_ref.view(torch.uint8)) and torch.equal(a_g, g_ref)
        w8 = k2.weight_e4m3(packed, stored)
        mr = min(m, 256)
        ref = (a8[:mr].double() * a_g[:mr].double()) @ (w8.double() * gscale.double()).T
        wb = (w8.float() * gscale).to(dtype)
        nb = 1 if big else max(1, math.ceil(STREAM_BYTES / wb.nbytes))
        wbs = [wb] + [wb.clone() for _ in range(nb - 1)]
        t_bf16 = time_graph(lambda i: F.linear(x, wbs[i]), nb, calls, replays)
        _row(rows, label, m, k, n, "cuBLAS bf16 (F.linear)", t_bf16, t_bf16, _rel(F.linear(x[:mr], wb), ref))
        del wbs
        w8s = [w8] + ([w8.clone() for _ in range(max(1, math.ceil(STREAM_BYTES / w8.nbytes)) - 1)] if not big else [])
        sa, sb = a_g.reshape(m, 1), gscale.reshape(1, 1).expand(1, n).contiguous()
        try:
            t_fp8 = time_graph(lambda i: torch._scaled_mm(a8, w8s[i].t(), scale_a=sa, scale_b=sb,
                                                          out_dtype=dtype), len(w8s), calls, replays)
            y = torch._scaled_mm(a8[:mr].contiguous(), w8.t(), scale_a=sa[:mr].contiguous(), scale_b=sb,
                                 out_dtype=torch.float32)
            _row(rows, label, m, k, n, "cuBLAS FP8 (_scaled_mm, E4M3 operands given)", t_fp8, t_bf16, _rel(y, ref))
            # what the scaled_mm path runs up to k2.SCALED_MM_FAST_ACCUM_MAX_K
            t_fast = time_graph(lambda i: torch._scaled_mm(a8, w8s[i].t(), scale_a=sa, scale_b=sb, out_dtype=dtype,
                                                           use_fast_accum=True), len(w8s), calls, replays)
            y = torch._scaled_mm(a8[:mr].contiguous(), w8.t(), scale_a=sa[:mr].contiguous(), scale_b=sb,
                                 out_dtype=torch.float32, use_fast_accum=True)
            _row(rows, label, m, k, n, "cuBLAS FP8, fast accumulation (operands given)", t_fast, t_bf16, _rel(y, ref))
        except Exception as e:
            print(f"{label:28s} _scaled_mm FAILED {type(e).__name__}: {str(e)[:150]}", flush=True)
        del w8s
        # prologue against a copy of x
        buf = torch.empty_like(x)
        t_copy = time_graph(lambda i: buf.copy_(x), 1, calls * 4, replays)
        t_pro = time_graph(lambda i: k2.act_quant(x, fp8_values=True), 1, calls * 4, replays)
        print(f"{label:28s} {'plain copy of x (bf16)':52s} {t_copy:9.1f} us", flush=True)
        print(f"{label:28s} {'prologue act_quant (E4M3 values), exact=' + str(exact):52s} {t_pro:9.1f} us  "
              f"{t_pro / t_copy:5.2f}x the copy", flush=True)
        rows.append(dict(shape=label, m=m, k=k, n=n, variant="prologue / copy", us=t_pro, ratio=t_pro / t_copy,
                         err=0.0 if exact else 1.0))
        # the prologue of the w2a2-half preset (half grid, int8 codes), unclipped and clipped at 0.55
        # (the CLIP branch compiled in)
        for clip in (1.0, 0.55):
            ref_c = lowbit_ops.quantize_act._init_fn(x, 2, "half", 16, "e4m3", clip)
            got_c = k2.act_quant(x, 2, "half", clip=clip)
            exact_c = all(torch.equal(a.float(), b.float()) for a, b in zip(got_c, ref_c))
            t_clip = time_graph(lambda i: k2.act_quant(x, 2, "half", clip=clip), 1, calls * 4, replays)
            what = f"prologue, half grid, clip {clip:g}"
            print(f"{label:28s} {what + ', exact=' + str(exact_c):52s} {t_clip:9.1f} us  "
                  f"{t_clip / t_copy:5.2f}x the copy", flush=True)
            rows.append(dict(shape=label, m=m, k=k, n=n, variant=what + " / copy", us=t_clip, ratio=t_clip / t_copy,
                             err=0.0 if exact_c else 1.0))
        if k & (k - 1) == 0 and k <= 8192:  # the online Hadamard fused in (a rotated site's prologue)
            h = lowbit_ops.quantize_act._init_fn(torch.ops.lowbit.hadamard(x), 2, "int", 16, "e4m3")
            got = k2.act_quant(x, hadamard=True)
            exact_h = all(torch.equal(a.view(torch.uint8) & 0x7F, b.view(torch.uint8) & 0x7F)
                          if a.dtype == torch.float8_e4m3fn else torch.equal(a, b) for a, b in zip(got, h))
            t_had = time_graph(lambda i: k2.act_quant(x, fp8_values=True, hadamard=True), 1, calls * 4, replays)
            t_sep = time_graph(lambda i: k2.act_quant(torch.ops.lowbit.hadamard(x), fp8_values=True), 1, calls * 4,
                               replays)
            print(f"{label:28s} {'prologue + online Hadamard, exact=' + str(exact_h):52s} {t_had:9.1f} us  "
                  f"{t_had / t_copy:5.2f}x the copy (Hadamard op, then prologue: {t_sep:.1f} us)", flush=True)
            rows.append(dict(shape=label, m=m, k=k, n=n, variant="prologue + Hadamard / copy", us=t_had,
                             ratio=t_had / t_copy, err=0.0 if exact_h else 1.0))
        wbytes = packed.nbytes + stored.nbytes
        npk = 1 if big else max(1, math.ceil(STREAM_BYTES / wbytes))
        sets = [(packed, stored)] + [(packed.clone(), stored.clone()) for _ in range(npk - 1)]
        variants = [{}] + ([dict(v) for v in W2A2_VARIANTS.get(m, [])] if with_variants else [])
        for v in variants:
            name = "GEMM " + (" ".join(f"{a}={b}" for a, b in v.items()) if v else "default " +
                              str({a: b for a, b in k2.default_config(m, n, k).items() if a != "IMPRECISE"}))
            try:
                y = k2.w2a2_gemm(a8[:mr].contiguous(), a_g[:mr], packed, stored, gscale, None, torch.float32, **v)
                err = _rel(y, ref)
                t = time_graph(lambda i, v=v: k2.w2a2_gemm(a8, a_g, sets[i][0], sets[i][1], gscale, None, dtype, **v),
                               npk, calls, replays)
                _row(rows, label, m, k, n, name, t, t_bf16, err)
            except Exception as e:
                rows.append(dict(shape=label, m=m, k=k, n=n, variant=name, error=str(e)[:200]))
                print(f"{label:28s} {name:52s} FAILED {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                      flush=True)
        t = time_graph(lambda i: torch.ops.lowbit.qlinear(x, sets[i][0], sets[i][1], gscale, None, 2, "int", 16, "e4m3",
                                                          2, "int", 16, "e4m3"), npk, calls, replays)
        y = torch.ops.lowbit.qlinear(x[:mr], packed, stored, gscale, None, 2, "int", 16, "e4m3", 2, "int", 16, "e4m3")
        _row(rows, label, m, k, n, "prologue + GEMM: torch.ops.lowbit.qlinear", t, t_bf16, _rel(y, ref))
        del sets
        torch.cuda.empty_cache()
        print(f"#   ({time.time() - t0:.0f} s)", flush=True)
    return rows


CODEBOOK_SHAPES = [(1, 8192, 8192, "codebook decode 8192x8192"), (1, 4096, 4096, "codebook decode 4096x4096"),
                   (1, 8192, 28672, "codebook decode 8192->28672"), (16, 8192, 8192, "codebook M=16 8192x8192")]
_DEC = dict(path="decode")  # codewords expanded to +-1 tiles on tensor cores (codegen/triton/codebook.py)
_V8 = dict(_DEC, BLOCK_V=8)
CODEBOOK_VARIANTS = [_DEC, _V8, dict(_DEC, BLOCK_V=4), dict(_V8, SPLIT_K=8), dict(_V8, SPLIT_K=16),
                     dict(_V8, BLOCK_N=64, num_warps=4), dict(_V8, BLOCK_N=64, num_warps=4, SPLIT_K=8),
                     dict(_V8, num_stages=2), dict(_V8, num_stages=4), dict(_V8, ONE_DOT=False),
                     dict(_DEC, BLOCK_V=4, SPLIT_K=16)]
# table lookups (codegen/triton/codebook.py, _codebook_table_kernel): defaults R=16, BLOCK_N=256,
# TABLE="shared", LOADS="words", PREFETCH=8, RED=64, SPLIT_N=0 (about one program per SM). TABLE="shared"
# refuses BLOCK_N > 32 * num_warps (Triton would convert layouts through the table's shared memory in the loop),
# so wider row blocks run with TABLE="global"
_TAB = dict(path="table")
# the Gluon W2A16 pipeline in codebook mode (codegen/triton/codebook_gluon.py): defaults BLOCK_N=64, SPLIT_K 8 up
# to 64 row blocks and 4 above, STAGES=2 (a cp.async ring of two tiles), the 4-byte sign words in shared
# memory (shift + LOP3 per pair; BYTE_TABLE=True: 16 bytes per codeword, one PRMT per pair, slower)
_GLU = dict(path="gluon")
CODEBOOK_GLUON_VARIANTS = [dict(_GLU, BYTE_TABLE=True), dict(_GLU, BYTE_TABLE=True, BLOCK_N=128),
                           dict(_GLU, BLOCK_N=128), dict(_GLU, SPLIT_K=8), dict(_GLU, SPLIT_K=2),
                           dict(_GLU, STAGES=3), dict(_GLU, BLOCK_N=128, SPLIT_K=8), dict(_GLU, SPLIT_K=16),
                           dict(_GLU, BLOCK_N=256, num_warps=8), dict(_GLU, STAGES=4, SPLIT_K=8)]
CODEBOOK_TABLE_VARIANTS = [dict(_TAB, R=8), dict(_TAB, R=8, PREFETCH=0), dict(_TAB, PREFETCH=0),
                           dict(_TAB, PREFETCH=16), dict(_TAB, R=4), dict(_TAB, LOADS="rotated"),
                           dict(_TAB, SPLIT_N=4), dict(_TAB, RED=16), dict(_TAB, BLOCK_N=128, num_warps=4),
                           dict(_TAB, TABLE="global"), dict(_TAB, BLOCK_N=512, TABLE="global"),
                           dict(_TAB, R=8, TABLE="gather", BLOCK_N=1024)]


def run_codebook(with_variants, shapes=CODEBOOK_SHAPES, dtype=torch.bfloat16, index_bits=11, which="all"):
    """Codebook GEMV (v=16, c=11, per-row E4M3 scales: the btc preset) against cuBLAS bf16:
    the default (path=None), the decode path and the table path at every shape; with variants,
    at 1 x 8192 x 8192 the decode (``which`` "all" or "decode") and table ("all" or "table")
    tile variants."""
    from lowbit.codebook import dequantize_codebook_weight
    from lowbit.codegen.triton import codebook as kc
    from lowbit.codegen.triton import codebook_gluon as cg

    dev = "cuda"
    rows = []
    for m, k, n, label in shapes:
        t0 = time.time()
        g = torch.Generator(device=dev).manual_seed(k + n)
        nbytes = -(-(k // 16) * index_bits // 8)
        idx = torch.randint(0, 256, (n, nbytes), generator=g, device=dev, dtype=torch.uint8)
        cb = torch.randint(0, 256, ((1 << index_bits) * 2,), generator=g, device=dev, dtype=torch.uint8)
        sc = (torch.rand(n, 1, generator=g, device=dev) * 200 + 1).to(torch.float8_e4m3fn)
        gs = torch.tensor(1e-3, device=dev)
        w = dequantize_codebook_weight(idx, cb, sc, gs, 16, index_bits, k, "e4m3")
        x = torch.randn(m, k, device=dev, dtype=dtype)
        ref = x.double() @ w.double().T
        wb = w.to(dtype)
        nb = max(1, math.ceil(STREAM_BYTES / wb.nbytes))
        wbs = [wb] + [wb.clone() for _ in range(nb - 1)]
        t_bf16 = time_graph(lambda i: F.linear(x, wbs[i]), nb, 50, 20)
        _row(rows, label, m, k, n, "cuBLAS bf16 (F.linear)", t_bf16, t_bf16, _rel(F.linear(x, wb), ref))
        del wbs, wb
        nset = max(1, math.ceil(STREAM_BYTES / idx.nbytes))
        sets = [idx] + [idx.clone() for _ in range(nset - 1)]
        variants = [{}, dict(_DEC), dict(_TAB)]  # {}: path=None (Gluon for bf16 x of <= 8 rows, else table at
        #                                          M=1 with K, N >= 8192, else decode)
        if m <= 8 and dtype == torch.bfloat16:
            variants.insert(1, dict(_GLU))
        if with_variants and (m, k, n) == (1, 8192, 8192) and which in ("all", "gluon"):
            variants += [dict(v) for v in CODEBOOK_GLUON_VARIANTS]
        if with_variants and (m, k, n) == (1, 8192, 8192):
            variants += [dict(v) for v in CODEBOOK_VARIANTS[1:]] if which in ("all", "decode") else []
            variants += [dict(v) for v in CODEBOOK_TABLE_VARIANTS] if which in ("all", "table") else []
        elif with_variants and which in ("all", "decode"):
            variants.append(dict(_V8))
        for v in variants:
            route = "table" if kc._table_route(m, k, n, index_bits) else "decode"
            if cg.unsupported(x, idx, index_bits, k) is None:
                route = "gluon"
            name = "codebook GEMV " + (" ".join(f"{a}={b}" for a, b in v.items()) if v else
                                       f"default ({route}) {kc.default_config(route, m, n, k // 16)}")
            try:
                y = kc.codebook_gemv(x, idx, cb, sc, gs, None, index_bits, k, out_dtype=torch.float32, **v)
                err = _rel(y, ref)
                for i in range(nset):  # the Gluon path converts each index tensor once: not inside the graph
                    kc.codebook_gemv(x, sets[i], cb, sc, gs, None, index_bits, k, **v)
                t = time_graph(lambda i, v=v: kc.codebook_gemv(x, sets[i], cb, sc, gs, None, index_bits, k, **v),
                               nset, 50, 20)
                _row(rows, label, m, k, n, name, t, t_bf16, err)
            except Exception as e:
                rows.append(dict(shape=label, m=m, k=k, n=n, variant=name, error=str(e)[:200]))
                print(f"{label:28s} {name:52s} FAILED {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                      flush=True)
        for i in range(nset):
            torch.ops.lowbit.codebook_linear(x, sets[i], cb, sc, gs, None, 16, index_bits, k, "e4m3")
        t = time_graph(lambda i: torch.ops.lowbit.codebook_linear(x, sets[i], cb, sc, gs, None, 16, index_bits, k,
                                                                  "e4m3"), nset, 50, 20)
        _row(rows, label, m, k, n, "torch.ops.lowbit.codebook_linear", t, t_bf16)
        del sets
        print(f"#   ({time.time() - t0:.0f} s)", flush=True)
    return rows


HADAMARD_SHAPES = [(16384, 1536, "16384 x 1536 (12 x 128)"), (4096, 8192, "4096 x 8192"),
                   (16384, 576, "16384 x 576 (36 x 16)"), (1, 8192, "1 x 8192")]


def _hadamard_in_passes(x):
    """``torch.ops.lowbit.hadamard(x)`` in separate passes: float32 copy, butterflies, H_m, scale, cast."""
    from lowbit.codegen.triton import fwht
    from lowbit.hadamard import _base_matrix_cached, decompose

    n = x.shape[-1]
    m, p = decompose(n)
    y = fwht(x.float().reshape(-1, p), p).view(-1, m, p)
    if m > 1:
        y = torch.matmul(_base_matrix_cached(m, False, torch.float32, y.device), y)
    return (y * (1.0 / math.sqrt(n))).reshape(x.shape).to(x.dtype)


def run_hadamard(shapes=HADAMARD_SHAPES, dtype=torch.bfloat16):
    """The Hadamard transform (``torch.ops.lowbit.hadamard``) with the Triton butterfly kernel
    against the same transform with the butterfly stages in torch, and against a plain copy of
    x; outputs compared bit for bit."""
    import lowbit.codegen.triton  # noqa: F401  (registers the butterfly kernel for CUDA)
    from lowbit.hadamard import _fwht_last, hadamard_transform

    rows = []
    for m, n, label in shapes:
        xs = [torch.randn(m, n, device="cuda", dtype=dtype) for _ in range(4)]
        same = all(torch.equal(torch.ops.lowbit.hadamard(x), hadamard_transform(x, fwht=_fwht_last)) for x in xs)
        calls, replays = (10, 10) if m > 1 else (100, 20)
        t_copy = time_graph(lambda i: xs[i].clone(), len(xs), calls, replays)
        t_torch = time_graph(lambda i: hadamard_transform(xs[i], fwht=_fwht_last), len(xs), calls, replays)
        t_kernel = time_graph(lambda i: torch.ops.lowbit.hadamard(xs[i]), len(xs), calls, replays)
        # the op as it was before 2026-12-02: a float32 copy of x, the kernel, the H_m product, the scaling
        # and the cast each a pass of their own (the same values: tests/test_hadamard.py)
        t_passes = time_graph(lambda i: _hadamard_in_passes(xs[i]), len(xs), calls, replays)
        _row(rows, label, m, n, n, "hadamard, torch butterfly stages (baseline)", t_torch, t_torch)
        _row(rows, label, m, n, n, "hadamard, Triton butterfly, float32 copy first, scale and cast apart",
             t_passes, t_torch, extra=f"= {t_passes / t_copy:.2f}x a copy of x")
        _row(rows, label, m, n, n, f"hadamard, Triton butterfly {'(bit-identical)' if same else '(DIFFERS)'}",
             t_kernel, t_torch, extra=f"= {t_kernel / t_copy:.2f}x a copy of x ({t_copy:.1f} us)")
    return rows


def table(rows):
    """Markdown table: best Triton time per shape and the defaults, as ratios to cuBLAS."""
    out = ["| shape (M, K, N) | variant | time (us) | speed-up vs the baseline (cuBLAS bf16 unless named) | rel. error |",
           "|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['m']}, {r['k']}, {r['n']} | {r['variant']} | failed | | |")
        else:
            err = "" if math.isnan(r["err"]) else f"{r['err']:.1e}"
            out.append(f"| {r['m']}, {r['k']}, {r['n']} | {r['variant']} | {r['us']:.1f} | {r['ratio']:.2f}x | {err} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", action="store_true", help="also time tile-size variants")
    ap.add_argument("--grid", default="int", choices=["int", "half"],
                    help="the w2a16 suite's weight grid (half: the w2a16-half preset's +-s/2, +-3s/2)")
    ap.add_argument("--shapes", default="all", help="comma-separated indices into SHAPES (w2a16), or 'all'")
    ap.add_argument("--suites", default="w2a16,w2a2,codebook",
                    help="comma-separated: w2a16, w2a2, codebook, hadamard")
    ap.add_argument("--json", default=None, help="write all rows to this file")
    ap.add_argument("--extra", default="[]",
                    help='JSON list of w2a16_linear keyword sets timed at every W2A16 shape, e.g. '
                         '\'[{"path": "skinny", "num_warps": 4}]\'')
    ap.add_argument("--codebook-variants", default="all", choices=["all", "decode", "table", "gluon"],
                    help="with --variants: which codebook tile variants to time at 1 x 8192 x 8192")
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
    suites = args.suites.split(",")
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
    rows = []
    if "w2a16" in suites:
        rows += run(shapes, args.variants, extra=json.loads(args.extra), grid=args.grid)
    if "w2a2" in suites:
        rows += run_w2a2(args.variants)
    if "codebook" in suites:
        rows += run_codebook(args.variants, which=args.codebook_variants)
    if "hadamard" in suites:
        rows += run_hadamard()
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
