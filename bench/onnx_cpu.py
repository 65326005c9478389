"""ONNX on CPU: lowbit exports of SmolLM2-135M vs the fp32 export and onnxruntime's 4-bit quantizer.

    python bench/onnx_cpu.py --out /tmp/lowbit_onnx_bench --threads 2

Variants (all run by ``lowbit.runtime.Session``, the same decoding loop and session options):

* ``fp32``:   the float model exported by ``lowbit.export_onnx`` (no lowbit ops);
* ``ort4``:   ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` with
              its defaults (4 bits, block 128, asymmetric) applied to the fp32 export;
* ``w4a16``:  ``lowbit.compile_quantized(model, "w4a16")`` exported (MatMulNBits 4-bit);
* ``w2a16``:  ``lowbit.compile_quantized(model, "w2a16")`` exported: 2-bit codes and E4M3
              scales in the file, widened to 4-bit MatMulNBits operands with fp32 scales
              when onnxruntime loads it (weight kernel "nbits4", the default);
* ``w2a16-fp16s``: the same with fp16 weight scales instead of E4M3;
* ``w2a16-h4``: w2a16 plus the classifier (which the presets leave in float) at W4A16
              (``recipe.with_override("lm_head", "w4a16")``, ``--override lm_head=w4a16``
              on the CLI), as onnxruntime's quantizer also quantizes the classifier;
* ``w2a16-nbits`` / ``w2a16-dq``: w2a16 with MatMulNBits at 2 bits / standard ops (not in
              the default set: the single-product comparison ``--kernels`` covers them);
* ``*-int8``: a copy with MatMulNBits ``accuracy_level=4`` (onnxruntime quantizes
              activations to int8 inside the product: faster, not exact), which is what
              ``export_onnx(..., accuracy_level=4)`` writes.

Each variant is measured in a fresh process (``--measure DIR``): file size, session load
time, resident memory after loading (RSS, and the peak), prefill latency for a prompt of
``--prompt-len`` tokens and the per-token decode latency over ``--decode`` tokens (median).
Rounds interleave the variants so that load on the machine affects all of them alike; the
tables report medians over rounds and ratios to fp32 taken from the same rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("fp32", "ort4", "w4a16", "w2a16", "w2a16-fp16s", "w2a16-h4", "w2a16-nbits", "w2a16-dq",
            "w2a16-int8", "w2a16-h4-int8", "ort4-int8")
#: measured by default (the 2-bit kernels "nbits" and "dq" are compared on single products: --kernels;
#: "w2a16-fp16s" differs from w2a16 in file size only: both give MatMulNBits fp32 scales at load)
DEFAULT_VARIANTS = ("fp32", "ort4", "w4a16", "w2a16", "w2a16-h4", "w2a16-int8", "w2a16-h4-int8", "ort4-int8")


# -- measuring (child process: no torch) -----------------------------------------------

def _vm_hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss would include the parent's
    peak, which Linux carries across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _perplexity(session, text_file: str, windows: int, window: int) -> float:
    """exp(mean next-token loss) over the first ``windows`` windows of ``window`` tokens."""
    import numpy as np

    text = Path(text_file).read_text()[: 40 * window * windows]
    ids = session.tokenizer.encode(text, add_special_tokens=False).ids
    nll, count = 0.0, 0
    for w in range(windows):
        chunk = np.asarray(ids[w * window:(w + 1) * window], np.int64)[None]
        logits, _ = session.forward(chunk)
        z = logits[0, :-1].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll -= logp[np.arange(chunk.shape[1] - 1), chunk[0, 1:]].sum()
        count += chunk.shape[1] - 1
    return float(np.exp(nll / count))


def measure(directory: str, threads: int, prompt_len: int, decode: int, repeats: int,
            text_file: str | None = None, ppl_windows: int = 4, ppl_window: int = 256) -> dict:
    import numpy as np
    import onnxruntime  # noqa: F401  (library code is not counted in the session's memory)
    import psutil

    from lowbit.runtime.session import Session

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    s = Session(directory, threads=threads, verify=False)
    load = time.perf_counter() - t0
    rss_loaded = proc.memory_info().rss
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, s.vocab_size - 100, size=prompt_len).tolist()
    prefill, per_token = [], []
    for _ in range(repeats):
        stats: dict = {}
        for _tok in s.generate_ids(prompt, max_new_tokens=decode + 1, stop_at_eos=False, stats=stats):
            pass
        prefill.append(stats["prefill_seconds"])
        per_token.append(statistics.median(stats["decode_seconds"]))
    files = sum(p.stat().st_size for p in Path(directory).iterdir() if p.name.startswith("model.onnx"))
    ppl = _perplexity(s, text_file, ppl_windows, ppl_window) if text_file else float("nan")
    return {
        "perplexity": ppl,
        "file_bytes": files,
        "bits_per_weight": (s.manifest.get("bits_per_weight") or {}).get("quantized_sites_bits_per_weight"),
        "load_seconds": load,
        "rss_mb": (rss_loaded - rss0) / 2**20,
        "rss_after_mb": proc.memory_info().rss / 2**20,
        "peak_rss_mb": _vm_hwm_mb(),
        "prefill_ms": 1e3 * min(prefill),
        "decode_ms": 1e3 * min(per_token),
    }


# -- weight kernels: one matrix product, four ways ------------------------------------------

KERNEL_SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))  # SmolLM2's (K, N)


def _kernel_models(k: int, n: int, rng):
    """The same 2-bit weight (codes in [-2, 1], E4M3-like block scales of 16) as ONNX graphs."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    q = rng.integers(-2, 2, size=(n, k))
    s = (2.0 ** rng.integers(-8, -4, size=(n, k // 16))).astype(np.float32)
    w = (q * np.repeat(s, 16, axis=1)).astype(np.float32)  # [N, K]
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])

    def model(nodes, inits, opset=23):
        g = helper.make_graph(nodes, "g", [a], [y], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
                                 ir_version=11 if opset <= 23 else 13)

    def pack(codes, bits):  # unsigned codes, lowest index in the lowest bits, along K
        per = 8 // bits
        u = codes.reshape(n, k // per, per).astype(np.uint16)
        out = np.zeros((n, k // per), np.uint16)
        for i in range(per):
            out |= u[..., i] << (bits * i)
        return out.astype(np.uint8).reshape(n, k // 16, 16 * bits // 8)

    def nbits(bits, level=0):
        b = pack(q + (1 << (bits - 1)), bits)
        node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=16, accuracy_level=level)
        return model([node], [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S")])

    qt = helper.make_tensor("Q", TensorProto.INT2, [k, n], q.T.flatten().tolist())
    dq = model([helper.make_node("DequantizeLinear", ["Q", "S"], ["W"], axis=0, block_size=16),
                helper.make_node("MatMul", ["A", "W"], ["Y"])],
               [qt, numpy_helper.from_array(np.ascontiguousarray(s.T), "S")], opset=25)
    fp32 = model([helper.make_node("MatMul", ["A", "W"], ["Y"])], [numpy_helper.from_array(np.ascontiguousarray(w.T), "W")])
    return w, {"fp32 MatMul": fp32, "MatMulNBits 4-bit": nbits(4), "MatMulNBits 2-bit": nbits(2),
               "INT2 DequantizeLinear + MatMul": dq, "MatMulNBits 4-bit, accuracy_level 4": nbits(4, 4),
               "MatMulNBits 2-bit, accuracy_level 4": nbits(2, 4)}


def kernel_bench(threads: int, iters: int = 200) -> list[dict]:
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    rows = []
    for k, n in KERNEL_SHAPES:
        w, models = _kernel_models(k, n, rng)
        for name, m in models.items():
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            row = {"K": k, "N": n, "kernel": name}
            for mm in (1, 128):
                x = rng.standard_normal((mm, k)).astype(np.float32)
                out = sess.run(None, {"A": x})[0]
                ref = x.astype(np.float64) @ w.T.astype(np.float64)
                row[f"rel_err_m{mm}"] = float(np.abs(out - ref).max() / np.abs(ref).max())
                reps = iters if mm == 1 else max(iters // 10, 5)
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        sess.run(None, {"A": x})
                    times.append((time.perf_counter() - t0) / reps)
                row[f"us_m{mm}"] = 1e6 * min(times)
            rows.append(row)
            print(row, file=sys.stderr)
    return rows


# -- exporting (parent process) ----------------------------------------------------------

def _write_peer_manifest(src: Path, dst: Path) -> None:
    from lowbit.runtime import manifest as mf

    man = json.loads((src / mf.MANIFEST_FILE).read_text())
    files = [p.name for p in dst.iterdir() if p.name.startswith("model.onnx")]
    man["files"] = {name: mf.file_entry(dst / name) for name in files}
    man["recipe"] = {"name": "onnxruntime MatMulNBitsQuantizer (4 bits, defaults)"}
    man["onnx"]["external_data"] = len(files) > 1
    (dst / mf.MANIFEST_FILE).write_text(json.dumps(man, indent=1))


def _with_accuracy_level(src: Path, dst: Path, level: int) -> None:
    """Copy an export, setting every MatMulNBits' accuracy_level (and the session option)."""
    import onnx

    from lowbit.runtime import manifest as mf

    dst.mkdir(parents=True)
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a for a in node.attribute}
            if "accuracy_level" in attrs:
                attrs["accuracy_level"].i = level
            else:
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    onnx.save(model, str(dst / "model.onnx"))
    for p in src.iterdir():
        if p.name not in ("model.onnx", mf.MANIFEST_FILE):
            shutil.copy(p, dst / p.name)
    man = json.loads((src / mf.MANIFEST_FILE).read_text())
    man["onnx"]["accuracy_level"] = level
    man["session_options"]["session.qdq_matmulnbits_accuracy_level"] = str(level)
    man["files"] = {name: mf.file_entry(dst / name) for name in man["files"]}
    (dst / mf.MANIFEST_FILE).write_text(json.dumps(man, indent=1))


def _logits_error(model, directory: Path, ids) -> float:
    """max |ONNX - PyTorch| / max |PyTorch| of the logits of one sequence."""
    import numpy as np
    import torch

    from lowbit.runtime import Session

    with torch.no_grad():
        ref = model(ids[None], use_cache=False).logits.numpy()
    got, _ = Session(directory, verify=False).forward(ids[None].numpy())
    return float(np.abs(got - ref).max() / np.abs(ref).max())


#: lowbit exports of SmolLM2: name -> (recipe, export options, weight scale dtype, head recipe)
LOWBIT_VARIANTS = {
    "w4a16": ("w4a16", {}, "e4m3", None),
    "w2a16": ("w2a16", {}, "e4m3", None),
    "w2a16-fp16s": ("w2a16", {}, "fp16", None),
    "w2a16-h4": ("w2a16", {}, "e4m3", "w4a16"),
    "w2a16-nbits": ("w2a16", {"weight_kernel": "nbits"}, "e4m3", None),
    "w2a16-dq": ("w2a16", {"weight_kernel": "dq"}, "e4m3", None),
}
#: copies of an export with MatMulNBits at accuracy_level 4: name -> source
INT8_VARIANTS = {"w2a16-int8": "w2a16", "w2a16-h4-int8": "w2a16-h4", "ort4-int8": "ort4"}


def _compile(model, calib, recipe_name: str, scale_dtype: str, head: str | None, cache: Path | None = None):
    """lowbit.compile_quantized with the preset ``recipe_name`` (weight scales stored as
    ``scale_dtype``); ``head``: a preset for the classifier, which the presets leave in
    float (a recipe override). ``cache``: a folder where the compiled model is kept
    (``lowbit.save``) and reused."""
    from dataclasses import replace

    import lowbit

    recipe = lowbit.get_recipe(recipe_name)
    if scale_dtype != recipe.weight.scale_dtype:
        recipe = replace(recipe, name=f"{recipe.name}-{scale_dtype}-scales",
                         weight=replace(recipe.weight, scale_dtype=scale_dtype))
    if head:
        recipe = replace(recipe.with_override("lm_head", head), name=f"{recipe.name}+{head}-head")
    saved = cache / recipe.name if cache is not None else None
    if saved is not None and (saved / "manifest.json").is_file():
        return lowbit.load(saved)
    qmodel = lowbit.compile_quantized(model, recipe, calibration=calib, progress=False)
    if saved is not None:
        lowbit.save(qmodel, saved)
    return qmodel


def export_all(out: Path, variants, calib_len: int, reuse: bool) -> dict:
    """Export the variants missing from ``out`` (all of them unless ``reuse``)."""
    import torch

    from lowbit.codegen.onnx import export_onnx

    timings = {}
    todo = [v for v in variants if not (reuse and (out / v / "manifest.json").is_file())]
    need = set(todo) | {INT8_VARIANTS[v] for v in todo if v in INT8_VARIANTS and
                        not (out / INT8_VARIANTS[v] / "manifest.json").is_file()}
    if "ort4" in need and not (out / "fp32" / "manifest.json").is_file():
        need.add("fp32")
    heavy = [v for v in VARIANTS if v in need and v not in INT8_VARIANTS and v != "ort4"]
    if heavy:
        from lowbit.models import load_model

        model, tokenizer = load_model("smollm2")
        g = torch.Generator().manual_seed(0)
        calib = torch.randint(0, model.config.vocab_size, (4, calib_len), generator=g)
    compiled: dict = {}
    for v in heavy:
        d = out / v
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        if v == "fp32":
            export_onnx(model, d, tokenizer=tokenizer)
            timings["fp32_export_s"] = time.perf_counter() - t0
            timings["fp32_logits_rel_err_vs_pytorch"] = _logits_error(model, d, calib[0, :64])
            continue
        recipe, options, scales, head = LOWBIT_VARIANTS[v]
        key = (recipe, scales, head)
        if key not in compiled:
            compiled = {key: _compile(model, calib, recipe, scales, head, out / "compiled")}  # keep one
            timings[f"{v}_compile_s"] = time.perf_counter() - t0
        qmodel = compiled[key]
        t1 = time.perf_counter()
        export_onnx(qmodel, d, tokenizer=tokenizer, **options)
        timings[f"{v}_export_s"] = time.perf_counter() - t1
        timings[f"{v}_logits_rel_err_vs_pytorch"] = _logits_error(qmodel, d, calib[0, :64])
        timings[f"{v}_bits_per_weight"] = json.loads((d / "manifest.json").read_text())["bits_per_weight"]
    if "ort4" in need:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        d = out / "ort4"
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        q = MatMulNBitsQuantizer(onnx.load(str(out / "fp32" / "model.onnx")), bits=4)
        q.process()
        d.mkdir(parents=True)
        q.model.save_model_to_file(str(d / "model.onnx"), use_external_data_format=True)
        shutil.copy(out / "fp32" / "tokenizer.json", d / "tokenizer.json")
        _write_peer_manifest(out / "fp32", d)
        timings["ort4_quantize_s"] = time.perf_counter() - t0
    for v in todo:
        if v in INT8_VARIANTS:
            shutil.rmtree(out / v, ignore_errors=True)
            _with_accuracy_level(out / INT8_VARIANTS[v], out / v, 4)
    return timings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/lowbit_onnx_bench")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {VARIANTS}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="generations per measurement process")
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurement processes per variant")
    p.add_argument("--calib-len", type=int, default=128)
    p.add_argument("--reuse", action="store_true", help="keep exports already in --out")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--text", default=None, help="text for perplexity (default: WikiText-2 test from the shared data)")
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--ppl-window", type=int, default=256)
    p.add_argument("--kernels", action="store_true", help="only compare the weight kernels on SmolLM2's shapes")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.kernels:
        rows = kernel_bench(args.threads)
        print("| K x N | kernel | M=1 us | M=128 us | rel. error |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['K']}x{r['N']} | {r['kernel']} | {r['us_m1']:.0f} | {r['us_m128']:.0f} | {r['rel_err_m1']:.1e} |")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    if args.measure:
        print(json.dumps(measure(args.measure, args.threads, args.prompt_len, args.decode, args.repeats,
                                 args.text, args.ppl_windows, args.ppl_window)))
        return 0
    out = Path(args.out)
    variants = [v for v in args.variants.split(",") if v]
    if args.text is None:
        from lowbit.llama2c import shared_data_dir

        data = shared_data_dir()
        wiki = data / "text" / "wikitext2_raw_test.txt" if data else None
        args.text = str(wiki) if wiki and wiki.is_file() else None
    timings = export_all(out, variants, args.calib_len, args.reuse)
    rounds: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            cmd = [sys.executable, __file__, "--measure", str(out / v), "--threads", str(args.threads),
                   "--prompt-len", str(args.prompt_len), "--decode", str(args.decode), "--repeats", str(args.repeats)]
            if args.text and r == 0:
                cmd += ["--text", args.text, "--ppl-windows", str(args.ppl_windows), "--ppl-window", str(args.ppl_window)]
            load = os.getloadavg()[0]  # other work on the machine (the variants share it alike, interleaved)
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"measuring {v} failed")
            rounds[v].append({**json.loads(res.stdout.strip().splitlines()[-1]), "loadavg": load})
            print(v, rounds[v][-1], file=sys.stderr)
    summary = {}
    for v in variants:
        med = {k: statistics.median(m[k] for m in rounds[v]) for k in rounds[v][0]
               if k not in ("perplexity", "bits_per_weight")}
        med["perplexity"] = rounds[v][0]["perplexity"]
        med["bits_per_weight"] = rounds[v][0]["bits_per_weight"]
        for base in ("fp32", "ort4"):
            if base in rounds:
                for key in ("decode_ms", "prefill_ms"):
                    med[f"{key}_vs_{base}"] = statistics.median(
                        m[key] / f[key] for m, f in zip(rounds[v], rounds[base]))
        summary[v] = med
    loads = [m["loadavg"] for r in rounds.values() for m in r]
    print(f"load average (1 min) during the measurements: median {statistics.median(loads):.1f}, "
          f"range {min(loads):.1f}-{max(loads):.1f}")
    print("| variant | bits/weight (quantized sites) | file MiB | load s | RSS MiB | peak RSS MiB | prefill ms | "
          "decode ms/token | decode vs fp32 | decode vs ort4 | perplexity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for v, m in summary.items():
        bpw = f"{m['bits_per_weight']:.2f}" if m["bits_per_weight"] else "-"
        print(f"| {v} | {bpw} | {m['file_bytes'] / 2**20:.1f} | {m['load_seconds']:.2f} | {m['rss_mb']:.0f} | "
              f"{m['peak_rss_mb']:.0f} | {m['prefill_ms']:.0f} | {m['decode_ms']:.1f} | "
              f"{m.get('decode_ms_vs_fp32', float('nan')):.2f} | {m.get('decode_ms_vs_ort4', float('nan')):.2f} | "
              f"{m['perplexity']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rounds": rounds, "timings": timings,
                                               "args": vars(args)}, indent=1))
    print(json.dumps(timings, default=str), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
