"""Perplexity of a trained W2A16 artifact with 2-bit activations added, before any W2A2 training:
the start a W2A2 run ``--init-from`` that artifact gets (CPU or GPU, reference backend).

    python bench/a2_from_artifact.py ARTIFACT [--recipe w2a2-half] [--calib-samples 8 --calib-len 256]

The W2A2 recipe is prepared on the float model with the artifact's passes (RTN weights, the
recipe's per-site activation clip search on the model's own seeded samples), then
:meth:`lowbit.train.Trainer.start_from_artifact` puts the artifact's weights and norms in, so
only the activations are new. Protocol as bench/perplexity.py (the first 200,000 characters of
WikiText-2 raw test, 8 windows of 512 tokens). ``--save DIR`` keeps the W2A2 artifact.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import lowbit
from lowbit.calibration import from_generations
from lowbit.eval import perplexity
from lowbit.llama2c import shared_data_dir
from lowbit.models import load_model
from lowbit.qat import freeze, prepare_qat
from lowbit.train import Trainer, TrainConfig, recipe_stage


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--recipe", default="w2a2-half")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=2)
    data = shared_data_dir()
    ap.add_argument("--text", default=str(data / "text" / "wikitext2_raw_test.txt") if data else None,
                    required=data is None, help="evaluation text (default: WikiText-2 raw test in ../shared/data)")
    ap.add_argument("--chars", type=int, default=200_000)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--save", default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")

    manifest = json.loads((Path(args.artifact) / "manifest.json").read_text())
    passes = lowbit.Recipe.from_dict(manifest["recipe"]).passes
    recipe = lowbit.get_recipe(args.recipe).with_passes(*[dict(p) for p in passes])
    model, tok = load_model(args.model)
    calib = from_generations(model, samples=args.calib_samples, seq_len=args.calib_len, seed=args.seed,
                             batch_size=args.calib_samples, progress=False)
    student = prepare_qat(model, recipe, calibration=calib, progress=False)
    Trainer(student, recipe, TrainConfig(stages=[recipe_stage(recipe)]), calib,
            progress=False).start_from_artifact(args.artifact)
    qmodel = freeze(student)
    text = Path(args.text).read_text()
    result = perplexity(qmodel, tok, text[: args.chars] if args.chars else text, windows=args.windows,
                        progress=False)
    print(json.dumps({"artifact": args.artifact, "recipe": args.recipe, **result}))
    if args.save:
        lowbit.save(qmodel, args.save, tokenizer=tok if hasattr(tok, "save_pretrained") else None,
                    source=args.model)


if __name__ == "__main__":
    main()
