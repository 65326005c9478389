"""Perplexity of a model in float and under lowbit recipes (reference backend, CPU).

    python bench/perplexity.py --model smollm2 --recipes w8a8,w4a16,w4a4,w2a16,w2a2
    python bench/perplexity.py --recipes w4a4,w4a16,w2a16 --variants rotate --no-float
    python bench/perplexity.py --recipes w2a16,w2a2 --variants ocs-plain,ocs-ra --no-float

Variants add passes before quantization: "none", "rotate", "rotate-noR1" (R2 and online
Hadamard only), "fold" (norm folding only), "ocs-plain" (outlier channel
splitting by plain halving), "ocs-ra" (rounding-aware splitting), "ocs-act" (activation
splitting), "gptq" (GPTQ weights instead of RTN), "gptq-ao" (GPTQ with act-order), and combinations joined with "+",
e.g. "rotate+ocs-ra" or "rotate+gptq".

Protocol (the project's standard): the first 200,000 characters of WikiText-2 raw test,
8 windows of 512 tokens. Prints a markdown table; --json FILE also writes the rows.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import lowbit
from lowbit.eval import perplexity
from lowbit.llama2c import shared_data_dir
from lowbit.models import load_model


VARIANT_PASSES = {
    "rotate": {"name": "rotate"},
    "rotate-noR1": {"name": "rotate", "r1": False},
    "rotate-noonline": {"name": "rotate", "online": []},  # R1, R2; no online Hadamard before down_proj
    "fold": {"name": "fold_norms"},
    "ocs-plain": {"name": "split_outliers", "rounding_aware": False},
    "ocs-ra": {"name": "split_outliers", "rounding_aware": True},
    "ocs-act": {"name": "split_outliers", "mode": "activation"},
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--recipes", default="w8a8,w4a16,w4a4,w2a16,w2a2")
    p.add_argument("--variants", default="none", help="comma-separated: none, rotate, ocs-plain, ocs-ra, ocs-act, a+b")
    p.add_argument("--text", default=None)
    p.add_argument("--chars", type=int, default=200_000)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window-len", type=int, default=512)
    p.add_argument("--no-float", action="store_true")
    p.add_argument("--calib", default="random",
                   help="random (seeded random tokens), generate (the model's own seeded samples), or a text file")
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--calib-from-char", type=int, default=0,
                   help="with a text file: sample calibration windows only from this character on (with the "
                        "evaluation file, at least --chars, so the evaluated text is never used)")
    p.add_argument("--gptq-rows", type=int, default=None,
                   help="GPTQ: the most calibration rows (tokens) per site Hessian (default 8192)")
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration sampling")
    p.add_argument("--calib-cache", default=None,
                   help="safetensors file: load the calibration ids from it if it exists, else save them there")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is much faster when other processes share the cores)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    text_path = args.text or str(shared_data_dir() / "text" / "wikitext2_raw_test.txt")
    text = Path(text_path).read_text()[: args.chars]
    model, tok = load_model(args.model)
    # calibration (never the evaluation text): seeded random tokens by default, used for the
    # report's per-site errors, the rotation check and activation-split statistics; GPTQ
    # wants real data: --calib generate (data-free) or a text file
    n, length = args.calib_samples, args.calib_len
    if args.calib_cache and Path(args.calib_cache).exists():
        from safetensors.torch import load_file

        calib = load_file(args.calib_cache)["input_ids"]
        print(f"calibration ids {tuple(calib.shape)} from {args.calib_cache}", flush=True)
    elif args.calib == "random":
        calib = torch.randint(0, model.config.vocab_size, (n, length),
                              generator=torch.Generator().manual_seed(args.calib_seed))
    elif args.calib == "generate":
        from lowbit.calibration import from_generations

        t0 = time.perf_counter()
        calib = from_generations(model, n, length, seed=args.calib_seed, progress=False)
        print(f"sampled {n} x {length} calibration tokens in {time.perf_counter() - t0:.0f} s", flush=True)
    else:
        from lowbit.calibration import from_text

        calib_text = Path(args.calib).read_text()
        if Path(args.calib).resolve() == Path(text_path).resolve() and args.calib_from_char < args.chars:
            raise SystemExit(f"--calib is the evaluation file: pass --calib-from-char >= {args.chars} "
                             "so that no evaluated text is used for calibration")
        calib = from_text(tok, calib_text[args.calib_from_char:], n, length, seed=args.calib_seed)
    if args.calib_cache and not Path(args.calib_cache).exists():
        from safetensors.torch import save_file

        save_file({"input_ids": calib.contiguous()}, args.calib_cache)
    rows = []

    def record(label, m, extra=None):
        t0 = time.perf_counter()
        res = perplexity(m, tok, text, windows=args.windows, window_len=args.window_len, progress=False)
        row = {"config": label, "perplexity": res["perplexity"], "eval_s": time.perf_counter() - t0, **(extra or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)

    if not args.no_float:
        record("float", model, {"bits_per_weight": 32.0})
    for name in [r for r in args.recipes.split(",") if r]:
        for variant in args.variants.split(","):
            parts = variant.split("+")
            recipe = lowbit.get_recipe(name).with_passes(*[VARIANT_PASSES[v] for v in parts if v in VARIANT_PASSES])
            gptq_options = {} if args.gptq_rows is None else {"calibration_rows": args.gptq_rows}
            if "gptq" in parts:
                recipe = recipe.with_gptq(**gptq_options)
            elif "gptq-ao" in parts:
                recipe = recipe.with_gptq(act_order=True, **gptq_options)
            t0 = time.perf_counter()
            q = lowbit.compile_quantized(model, recipe, calibration=calib, progress=False)
            compile_s = time.perf_counter() - t0
            rep = q.lowbit_report
            errs = [st["rel_error"] for st in rep.sites.values() if "rel_error" in st]
            record(name + ("" if variant == "none" else f" {variant}"), q, {
                "bits_per_weight": rep.mean_bits_per_weight(), "compile_s": compile_s,
                "mean_site_error": sum(errs) / len(errs) if errs else None,
                "max_site_error": max(errs) if errs else None})
            del q
    print()
    print("| config | bits/weight (quantized sites) | mean site error | perplexity |")
    print("|---|---|---|---|")
    for r in rows:
        err = r.get("mean_site_error")
        print(f"| {r['config']} | {r['bits_per_weight']:.3f} | {'-' if err is None else f'{err:.4f}'} | "
              f"{r['perplexity']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
