"""Where 2-bit activations hurt: perplexity with 8-bit weights everywhere (close to float) and
2-bit activations on one group of sites at a time (CPU, reference backend).

    python bench/a2_sensitivity.py                                   # site groups, rotated and not
    python bench/a2_sensitivity.py --groups gate_up --clips 0.4,0.55,0.7,0.8,1.0 --variants rotate
    python bench/a2_sensitivity.py --groups gate_up --per-layer --variants rotate

The activation format is w2a2-half's (symmetric 2-bit grid, groups of 16, E4M3 scales) with a
fixed clip ratio per run (``--clips``), no calibration: the question is which sites the
network cannot afford to see at 2 bits, before any training. Protocol as bench/perplexity.py
(the first 200,000 characters of WikiText-2 raw test, 8 windows of 512 tokens).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lowbit  # noqa: E402
from lowbit.eval import perplexity  # noqa: E402
from lowbit.formats import QFormat  # noqa: E402
from lowbit.llama2c import shared_data_dir  # noqa: E402
from lowbit.models import load_model  # noqa: E402
from lowbit.recipes import Recipe  # noqa: E402
from perplexity import VARIANT_PASSES  # noqa: E402

SITE_GROUPS = {
    "none": [],
    "qkv": ["q_proj", "k_proj", "v_proj"],
    "o": ["o_proj"],
    "gate_up": ["gate_proj", "up_proj"],
    "down": ["down_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def probe_recipe(variant: str, patterns: list[str], clip: float) -> Recipe:
    """8-bit weights on every site; 2-bit half-grid activations (clip ratio ``clip``) on ``patterns``."""
    w8 = QFormat(8, "int", 16, "e4m3")
    passes = [VARIANT_PASSES[v] for v in variant.split("+") if v != "none"]
    overrides = [{"sites": patterns, "weight": w8, "activation": QFormat(2, "half", 16, "e4m3", clip)}] \
        if patterns else []
    return Recipe(f"w8+a2 {variant}", w8, passes=passes, clip_search=False, overrides=overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--variants", default="rotate,none", help="passes before quantization (bench/perplexity.py)")
    ap.add_argument("--groups", default=",".join(SITE_GROUPS), help=f"site groups ({', '.join(SITE_GROUPS)})")
    ap.add_argument("--clips", default="0.55", help="activation clip ratios, comma-separated")
    ap.add_argument("--per-layer", action="store_true", help="each group one decoder layer at a time")
    ap.add_argument("--text", default=str(shared_data_dir() / "text" / "wikitext2_raw_test.txt"))
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args()

    groups = [g for g in args.groups.split(",") if g]
    unknown = [g for g in groups if g not in SITE_GROUPS]
    if unknown:
        raise SystemExit(f"unknown site groups {unknown}: use {', '.join(SITE_GROUPS)}")
    text = Path(args.text).read_text()[:200_000]
    model, tok = load_model(args.model)
    layers = model.config.num_hidden_layers
    print("| variant | A2 on | layer | clip | perplexity |\n|---|---|---|---:|---:|")
    for variant in args.variants.split(","):
        for group in groups:
            for clip in [float(c) for c in args.clips.split(",")]:
                where = range(layers) if args.per_layer and SITE_GROUPS[group] else [None]
                for layer in where:
                    prefix = "*." if layer is None else f"*.layers.{layer}.*"
                    patterns = [prefix + s for s in SITE_GROUPS[group]]
                    t0 = time.perf_counter()
                    q = lowbit.compile_quantized(model, probe_recipe(variant, patterns, clip), progress=False)
                    ppl = perplexity(q, tok, text, windows=args.windows, progress=False)["perplexity"]
                    print(f"| {variant} | {group} | {'all' if layer is None else layer} | {clip:g} | {ppl:,.2f} |"
                          f"  <!-- {time.perf_counter() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
