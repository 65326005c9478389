"""Cost of one quantization-aware training step, and the kernels that take it.

    python bench/qat_step.py --recipe w2a16 --variant rotate --batch-size 32 --seq-len 512

A SmolLM2-135M-shaped Llama (built from its config with seeded random weights: the cost of a
step does not depend on the values) is compiled in trainable form (RTN start) and timed:

* ``float step``: forward + backward of the float model in bf16 autocast (a yardstick: what
  the architecture's arithmetic costs at this batch); with ``--compiled-float`` also under
  ``torch.compile`` (what a compiled training step could gain);
* ``e2e eager`` / ``e2e graph``: the trainer's end-to-end KL step (teacher forward, student
  forward and backward, clipping, Adam), eagerly and replayed as a CUDA graph
  (``TrainConfig.cuda_graph``); the same for a block-reconstruction step; with ``--compile``
  also with the blocks compiled (``TrainConfig.compile``), eagerly and in a CUDA graph;

then one eager end-to-end step runs under ``torch.profiler`` and the kernels with the most
GPU time are printed. Times are medians of ``--steps`` steps after warm-up. On CUDA the trainer
runs the ops that have bit-identical Triton kernels through them (the activation quantizer of
W*A* sites, the Hadamard butterflies); ``--torch-hadamard`` takes the butterflies back to the
stages in torch, for comparison.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lowbit  # noqa: E402
from lowbit.qat import prepare_qat  # noqa: E402
from lowbit.train import (GRAPH_WARMUP, Trainer, TrainConfig, causal_mask_droppable,  # noqa: E402
                          compile_blocks, recipe_stage)
from perplexity import VARIANT_PASSES  # noqa: E402
from qat import probe  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="w2a16")
    p.add_argument("--variant", default="rotate", help="none, rotate, ocs-ra, rotate+ocs-ra, ...")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--torch-hadamard", action="store_true",
                   help="the Hadamard butterflies as stages in torch instead of the Triton kernel")
    p.add_argument("--compile", action="store_true",
                   help="also time the end-to-end step with compiled blocks (TrainConfig.compile), eager and graphed")
    p.add_argument("--compiled-float", action="store_true",
                   help="also time the float model's forward + backward under torch.compile")
    p.add_argument("--norm-lr", type=float, default=0.0, help="train the norm weights too (as lowbit train)")
    p.add_argument("--act-clip-lr", type=float, default=0.0,
                   help="train the W*A* sites' activation clip ratios too (as lowbit train)")
    p.add_argument("--profile-compiled", action="store_true",
                   help="profile a step with compiled blocks instead of an eager one (the kernels a "
                        "--compile --cuda-graph run replays)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu: a smoke run of the script (no CUDA graphs, no memory figures)")
    args = p.parse_args(argv)
    if args.steps < GRAPH_WARMUP + 3:
        p.error(f"--steps must be at least {GRAPH_WARMUP + 3} (eager warm-up, capture, then timed replays)")
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        from lowbit.codegen import triton as _kernels  # noqa: F401  (what the trainer imports on CUDA)

        if args.torch_hadamard:
            lowbit.hadamard.register_fwht_kernel("cuda", None)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**dict(SMOLLM2_135M, num_hidden_layers=args.layers))
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (args.batch_size * 4, args.seq_len), generator=g)
    recipe = lowbit.get_recipe(args.recipe)
    recipe = recipe.with_passes(*[VARIANT_PASSES[v] for v in args.variant.split("+") if v in VARIANT_PASSES])
    t0 = time.perf_counter()
    student = prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], progress=False).to(dev)
    print(f"prepared {args.recipe} {args.variant} in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = {}

    # yardstick: the float model's forward + backward in bf16 autocast
    fmodel = model.to(dev).train()
    ids = data[: args.batch_size].to(dev)

    def float_steps(net):
        times = []
        for _ in range(args.steps):
            sync()
            t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                loss = net(ids, use_cache=False).logits.float().logsumexp(-1).mean()
            loss.backward()
            sync()
            times.append(time.perf_counter() - t0)
        return times

    rows["float step (fwd+bwd, bf16)"] = median(float_steps(fmodel)[2:])
    print(f"float step: {rows['float step (fwd+bwd, bf16)']:.4f} s", flush=True)
    if args.compiled_float:
        # what torch.compile makes of the same architecture: the room a compiled training step has
        times = float_steps(torch.compile(fmodel))
        rows["float step, torch.compile"] = median(times[2:])
        print(f"float step under torch.compile: {rows['float step, torch.compile']:.4f} s "
              f"(first two steps, compilation included: {sum(times[:2]):.0f} s)", flush=True)
    del fmodel, model

    base = TrainConfig(stages=[recipe_stage(recipe)], batch_size=args.batch_size, e2e_steps=args.steps,
                       block_steps=args.steps, warmup=0.05, grad_clip=1.0, norm_lr=args.norm_lr,
                       act_clip_lr=args.act_clip_lr)
    variants = [(graphed, False) for graphed in ((False, True) if cuda else (False,))]
    if args.compile:
        variants += [(graphed, True) for graphed in ((False, True) if cuda else (False,))]
    for graphed, compiled in variants:
        tr = Trainer(student, recipe, replace(base, cuda_graph=graphed, compile=compiled), data, progress=False)
        pr = probe(tr, args.steps)  # short phases on a copy of the model
        name = ("compiled blocks + " if compiled else "") + ("graph" if graphed else "eager")
        rows[f"e2e {name}"] = pr["e2e_step"]
        print(f"e2e {name}: {pr['e2e_step']:.4f} s per step (warm-up{' and compilation' if compiled else ''}: "
              f"{pr['e2e_warmup']:.1f} s)", flush=True)
        if not compiled:  # the block phase does not compile
            rows[f"block {name}"] = pr["block_step"]
        del tr
        if cuda:
            rows[f"peak GiB ({name})"] = torch.cuda.max_memory_allocated() / 2 ** 30
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    tokens = args.batch_size * args.seq_len
    print(f"\n{args.recipe} {args.variant}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}")
    print("| step | seconds | tokens/s | x float step |")
    print("|---|---|---|---|")
    fl = rows["float step (fwd+bwd, bf16)"]
    for k, v in rows.items():
        if k.startswith("peak"):
            print(f"| {k} | {v:.1f} | | |")
        else:
            print(f"| {k} | {v:.4f} | {tokens / v:,.0f} | {v / fl:.2f} |")

    # where the end-to-end step's GPU time goes (eager, or with compiled blocks)
    from torch.profiler import ProfilerActivity, profile

    tr = Trainer(student, recipe, replace(base, compile=args.profile_compiled), data, progress=False)
    tr.optimizer = tr.make_optimizer(lowbit.qat.fake_quant_sites(student))
    tr._steps_done = 0
    if args.profile_compiled:
        compile_blocks(student, True, compile=True, drop_mask=causal_mask_droppable(student))
    for _ in range(2):
        tr.train_step(tr.e2e_loss, (ids,), 1, 10)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        tr.train_step(tr.e2e_loss, (ids,), 1, 10)
        sync()
    avg = prof.key_averages()
    key = ("self_device_time_total" if hasattr(avg[0], "self_device_time_total") else "self_cuda_time_total") \
        if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in avg)
    kind = "compiled-block" if args.profile_compiled else "eager"
    print(f"\n{'GPU' if cuda else 'CPU'} time of one {kind} end-to-end step: {total / 1e3:.1f} ms (sum over ops)")
    print(avg.table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
