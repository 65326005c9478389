"""``lowbit run DIR --prompt TEXT``: generate text with an exported model.

Streams the generated text to stdout as tokens arrive; prints load time, prefill time
and decode speed to stderr. Imports no torch.
"""
from __future__ import annotations

import argparse
import json
import sys


def build_parser(prog: str = "lowbit run") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="generate text with a model exported by lowbit.export_onnx")
    p.add_argument("directory", help="folder written by lowbit.export_onnx (manifest.json, model.onnx, ...)")
    p.add_argument("--prompt", default=None, help="prompt text (default: read stdin)")
    p.add_argument("--ids", default=None, help="prompt as comma-separated token ids instead of text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--provider", action="append", default=None,
                   help="onnxruntime execution provider (repeatable; default: CUDA if present, then CPU)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the files")
    p.add_argument("--ignore-eos", action="store_true", help="generate max-new-tokens tokens even after EOS")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, ids, timings) at the end")
    p.add_argument("--quiet", action="store_true", help="no timing line on stderr")
    return p


def main(argv=None) -> int:
    """Entry point of ``lowbit run``; ``argv`` excludes the program and subcommand names."""
    args = build_parser().parse_args(argv)
    from .manifest import ManifestError
    from .session import Session

    try:
        session = Session(args.directory, providers=args.provider, threads=args.threads, verify=not args.no_verify)
    except ManifestError as e:
        print(f"lowbit run: {e}", file=sys.stderr)
        return 2
    if args.ids is not None:
        prompt = [int(t) for t in args.ids.replace(" ", "").split(",") if t]
    else:
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()

    def show(token_id: int | None, piece: str) -> None:
        if not args.json:
            sys.stdout.write(piece if piece or session.manifest.get("tokenizer") else f"{token_id} ")
            sys.stdout.flush()

    g = session.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, on_token=show,
                         stop_at_eos=not args.ignore_eos)
    if args.json:
        print(json.dumps({"text": g.text, "token_ids": g.token_ids, "prompt_ids": g.prompt_ids,
                          "finish_reason": g.finish_reason, "load_seconds": session.load_seconds,
                          "prefill_seconds": g.prefill_seconds, "decode_tokens_per_second": g.tokens_per_second}))
    else:
        sys.stdout.write("\n")
    if not args.quiet:
        print(f"[lowbit run] load {session.load_seconds:.2f} s, prompt {len(g.prompt_ids)} tokens in "
              f"{g.prefill_seconds * 1e3:.1f} ms, {len(g.token_ids)} tokens at {g.tokens_per_second:.1f} tok/s "
              f"({g.finish_reason}; providers {session.providers})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
