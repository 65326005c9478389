"""GPU check and timing of the W2A2 activation prologue (lowbit.codegen.triton.w2a2.act_quant).

    python bench/w2a2_prologue.py            # on a CUDA machine (TRITON_INTERPRET must be off)
    python bench/w2a2_prologue.py --dry      # a CPU rehearsal: interpreter, small shapes, no timings

For x in {4096 x 8192, 2048 x 4096, 1 x 8192, 16 x 8192} bf16 with realistic values (randn
times a per-channel logspace spread, zero rows and zero groups, rows whose global scale is a
power of two, and values planted on and next to the decision points T * e, T = 1/2, -1/2, -3/2,
of the reference's own effective scales):
* act_quant(x) and act_quant(x, fp8_values=True) against the reference op on the GPU
  (lowbit.ops.quantize_act._init_fn): codes / E4M3 values and globals bit for bit, scales bit for
  bit up to the sign of a zero scale (as tests/gpu/test_triton_gpu.py: the reference's own sign
  of max(+0, -0) is the code path's); "strict" also reports the zero signs;
* the packed 16-bit path (ASM) against the plain Triton path of the same kernel, bit for bit;
* act_quant(x, fp8_values=True) timed against buf.copy_(x) with CUDA-graph replays
  (bench/kernels.py's time_graph).
Extra rows (information): num_warps=4 at 4096 x 8192, hadamard=True at 4096 x 8192, fp16 and
fp32 x at 4096 x 8192 (exactness only for these dtypes, plus timing).
"""
from __future__ import annotations

import os
import sys
import time

DRY = "--dry" in sys.argv  # the same code on the CPU through Triton's interpreter, small shapes, fake timings
os.environ["TRITON_INTERPRET"] = "1" if DRY else "0"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import torch  # noqa: E402

SHAPES = [(4096, 8192), (2048, 4096), (1, 8192), (16, 8192)]


def _neighbours(v, steps):
    if v.is_cuda:
        try:
            torch.nextafter(v[:1], v[:1])
        except RuntimeError:  # no CUDA kernel for this dtype: on the CPU
            return [u.to(v.device) for u in _neighbours(v.cpu(), steps)]
    inf = torch.full_like(v, float("inf"))
    out, up, down = [v], v, v
    for _ in range(steps):
        up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
        out += [up, down]
    return out


