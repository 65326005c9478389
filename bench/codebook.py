"""Binary codebook (``btc``) vs plain binarization: perplexity and bits per weight (CPU, reference ops).

    python bench/codebook.py                                   # both models, default configs
    python bench/codebook.py --model smollm2 --configs btc,bin-g16,bin-g128
    python bench/codebook.py --model stories260k --configs btc-v8c4g0,bin-g16

Configs (comma-separated; a "rotate+" prefix runs lowbit's rotation passes first):

* ``btc``: ``CodebookPass`` with the ``btc`` preset options
  (``lowbit.passes.codebook.BTC_OPTIONS``, learned channel scaling on; ``btc-nols``: off);
* ``btc-v{v}c{c}g{G}`` with an optional suffix ``-ham`` / ``-act``: vector length v,
  index bits c, scale group G (0: per row), k-means weighting (default magnitude);
* a suffix ``-ls`` learns the channel scaling of ``CodebookPass(scaling=True)`` (folded
  into the norms, prologues elsewhere), ``-lsn`` only where a norm takes it, ``-nols``
  turns it off;
* ``bin-g{G}``: plain binarization ``sign(W) * a`` with the least-squares group scale
  ``a = mean |w|`` over groups of G, on the 1-bit half grid (``QFormat(1, "half", G,
  "e4m3")``) through ``QuantizePass`` with ``lowbit.codebook.binarize_weight`` as its
  weight quantizer; ``bin-g{G}-rtn``: the same format with QuantizePass's own RTN and
  clipping search.

Protocols: SmolLM2-135M-Instruct on the first 200,000 characters of WikiText-2 raw test,
8 windows x 512; stories260K on ``tinystories_val_head.txt`` with blank lines squeezed,
40 windows x 512. Calibration (per-site errors, activation weighting, learned scaling): 4 x 256
seeded random tokens (``--calib generate``: 4 x 256 tokens sampled from the model
itself), never the evaluation text. The classifier head stays in float (the
recipes' default ``ignore``); bits per weight are over the replaced sites.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path

import torch

from lowbit.api import materialize, normalize_calibration
from lowbit.capture import capture
from lowbit.codebook import binarize_weight
from lowbit.eval import perplexity
from lowbit.formats import QFormat
from lowbit.llama2c import Llama2cTokenizer, load_llama2c, shared_data_dir
from lowbit.models import load_model
from lowbit.pass_manager import CompileContext, CompileReport, run_passes
from lowbit.passes import registry
from lowbit.passes.codebook import BTC_OPTIONS, CodebookPass
from lowbit.passes.quantize import QuantizePass
from lowbit.recipes import DEFAULT_IGNORE

PROTOCOLS = {
    "smollm2": dict(text="text/wikitext2_raw_test.txt", chars=200_000, windows=8, squeeze=False),
    "stories260k": dict(text="text/tinystories_val_head.txt", chars=None, windows=40, squeeze=True),
}
DEFAULT_CONFIGS = "btc,btc-v16c10g0,btc-v8c4g0,bin-g16,bin-g64,bin-g128"


def load(name: str):
    if name == "stories260k":
        d = shared_data_dir()
        return load_llama2c(d / "stories260K" / "stories260K.bin"), Llama2cTokenizer(d / "stories260K" / "tok512.bin")
    return load_model(name)


def build_passes(config: str, context: CompileContext) -> list:
    passes = []
    if config.startswith("rotate+"):
        passes.append(registry.make({"name": "rotate"}, context))
        config = config[len("rotate+"):]
    scaling = {}
    m = re.fullmatch(r"(.*?)(-ls|-lsn|-nols)", config)
    if m:
        config = m.group(1)
        scaling = {"-ls": {"scaling": True}, "-lsn": {"scaling": True, "scaling_prologue": False},
                   "-nols": {"scaling": False}}[m.group(2)]
    if config == "btc":
        passes.append(CodebookPass(context=context, ignore=DEFAULT_IGNORE, **{**BTC_OPTIONS, **scaling}))
        return passes
    m = re.fullmatch(r"btc-v(\d+)c(\d+)g(\d+)(-ham|-act)?", config)
    if m:
        weighting = {None: "magnitude", "-ham": "hamming", "-act": "activation"}[m.group(4)]
        passes.append(CodebookPass(int(m.group(1)), int(m.group(2)), int(m.group(3)), "e4m3", weighting,
                                   ignore=DEFAULT_IGNORE, context=context, **scaling))
        return passes
    m = re.fullmatch(r"bin-g(\d+)(-rtn)?", config)
    if m:
        fmt = QFormat(1, "half", int(m.group(1)), "e4m3")
        quantizer = None if m.group(2) else (lambda site, w, x: binarize_weight(w, fmt))
        passes.append(QuantizePass(fmt, None, ignore=DEFAULT_IGNORE, weight_quantizer=quantizer, context=context))
        return passes
    raise ValueError(f"unknown config {config!r}")


def compile_config(model, config: str, calib: list[tuple]):
    model = copy.deepcopy(model).eval()
    report = CompileReport(meta={"config": config})
    context = CompileContext(report=report, calibration=calib, progress=False)
    with torch.no_grad():
        gm = capture(model, calib[0]).graph_module
        gm = run_passes(gm, build_passes(config, context), report)
    q = materialize(model, gm)
    q.lowbit_report = report
    return q


def run_model(name: str, configs: list[str], no_float: bool, calib_kind: str = "random") -> list[dict]:
    proto = PROTOCOLS[name]
    model, tok = load(name)
    text = (shared_data_dir() / proto["text"]).read_text()
    if proto["chars"]:
        text = text[: proto["chars"]]
    if calib_kind == "random":
        calib = torch.randint(0, model.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
    else:   # data-free: sequences sampled from the model itself
        from lowbit.calibration import from_generations

        calib = from_generations(model, 4, 256, seed=0, progress=False)
    calib = normalize_calibration(calib)
    rows = []

    def record(label, m, extra):
        t0 = time.perf_counter()
        res = perplexity(m, tok, text, windows=proto["windows"], window_len=512, progress=False,
                         squeeze_blank_lines=proto["squeeze"])
        row = {"model": name, "config": label, "calib": calib_kind, "perplexity": res["perplexity"], "eval_s": time.perf_counter() - t0,
               **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    if not no_float:
        record("float", model, {"bits_per_weight": 32.0, "mean_rel_error": 0.0})
    for config in configs:
        t0 = time.perf_counter()
        q = compile_config(model, config, calib)
        rep = q.lowbit_report
        errs = [s["rel_error"] for s in rep.sites.values() if "rel_error" in s]
        fmt = next(iter(rep.sites.values()))["format"]
        record(config, q, {"format": fmt, "bits_per_weight": rep.mean_bits_per_weight(),
                           "mean_rel_error": sum(errs) / len(errs), "compile_s": time.perf_counter() - t0})
        del q
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2,stories260k", help="comma-separated: smollm2, stories260k")
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--no-float", action="store_true")
    p.add_argument("--calib", default="random", choices=["random", "generate"],
                   help="calibration: 4 x 256 seeded random tokens, or 4 x 256 tokens sampled from the model")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name in args.model.split(","):
        rows += run_model(name, [c for c in args.configs.split(",") if c], args.no_float, args.calib)
    print()
    print("| model | config | calibration | format | bits/weight (replaced sites) | mean site rel. error | perplexity |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['config']} | {r['calib']} | {r.get('format', 'fp32')} | {r['bits_per_weight']:.3f} | "
              f"{r['mean_rel_error']:.3f} | {r['perplexity']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
