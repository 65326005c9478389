"""Quantization-aware training: perplexity after progressive, data-free distillation.

    python bench/qat.py --model smollm2 --recipes w2a16,w2a2 --variants none,rotate+ocs-ra \\
        --init gptq --samples 256 --seq-len 512 --seconds 60
    python bench/qat.py --model stories260k --text ../shared/data/text/tinystories_val_head.txt \\
        --windows 4 --samples 16 --seq-len 64 --block-steps 2 --e2e-steps 4    # CPU smoke run

For each recipe and variant (passes before quantization, as in bench/perplexity.py):
compile in trainable form (``lowbit.prepare_qat``: RTN with clipping search, or GPTQ
with ``--init gptq``), train with ``lowbit.train`` (``--stages``: e.g. ``w4,w3,w2``; block
reconstruction then end-to-end KL on the float model's logits), freeze to packed
QuantLinear sites and measure perplexity with the foundation protocol (first 200,000
characters of WikiText-2 raw test, 8 windows of 512 tokens). The training data are
sequences sampled from the float model itself (``--data generate``, seeded) or windows
of another text file; the evaluation text is never used for training.

``--seconds S`` sets the steps of each run from a timing probe so that training takes
about S seconds (a fraction ``--block-fraction`` in block reconstruction); otherwise
``--block-steps`` and ``--e2e-steps`` are used as given. Rows are printed as JSON lines
as soon as they are measured (and appended to ``--json``), then as a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lowbit  # noqa: E402
from lowbit.eval import perplexity  # noqa: E402
from lowbit.llama2c import shared_data_dir  # noqa: E402
from lowbit.models import load_model  # noqa: E402
from lowbit.qat import freeze, prepare_qat  # noqa: E402
from lowbit.train import GRAPH_WARMUP, Trainer, TrainConfig, block_names, stage_recipe, training_data  # noqa: E402
from perplexity import VARIANT_PASSES  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def probe(trainer: Trainer, steps: int = 10) -> dict:
    """Seconds per end-to-end step, per block step and per block's setup (input collection and
    targets), from short runs of the trainer's own phases on a copy of the model: forward,
    backward, clipping and the optimizer, replayed from CUDA graphs when the config says so."""
    cfg = replace(trainer.config, block_steps=steps, e2e_steps=steps, eval_every=0, checkpoint_every=0)
    model = copy.deepcopy(trainer.model)
    t = Trainer(model, trainer.recipe, cfg, trainer._all_data, progress=False)
    t._budget, t._steps_done = None, 0

    def per_step():  # median gap between steps after the eager warm-up and the graph capture
        gaps = [b - a for a, b in zip(t.step_times[GRAPH_WARMUP + 1:], t.step_times[GRAPH_WARMUP + 2:])]
        return sorted(gaps)[len(gaps) // 2]

    out = {}
    sync()
    t0 = time.perf_counter()
    t.train_e2e(0, 0)
    sync()
    out["e2e_step"] = per_step()
    # the phase's eager warm-up and capture (and, with compile=True, the compilation)
    out["e2e_warmup"] = t.step_times[GRAPH_WARMUP] - t0
    blocks = block_names(model)
    if blocks:
        t.step_times = []
        sync()
        t0 = time.perf_counter()
        t.train_block(blocks[len(blocks) // 2], 0, len(blocks) // 2, 0)
        sync()
        out["block_step"] = per_step()
        out["block_setup"] = time.perf_counter() - t0 - steps * out["block_step"]
    out["blocks"] = len(blocks)
    del t, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _curve(losses, points=20):
    """Mean loss over ``points`` consecutive windows of the steps (for reading a run's course)."""
    if not losses:
        return None
    n = len(losses)
    edges = [round(i * n / points) for i in range(points + 1)]
    return [round(sum(losses[a:b]) / (b - a), 4) for a, b in zip(edges, edges[1:]) if b > a]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--recipes", default="w2a16,w2a2")
    p.add_argument("--variants", default="none", help="comma-separated: none, rotate, ocs-ra, rotate+ocs-ra, ...")
    p.add_argument("--init", default="rtn", choices=["rtn", "gptq"])
    p.add_argument("--stages", default="", help="comma-separated stage formats before the recipe's, e.g. w4,w3")
    p.add_argument("--data", default="generate", help="generate (the float model's own samples) or a text file")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=32, help="rows of the training data used by GPTQ / passes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-steps", type=int, default=50)
    p.add_argument("--e2e-steps", type=int, default=200)
    p.add_argument("--seconds", type=float, default=0.0, help="training seconds per run (sets the steps)")
    p.add_argument("--block-fraction", type=float, default=0.4)
    p.add_argument("--transition", default="nested", choices=["nested", "refit"], help="between stages")
    p.add_argument("--block-samples", type=int, default=64, help="sequences used for block reconstruction")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--scale-lr", type=float, default=2e-3)
    p.add_argument("--norm-lr", type=float, default=0.0, help="train the normalization weights (0: frozen)")
    p.add_argument("--act-clip-lr", type=float, default=0.0, help="train the activation clip ratios (0: fixed)")
    p.add_argument("--warmup", type=float, default=0.0, help="fraction of each phase with a linear LR ramp")
    p.add_argument("--grad-clip", type=float, default=0.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--holdout", type=int, default=0, help="generated sequences kept out of training (held-out KL)")
    p.add_argument("--eval-every", type=int, default=0, help="end-to-end steps between held-out KL evaluations")
    p.add_argument("--keep-last", action="store_true", help="end at the last step instead of the best held-out KL")
    p.add_argument("--compile", action="store_true", help="end-to-end steps through torch.compile")
    p.add_argument("--cuda-graph", action="store_true", help="replay each phase's step as a CUDA graph")
    p.add_argument("--train-variants", default="[{}]",
                   help='JSON list of TrainConfig overrides trained from the same prepared model (one GPTQ '
                        'run), e.g. \'[{}, {"warmup": 0.05, "grad_clip": 1.0}]\'')
    p.add_argument("--text", default=None)
    p.add_argument("--chars", type=int, default=200_000)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window-len", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prepare-device", default="cpu",
                   help="where compile_quantized runs the passes and GPTQ (cpu, or the training device)")
    p.add_argument("--json", default=None)
    p.add_argument("--save-data", default=None,
                   help="write the training token ids to this .safetensors file (reuse: --data FILE)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train_variants = json.loads(args.train_variants)
    if not (isinstance(train_variants, list) and train_variants and all(isinstance(v, dict) for v in train_variants)):
        p.error("--train-variants must be a JSON list of objects, e.g. '[{}]'")

    torch.manual_seed(args.seed)
    text_path = args.text or str(shared_data_dir() / "text" / "wikitext2_raw_test.txt")
    text = Path(text_path).read_text()[: args.chars]
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    model = model.to(dev)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.0f} s on {dev}", flush=True)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))

    def ppl(m):
        return perplexity(m, tok, text, windows=args.windows, window_len=args.window_len, progress=False)["perplexity"]

    t0 = time.perf_counter()
    data = training_data(model, tok, args.data, args.samples, args.seq_len, seed=args.seed,
                         batch_size=args.gen_batch, progress=False)
    gen_s = time.perf_counter() - t0
    if args.save_data:
        from safetensors.torch import save_file

        save_file({"ids": data.contiguous()}, args.save_data)
    emit({"config": "float", "perplexity": ppl(model), "data": args.data, "data_tokens": data.numel(),
          "data_seconds": round(gen_s, 1)})
    calib = data[: args.calib_samples]
    prep_dev = torch.device(args.prepare_device)
    prep_model = copy.deepcopy(model).to(prep_dev)  # the model the passes and GPTQ run on
    steps = None
    for name in [r for r in args.recipes.split(",") if r]:
        base = lowbit.get_recipe(name)
        for variant in args.variants.split(","):
            parts = variant.split("+")
            recipe = base.with_passes(*[VARIANT_PASSES[v] for v in parts if v in VARIANT_PASSES])
            if args.init == "gptq":
                recipe = recipe.with_gptq()
            stages = [s for s in args.stages.split(",") if s] + [f"w{base.weight.bits}"
                                                                 + (f"a{base.activation.bits}" if base.activation else "")]
            cfg = TrainConfig(stages=stages, block_steps=args.block_steps, e2e_steps=args.e2e_steps,
                              batch_size=args.batch_size, lr=args.lr, scale_lr=args.scale_lr, seed=args.seed,
                              block_samples=args.block_samples, transition=args.transition,
                              warmup=args.warmup, grad_clip=args.grad_clip, holdout=args.holdout,
                              eval_every=args.eval_every, keep_best=not args.keep_last, compile=args.compile,
                              cuda_graph=args.cuda_graph, norm_lr=args.norm_lr,
                              act_clip_lr=args.act_clip_lr)
            label = name + ("" if variant == "none" else f" {variant}") + f" ({args.init}"
            label += (", " + "->".join(stages) + ")") if len(stages) > 1 else ")"
            sync()
            t0 = time.perf_counter()
            student = prepare_qat(prep_model, stage_recipe(recipe, stages[0]), calibration=calib,
                                  progress=False).to(dev)
            sync()
            prep_s = time.perf_counter() - t0
            init_ppl = ppl(student) if len(stages) == 1 else None
            for vi, tv in enumerate(train_variants):
                # each training variant starts from its own copy of the same prepared model
                stud = student if vi == len(train_variants) - 1 else copy.deepcopy(student)
                vcfg = replace(cfg, **tv)
                vlabel = label + ("" if not tv else " " + " ".join(f"{k}={v}" for k, v in tv.items()))
                trainer = Trainer(stud, recipe, vcfg, data, progress=True)
                if args.seconds:
                    if steps is None:
                        pr = probe(trainer)
                        per_stage = args.seconds / len(stages)
                        nb = max(1, pr["blocks"])
                        bsec = args.block_fraction * per_stage
                        steps = (max(0, int((bsec / nb - pr.get("block_setup", 0)) / pr.get("block_step", 1))),
                                 max(1, int((1 - args.block_fraction) * per_stage / pr["e2e_step"])))
                        print(json.dumps({"probe": pr, "block_steps": steps[0], "e2e_steps": steps[1]}),
                              flush=True)
                    vcfg.block_steps, vcfg.e2e_steps = steps
                sync()
                t0 = time.perf_counter()
                trainer.run()
                sync()
                train_s = time.perf_counter() - t0
                h = trainer.history
                e2e = [x["loss"] for x in h if x["phase"] == "e2e"]
                blk = [x["loss"] for x in h if x["phase"] == "block"]
                qat_ppl = ppl(stud)
                nblocks = len(block_names(stud))
                tokens = len(stages) * (vcfg.e2e_steps + vcfg.block_steps * nblocks) * vcfg.batch_size \
                    * data.shape[1]
                frozen = freeze(stud)
                qls = [m for m in frozen.modules() if isinstance(m, lowbit.QuantLinear)]
                bpw = sum(m.bits_per_weight() * m.in_features * m.out_features for m in qls) / \
                    sum(m.in_features * m.out_features for m in qls)
                emit({"config": vlabel, "train_options": tv, "init_perplexity": init_ppl,
                      "qat_perplexity": qat_ppl,
                      "perplexity": ppl(frozen), "bits_per_weight": bpw,
                      "block_steps": vcfg.block_steps, "e2e_steps": vcfg.e2e_steps, "batch": vcfg.batch_size,
                      "train_tokens": tokens, "prepare_s": round(prep_s, 1), "train_s": round(train_s, 1),
                      "block_loss_first_last": [blk[0], blk[-1]] if blk else None,
                      "kl_first_last": [e2e[0], sum(e2e[-10:]) / len(e2e[-10:])] if e2e else None,
                      "kl_curve": _curve(e2e), "block_loss_curve": _curve(blk),
                      "heldout_kl": [(x["step"], round(x["loss"], 4)) for x in h if x["phase"] == "eval"],
                      "restored_step": next((x["step"] for x in h if x["phase"] == "restore"), None)})
                del stud, frozen, trainer
            del student
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print()
    print("| config | bits/weight | init ppl | trained ppl (frozen) | train tokens | train s |")
    print("|---|---|---|---|---|---|")
    for r in rows[1:]:
        ip = r["init_perplexity"]
        print(f"| {r['config']} | {r['bits_per_weight']:.3f} | {'-' if ip is None else f'{ip:.4g}'} | "
              f"{r['perplexity']:.2f} | {r['train_tokens']:,} | {r['train_s']:.0f} |")
    print(f"float: {rows[0]['perplexity']:.2f}")


if __name__ == "__main__":
    main()