def plant_ties(x, eff, gen, frac=0.3):
    """x [M, K] with, in every group of effective scale eff > 0, about ``frac`` of its elements
    (never the group's max or min, only values between them: the scales stay) replaced by the
    values of x's format nearest T * e (T = 1/2, -1/2, -3/2) or up to two steps away."""
    m, k = x.shape
    xf = x.float().view(m, k // 16, 16)
    cands = []
    for t in (0.5, -0.5, -1.5):
        cands += _neighbours((eff * t).to(x.dtype), 2)
    cands = torch.stack(cands, -1).float()
    pick = cands.gather(-1, torch.randint(0, cands.shape[-1], xf.shape, generator=gen, device=x.device))
    pos = torch.arange(16, device=x.device)
    extreme = (pos == xf.argmax(-1, keepdim=True)) | (pos == xf.argmin(-1, keepdim=True))
    ok = ((pick <= xf.amax(-1, keepdim=True)) & (pick >= xf.amin(-1, keepdim=True)) & ~extreme
          & (torch.rand(xf.shape, generator=gen, device=x.device) < frac) & (eff[..., None] > 0))
    return torch.where(ok, pick, xf).view(m, k).to(x.dtype)


def realistic(m, k, dtype, seed, dev="cuda"):
    from lowbit import ops as lowbit_ops

    gen = torch.Generator(device=dev).manual_seed(seed)
    spread = torch.logspace(-3, 1.5, k, device=dev)[torch.randperm(k, generator=gen, device=dev)]
    x = torch.randn(m, k, generator=gen, device=dev) * spread
    p = torch.randint(-12, 8 if dtype == torch.float16 else 12, (m,), generator=gen, device=dev).float()
    nice = torch.arange(m, device=dev) % 3 == 2   # global 2^p: 224 2^p * fl(1/224) rounds to 2^p
    scaled = x / x.abs().amax(-1, keepdim=True).clamp(min=1e-30) * 200 * torch.exp2(p)[:, None]
    x = torch.where(nice[:, None], scaled, x)
    x[:, 5] = torch.where(nice, 224 * torch.exp2(p), x[:, 5])
    # groups with subnormal E4M3 scales (and codes -2: the doubled subnormal codes)
    x[1::5, 64:96] = (torch.linspace(-2, 1, 32, device=dev) * x[1::5].abs().amax(-1, keepdim=True)
                      * torch.tensor([2.0 ** -14, 2.0 ** -17], device=dev).repeat_interleave(16))
    x[6::7] = 0                                   # zero rows
    x[1::5, 32:64] = 0                            # zero groups
    if m >= 16:
        x[3] = x[3] / x[3].abs().max() * 1e-38     # a tiny row (global below 2^-90: the scaled path)
    x = x.to(dtype)
    _, sc, gs = lowbit_ops.quantize_act._init_fn(x, 2, "int", 16, "e4m3")
    return plant_ties(x, sc.float() * gs, gen)


def compare(got, ref, fp8):
    """(exact, strict): codes or E4M3 values and globals equal, scales equal up to zero signs
    (exact) and with them (strict)."""
    codes, sc, gs = ref
    m = codes.shape[0]
    if fp8:
        vals = (codes.float().view(m, -1, 16) * sc.float().unsqueeze(-1)).view(m, -1)
        ok = torch.equal(got[0].float(), vals)
        ok = ok and not bool((got[0].view(torch.uint8)[codes == 0] != 0).any())  # q = 0 is the byte 0
    else:
        ok = torch.equal(got[0], codes)
    a, b = got[1].view(torch.uint8), sc.view(torch.uint8)
    ok = ok and torch.equal(a & 0x7F, b & 0x7F) and torch.equal(got[2], gs)
    return ok, ok and torch.equal(a, b)


def main():
    if not torch.cuda.is_available() and not DRY:
        print("needs a CUDA GPU (this only imported; --dry rehearses it on the CPU)")
        return 0
    import triton

    dev, shapes, big = "cuda", SHAPES, (4096, 8192)
    if DRY:
        dev, shapes, big = "cpu", [(48, 256), (24, 128), (1, 256), (16, 256)], (48, 256)

        def time_graph(fn, nsets, calls, replays):
            fn(0)
            return 1.0
    else:
        from kernels import time_graph
    from lowbit import ops as lowbit_ops
    from lowbit.codegen.triton import w2a2 as k2

    t0 = time.time()
    name = "cpu (dry)" if DRY else torch.cuda.get_device_name()
    print(f"{name}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    rows, all_ok = [], True

    def check(x, label, asm_check=True, **kw):
        nonlocal all_ok
        ref = lowbit_ops.quantize_act._init_fn(x, 2, "int", 16, "e4m3")
        res = []
        for fp8 in (False, True):
            got = k2.act_quant(x, fp8_values=fp8, **kw)
            ok, strict = compare(got, ref, fp8)
            res.append((ok, strict))
            if asm_check and k2._packed16(x):  # the packed PTX path against the plain Triton one
                saved = k2._packed16
                k2._packed16 = lambda t: False
                try:
                    plain = k2.act_quant(x, fp8_values=fp8, **kw)
                finally:
                    k2._packed16 = saved
                same = all(torch.equal(u.view(torch.uint8) if u.dtype == torch.float8_e4m3fn else u,
                                       v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v)
                           for u, v in zip(got, plain))
                res.append((same, same))
        ok = all(r[0] for r in res)
        all_ok &= ok
        e = (ref[1].float() * ref[2]).repeat_interleave(16, 1)
        ties = sum(int(((x.float() == t * e) & (e > 0)).sum()) for t in (0.5, -0.5, -1.5))
        return ok, all(r[1] for r in res), ties

    def timing(x, m, **kw):
        calls, replays = (16, 20) if m >= 1024 else (200, 20)
        buf = torch.empty_like(x)
        t_copy = time_graph(lambda i: buf.copy_(x), 1, calls, replays)
        t_pro = time_graph(lambda i: k2.act_quant(x, fp8_values=True, **kw), 1, calls, replays)
        return t_pro, t_copy

    def row(label, x, m, k, check_kw=None, **kw):
        ok, strict, ties = check(x, label, **(check_kw or {}), **kw)
        t_pro, t_copy = timing(x, m, **kw)
        gbs = (x.numel() * x.element_size() + m * k + m * k // 16 + 4 * m) / t_pro / 1e3
        rows.append((label, t_pro, t_copy, ok))
        print(f"{label:34s} {t_pro:9.1f} {t_copy:9.1f} {t_pro / t_copy:7.2f}  {'yes' if ok else 'NO':5s} "
              f"{'yes' if strict else 'no':6s} {ties:8d} {gbs:8.0f}  ({time.time() - t0:.0f} s)", flush=True)

    print(f"{'shape (bf16 unless said)':34s} {'prologue':>9s} {'copy':>9s} {'ratio':>7s}  {'exact':5s} "
          f"{'strict':6s} {'ties':>8s} {'GB/s':>8s}", flush=True)
    print(f"{'':34s} {'us':>9s} {'us':>9s}", flush=True)
    for m, k in shapes:
        x = realistic(m, k, torch.bfloat16, seed=m + k, dev=dev)
        row(f"{m} x {k}", x, m, k, check_kw=dict(asm_check=k == big[1]))  # (one compile of each path)
    m, k = big
    x = realistic(m, k, torch.bfloat16, seed=1, dev=dev)
    row(f"{m} x {k} num_warps=4", x, m, k, check_kw=dict(asm_check=False), num_warps=4)
    for dt in (torch.float16, torch.float32):
        row(f"{m} x {k} {str(dt).split('.')[-1]}", realistic(m, k, dt, seed=2, dev=dev), m, k)
    # hadamard=True: the reference is quantize_act(hadamard(x)); timing for information
    ref = lowbit_ops.quantize_act._init_fn(torch.ops.lowbit.hadamard(x), 2, "int", 16, "e4m3")
    ok_h = all(compare(k2.act_quant(x, fp8_values=fp8, hadamard=True), ref, fp8)[0] for fp8 in (False, True))
    all_ok &= ok_h
    t_pro, t_copy = timing(x, m, hadamard=True)
    print(f"{f'{m} x {k} hadamard=True':34s} {t_pro:9.1f} {t_copy:9.1f} {t_pro / t_copy:7.2f}  "
          f"{'yes' if ok_h else 'NO':5s}  (information)", flush=True)
    print(f"all exact: {all_ok}   ({time.time() - t0:.0f} s)", flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
