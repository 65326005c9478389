"""Progressive quantization-aware training by distillation from the float model.

``train(model, recipe, data, config)`` compiles ``model`` in trainable form
(:func:`lowbit.qat.prepare_qat`, initialised by the recipe's weight method: RTN with
clipping search or GPTQ, after its passes: rotation, outlier splitting) and then runs the
stages of ``config``, each at a lower precision than the last (for example weights at
4, then 3, then 2 bits). A stage starts from the previous one: the codes move along the
nested integer grids of :mod:`lowbit.formats` (``q_b = round_shift(q_{b+d}, d)``, group
scales kept, global scale times ``2^d``), see :meth:`lowbit.qat.FakeQuantLinear.set_formats`.
``block_steps``, ``e2e_steps`` and ``lr`` take one value for all stages or one per stage. A
stage that brings activation quantization in starts each site at the clip ratio the recipe's
``act_clip_search`` picked for it when the model was prepared (searched then, on the same weights).

Each stage has two phases, both distilling the float model (the compiled model with its
sites in ``float_mode``: the same rotations and splits, unquantized weights):

* **block reconstruction**, block by block (``model.layers.<i>``): the block's inputs are
  those of the quantized model (so earlier blocks' errors are seen), its targets the
  float model's outputs of that block on the float model's own inputs; the loss is
  ``||B_q(x_q) - B_f(x_f)||^2 / ||B_f(x_f)||^2`` and only that block's latent weights and
  log group scales move;
* **end to end**: ``KL(p_float || p_quant)`` of the next-token distributions over every
  position of a batch, all sites training together; with ``hidden_weight = w > 0`` plus
  ``w * mean_l ||h_q,l - h_f,l||^2 / ||h_f,l||^2`` over the decoder blocks' outputs (the last
  one after the final norm), which supervises every block inside the whole model. The
  held-out KL never includes that term.

Data: token ids, from a text file (:func:`lowbit.calibration.from_text`) or sampled from
the float model itself (:func:`lowbit.calibration.from_generations`, data-free); both
seeded. Batches are drawn by a generator seeded from (seed, stage, phase, block, step),
so a resumed run draws the same batches as an uninterrupted one.

Held-out evaluation (optional: ``holdout`` sequences kept out of training, ``eval_every``):
the end-to-end KL on the held-out sequences is measured before the first end-to-end step and
every ``eval_every`` steps, and with ``keep_best`` each end-to-end phase ends with the site
tensors of its lowest held-out KL, so a phase that diverges cannot end worse than it began.

Step cost (``cuda_graph``): a step launches tens of small kernels per site (the fake
quantizers, forward and backward), about 20,000 in all for a 210-site model. Adam is one
multi-tensor pass over all the sites (:class:`lowbit.optim.GroupedAdam`).
With ``cuda_graph=True`` each phase (an end-to-end phase, or one block of block reconstruction)
runs its first :data:`GRAPH_WARMUP` steps eagerly. It then captures one whole step as a CUDA
graph and replays it for the remaining steps, copying each batch into the graph's input
tensors. The step covers forward, backward, gradient clipping and Adam, with
``capturable=True`` and the learning-rate schedule's factor held in a device tensor. The
arithmetic is that of the eager step; only the launches go. For SmolLM2 on an H200 that makes end-to-end steps 1.39x
faster and block steps 2.2x; what remains is GPU time (docs/qat.md).

Checkpoints (``out/``, no pickle): ``sites.safetensors`` (the tensors of every trainable
site but its float weight, which a resume rebuilds from the model and the recipe's passes),
``optimizer.safetensors`` + ``state.json`` (stage, phase, block, step, formats, config,
recipe, loss history), ``data.safetensors`` (the token ids, held-out ones
included), ``best.safetensors`` (the best site tensors of an end-to-end phase in progress)
and, once the run has ended, ``latents.safetensors`` (:meth:`Trainer.latent_offsets`).
They are written at each stage's end, every ``checkpoint_every`` end-to-end steps and (with
``checkpoint_every``) at each block's end, and when a limit of ``run`` is reached
(``max_steps``, or ``seconds``: a run that must fit a time slot). ``train(..., resume=True)``
rebuilds the model from the float one and continues where the checkpoint left off (with
the recipe it was trained with: another one is refused); on the
CPU the result equals an uninterrupted run bit for bit. ``train(..., resume=True,
finish=True)`` ends a run in its last stage at the checkpoint instead, at the best held-out
evaluation of the end-to-end phase in progress; ``finish_at_limit=True`` does the same in the
call that reaches the limit, so a run that must fit a time slot ends with a model.

A new run can also start from a frozen artifact (``train(..., init_from=DIR)``,
:meth:`Trainer.start_from_artifact`): the model an earlier run produced, continued with a
schedule of its own when that run's checkpoint is gone. The sites and normalization weights
take the artifact's values; the teacher is this run's float model. The artifact's weight
formats must be the run's; its activations may be float where the run quantizes them, so a
trained W2A16 model can start W2A2 training. The frozen model keeps only the codes, so such a
run would start with every latent weight at its code's value; with the ended run's
``latents.safetensors`` (``init_latents``, a quarter byte per weight) it starts at that run's latent
weights, to within 1/8 of a group step (on stories260K W2A2 that is most of what a restart
costs, docs/qat.md).
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .formats import QFormat, pack_codes, unpack_codes
from .optim import GroupedAdam
from .qat import fake_quant_sites, float_mode, prepare_qat, set_formats
from .recipes import Recipe, get_recipe

PER_STAGE = ("block_steps", "e2e_steps", "lr")  # TrainConfig options that can take one value per stage
GRAPH_WARMUP = 3  # eager steps of a phase before its step is captured as a CUDA graph
_STAGE = re.compile(r"^w(\d)(?:a(\d+))?$")
_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def parse_stage(spec: str) -> tuple[int, int]:
    """``"w4a8"`` -> (4, 8); ``"w2"`` -> (2, 0) (activations left in float)."""
    m = _STAGE.match(spec.strip().lower())
    if not m:
        raise ValueError(f"stage {spec!r}: expected 'w<bits>' or 'w<bits>a<bits>', e.g. 'w4', 'w2a2'")
    return int(m.group(1)), int(m.group(2) or 0)


@dataclass
class TrainConfig:
    """What to train and how. ``stages`` are format specs (``"w4"``, ``"w3a4"``, ``"w2a2"``);
    their grid, group size and scale dtype come from the recipe, and the last stage must
    be the recipe's own formats."""

    stages: list[str] = field(default_factory=list)
    block_steps: int | list[int] = 0  # per block, per stage (a list: one value for each stage)
    block_samples: int = 0         # sequences used for block reconstruction (0: all)
    e2e_steps: int | list[int] = 100  # per stage (a list: one value for each stage)
    batch_size: int = 4
    lr: float | list[float] = 5e-3  # latent weights: Adam step relative to each site's weight RMS (or one per stage)
    scale_lr: float = 2e-3         # log group scales (relative change of a scale per step)
    warmup: float = 0.0            # fraction of each phase's steps with a linear learning-rate ramp
    grad_clip: float = 0.0         # clip the global gradient norm of each step to this (0: off)
    holdout: int = 0               # sequences at the end of the data kept out of training, to evaluate on
    eval_every: int = 0            # end-to-end steps between held-out KL evaluations (0: none)
    keep_best: bool = True         # with evaluations: end each end-to-end phase at its best held-out KL
    compile: bool = False          # end-to-end phases: each block through torch.compile (one graph for all)
    cuda_graph: bool = False       # replay each phase's training step as one CUDA graph (CUDA only)
    temperature: float = 1.0       # of the end-to-end KL
    hidden_weight: float = 0.0     # end-to-end: + this x the blocks' outputs' relative squared error
    norm_lr: float = 0.0           # Adam step of the normalization layers' weights (0: they stay frozen)
    act_clip_lr: float = 0.0       # Adam step of the sites' activation clip ratios (0: they stay fixed)
    seed: int = 0
    amp: str = "auto"              # "bf16": autocast on CUDA; "none"; "auto": bf16 on CUDA only
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0      # end-to-end steps between checkpoints; >0 also at each block end (0: stage ends)
    transition: str = "nested"     # between stages: "nested" codes, or "refit" scales to the latent weights

    def __post_init__(self):
        for name in PER_STAGE:
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                if not v:
                    raise ValueError(f"{name}: an empty list (give one value, or one for each stage)")
                if self.stages and len(v) != len(self.stages):
                    raise ValueError(f"{name} has {len(v)} values for {len(self.stages)} stages "
                                     f"({', '.join(self.stages)}): give one value, or one for each stage")
                setattr(self, name, list(v))
        for name in ("block_steps", "block_samples", "e2e_steps", "holdout", "eval_every", "checkpoint_every"):
            for v in _values(getattr(self, name)):
                if int(v) < 0:
                    raise ValueError(f"{name} must be >= 0, got {v}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("lr", "scale_lr", "norm_lr", "act_clip_lr", "grad_clip", "hidden_weight"):
            for v in _values(getattr(self, name)):
                if not (math.isfinite(v) and v >= 0):
                    raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"warmup is a fraction of each phase's steps, in [0, 1]; got {self.warmup}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {self.amp!r}")
        if self.transition not in ("nested", "refit"):
            raise ValueError(f"transition must be 'nested' or 'refit', got {self.transition!r}")

    @classmethod
    def from_recipe(cls, recipe: Recipe, **overrides) -> "TrainConfig":
        """Defaults from ``recipe.weight_options["qat"]`` (if any), then ``overrides``."""
        d = dict(recipe.weight_options.get("qat", {}))
        d.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**d)
        if not cfg.stages:
            cfg.stages = [recipe_stage(recipe)]
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    def for_stage(self, stage: int) -> "TrainConfig":
        """This config with the values of ``stage`` for the options given per stage
        (:data:`PER_STAGE`, where a list holds one value for each stage)."""
        per_stage = {name: getattr(self, name)[stage] for name in PER_STAGE
                     if isinstance(getattr(self, name), list)}
        return replace(self, **per_stage) if per_stage else self


def _values(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def recipe_stage(recipe: Recipe) -> str:
    return f"w{recipe.weight.bits}" + (f"a{recipe.activation.bits}" if recipe.activation else "")


def stage_formats(recipe: Recipe, spec: str) -> tuple[QFormat, QFormat | None]:
    wb, ab = parse_stage(spec)
    w = replace(recipe.weight, bits=wb)
    a = None
    if ab:
        base = recipe.activation or recipe.weight
        a = replace(base, bits=ab)
    return w, a


def stage_recipe(recipe: Recipe, spec: str) -> Recipe:
    w, a = stage_formats(recipe, spec)
    return replace(recipe, name=f"{recipe.name}@{spec}", weight=w, activation=a,
                   act_clip_search=recipe.act_clip_search if a is not None else [])


def training_data(model, tokenizer, source: str = "generate", samples: int = 64, seq_len: int = 256,
                  seed: int = 0, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """[samples, seq_len] token ids: the model's own seeded samples (``"generate"``), the
    ``ids`` tensor of a ``.safetensors`` file (a checkpoint's ``data.safetensors``: data
    generated once, trained on again; its first ``samples`` rows, cut to ``seq_len``), or
    windows at seeded offsets of a text file (any other value is a path)."""
    from . import calibration

    if source == "generate":
        return calibration.from_generations(model, samples, seq_len, seed=seed, batch_size=batch_size,
                                            progress=progress)
    if str(source).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as f:
            if "ids" not in f.keys():
                raise ValueError(f"{source}: no 'ids' tensor (has {sorted(f.keys())})")
            ids = f.get_tensor("ids")
        if ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"{source}: 'ids' must be [sequences, tokens] integers, got {ids.dtype} "
                             f"{list(ids.shape)}")
        if ids.shape[0] < samples or ids.shape[1] < seq_len:
            raise ValueError(f"{source} holds {ids.shape[0]} x {ids.shape[1]} tokens; asked for "
                             f"{samples} x {seq_len}")
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"{source}: token ids outside the model's vocabulary of {vocab}")
        return ids[:samples, :seq_len].long().clone()
    return calibration.from_text(tokenizer, Path(source), samples, seq_len, seed=seed)


def block_names(model: nn.Module) -> list[str]:
    """Numbered blocks holding trainable sites (``model.layers.3``), in order."""
    out: list[str] = []
    for name in fake_quant_sites(model):
        m = _BLOCK.match(name)
        if m and m.group(1) not in out:
            out.append(m.group(1))
    return out


def causal_mask_droppable(model: nn.Module) -> bool:
    """Whether the blocks of ``model`` may be called with ``attention_mask=None`` on the trainer's
    sequences (unpadded, full causal attention): a Hugging Face model whose attention is SDPA,
    where a missing mask means ``is_causal=True``, and whose layers all attend to the full
    prefix (no sliding windows)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(cfg, "sliding_window", None) is not None:
        return False
    return all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or ()))


def _without_mask(call):
    def call_causal(*args, **kwargs):
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = None
        return call(*args, **kwargs)

    return call_causal


def compile_blocks(model: nn.Module, on: bool, compile: bool = True, drop_mask: bool = False) -> None:
    """Route the calls of each block of :func:`block_names` (``on=True``), or return them to
    plain eager calls (``on=False``).

    * ``compile``: each block through ``torch.compile`` in place (what ``nn.Module.compile``
      does). Regional compilation: the blocks run the same code, so torch.compile traces and
      compiles one graph per variant (the student; the teacher, whose sites are in
      ``float_mode``; their backward; the no-grad evaluation) and every block reuses it.
      Compiling therefore costs the same for 2 blocks or 30, where compiling the whole model
      costs time in proportion to its depth.
    * ``drop_mask`` (only where :func:`causal_mask_droppable`): the blocks are called with
      ``attention_mask=None``, which SDPA takes as causal attention. Hugging Face models build
      no mask for unpadded sequences, except while a CUDA graph is being captured, where they
      cannot look at the values and build a full one. Without the mask, a captured step runs
      the same attention kernel as an eager one, and compiled blocks see the same arguments
      in both (a mask appearing during capture made torch.compile recompile there, which a
      capture does not allow).

    State-dict keys do not change, so checkpoints and ``freeze`` see the plain modules."""
    for name in block_names(model):
        block = model.get_submodule(name)
        if not on:
            block._compiled_call_impl = None  # None: nn.Module calls _call_impl eagerly again
            continue
        call = torch.compile(block._call_impl) if compile else block._call_impl
        block._compiled_call_impl = _without_mask(call) if drop_mask else call


def _require_step_budget(max_steps: int | None) -> None:
    """A step budget is None (no limit) or at least one step: the budget is checked after each
    step, so a budget of 0 would still take one."""
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be at least 1 (got {max_steps}); None trains to the end")


class _Stop(Exception):
    pass


class _Interrupted(Exception):
    pass


def norm_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of the model's normalization layers (LayerNorm, RMSNorm and the models' own
    ``*Norm`` modules), by parameter name. After the rotation pass they are per-channel scales
    of the rotated residual stream (all ones where the pass folded them into the next sites):
    training them is a degree of freedom the quantized sites do not have, since a scale per
    input channel is not one per group of a row."""
    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if (isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith("Norm")) \
                and isinstance(w, nn.Parameter) and w.dim() == 1:
            out[f"{name}.weight" if name else "weight"] = w
    return out


def _call_logits(model, ids):
    out = model(ids, use_cache=False) if _is_hf(model) else model(ids)
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def _call_logits_hidden(model, ids, hidden: bool):
    """Logits, and with ``hidden`` the outputs of the decoder blocks (Hugging Face models)."""
    if not hidden:
        return _call_logits(model, ids), ()
    if not _is_hf(model):
        raise ValueError("hidden_weight needs a Hugging Face model (output_hidden_states)")
    out = model(ids, use_cache=False, output_hidden_states=True)
    return out.logits, out.hidden_states[1:]


def relative_squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||out - target||^2 / ||target||^2`` in fp32: the block-reconstruction loss, and the
    per-block term of ``hidden_weight``."""
    out, target = out.float(), target.float()
    return (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-30)


def _is_hf(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "generate")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class Trainer:
    """Runs the stages of a :class:`TrainConfig` on a prepared (trainable) model."""

    def __init__(self, student: nn.Module, recipe: Recipe, config: TrainConfig, data: torch.Tensor,
                 out: str | Path | None = None, progress: bool = True):
        self.model, self.recipe = student, recipe
        self.full_config = config  # as given: the options given per stage hold a list
        self.config = config.for_stage(0)  # the current stage's values (set again at each stage)
        self._all_data = data.long()
        train_rows = data.shape[0] - config.holdout
        if config.holdout < 0 or (config.holdout and train_rows < 1):
            raise ValueError(f"holdout={config.holdout} must leave training sequences (data has {data.shape[0]})")
        self.eval_data = self._all_data[train_rows:] if config.holdout else None
        self.data = self._all_data[: train_rows // config.batch_size * config.batch_size]
        if self.data.shape[0] == 0:
            raise ValueError(f"{train_rows} training sequences, fewer than one batch of {config.batch_size}")
        if config.eval_every and self.eval_data is None:
            raise ValueError("eval_every needs held-out sequences (holdout > 0)")
        self.best: dict | None = None  # best held-out KL of the current end-to-end phase: loss, step, tensors
        self.out = Path(out) if out else None
        self.progress = progress
        self.device = next(student.parameters()).device
        self.state = {"stage": 0, "phase": "block", "block": 0, "step": 0, "formats_stage": 0}
        self.history: list[dict] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_optimizer: dict | None = None
        self._carry = None  # ((stage, next block), its quantized-model inputs, its float-model inputs)
        for p in student.parameters():
            p.requires_grad_(False)
        for m in fake_quant_sites(student).values():
            m.weight.requires_grad_(True)
            m.log_scale.requires_grad_(True)
        # trained normalization weights (norm_lr > 0): the teacher keeps the float ones, swapped in
        # by copies (a captured CUDA graph holds the parameters' addresses) around its forwards
        self._norms: dict[str, nn.Parameter] = {}  # the normalization weights the teacher swaps out
        self._float_norms: dict[str, torch.Tensor] = {}
        self._trained_norms: dict[str, torch.Tensor] = {}
        self.init_from: str | None = None  # the artifact the run started from (start_from_artifact)
        self.init_latents: str | None = None  # the latent offsets it started from (load_latents)
        # activation clip ratios searched when the model was prepared, for the sites whose activations
        # a later stage quantizes (taken by the first stage that does: _take_pending_act_clips)
        self.pending_act_clips: dict[str, float] = {}
        if config.norm_lr > 0:
            self._track_norms()
            for p in self._norms.values():
                p.requires_grad_(True)
        self._learn_act_clips()
        if self.device.type == "cuda":
            try:  # the CUDA kernels of the ops the fake quantizers share (bit-identical: Hadamard, act. quantizer)
                import lowbit.codegen.triton  # noqa: F401
            except ImportError:
                pass
        if config.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device (it is on {self.device})")
        self._graph: dict | None = None  # the current phase's captured step (see _graph_step)
        self._compiled_kl = None  # logits_kl through torch.compile, during compiled end-to-end phases
        self.step_times: list[float] = []  # perf_counter() after each optimizer step (for timing probes)
        self.graph_replays = 0  # steps replayed from a captured CUDA graph
        self._budget, self._steps_done, self._deadline = None, 0, None  # limits of run()
        self.interrupted = False  # run() stopped at a limit (max_steps, seconds) before the end
        if config.gradient_checkpointing and hasattr(student, "gradient_checkpointing_enable"):
            student.gradient_checkpointing_enable()

    # -- helpers ----------------------------------------------------------------------------
    def _track_norms(self) -> None:
        """Keep the model's current (float) normalization weights for the teacher, which swaps
        them in around its forwards: needed when the student's differ, because they train
        (``norm_lr``) or were loaded trained (a checkpoint, :meth:`start_from_artifact`)."""
        if not self._norms:
            self._norms = norm_weights(self.model)
            self._float_norms = {n: p.detach().clone() for n, p in self._norms.items()}
            self._trained_norms = {n: torch.empty_like(p) for n, p in self._norms.items()}

    def _take_pending_act_clips(self) -> None:
        """A stage that brings in activation quantization starts each site at the clip ratio searched
        for it when the model was prepared (:func:`train`), not at the format's default."""
        for name, m in fake_quant_sites(self.model).items():
            if m.act_format is not None and name in self.pending_act_clips and m.act_clip_ratio is None:
                m.act_format = replace(m.act_format, clip=self.pending_act_clips.pop(name))

    def _learn_act_clips(self) -> None:
        """With ``act_clip_lr``: every site that quantizes its activations learns its clip ratio
        (:meth:`lowbit.qat.FakeQuantLinear.learn_act_clip`; again after a stage brings them in)."""
        if self.config.act_clip_lr <= 0:
            return
        for m in fake_quant_sites(self.model).values():
            if m.act_format is not None:
                m.learn_act_clip()  # keeps a ratio the model already learns (a second trainer on it)
                m.act_clip_ratio.requires_grad_(True)  # the constructor froze every parameter first

    def autocast(self):
        amp = self.config.amp
        if self.device.type == "cuda" and amp in ("auto", "bf16"):
            # no cast cache under graph capture (it would hold tensors of the capture)
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not self.config.cuda_graph)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def teacher(self):
        """The float model the student distills from: every site in ``float_mode`` and, when the
        normalization weights train, their float values in place of the trained ones."""
        with float_mode(self.model):
            if not self._norms:
                yield
                return
            with torch.no_grad():
                for n, p in self._norms.items():
                    self._trained_norms[n].copy_(p)
                    p.copy_(self._float_norms[n])
            try:
                yield
            finally:
                with torch.no_grad():
                    for n, p in self._norms.items():
                        p.copy_(self._trained_norms[n])

    def batch_index(self, *key) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash_key(self.config.seed, *key))
        return torch.randint(0, self.data.shape[0], (self.config.batch_size,), generator=g)

    def make_optimizer(self, sites: dict, saved: dict | None = None, scope: str = "") -> GroupedAdam:
        """Adam over the sites' latent weights (one group per site, step relative to its weight
        RMS), their log scales and, with ``norm_lr``, the weights of the normalization layers
        under the module ``scope`` ("" for the whole model); ``saved``: a checkpoint's optimizer
        state to continue. With ``cuda_graph`` the optimizer is capturable: its schedule factor is a
        device tensor (a captured step reads it; :meth:`set_lr` fills it in place)."""
        groups = []
        for m in sites.values():
            rms = float(m.float_weight.pow(2).mean().sqrt()) or 1.0
            groups.append({"params": [m.weight], "lr": self.config.lr * rms, "base_lr": self.config.lr * rms})
        groups.append({"params": [m.log_scale for m in sites.values()], "lr": self.config.scale_lr,
                       "base_lr": self.config.scale_lr})
        clips = [m.act_clip_ratio for m in sites.values() if m.act_clip_ratio is not None]
        if clips and self.config.act_clip_lr > 0:
            groups.append({"params": clips, "lr": self.config.act_clip_lr, "base_lr": self.config.act_clip_lr})
        norms = [p for n, p in self._norms.items() if not scope or n.startswith(scope + ".")]
        if norms and self.config.norm_lr > 0:
            groups.append({"params": norms, "lr": self.config.norm_lr, "base_lr": self.config.norm_lr})
        # one multi-tensor Adam pass over all the groups (torch.optim.Adam launches per group:
        # a tenth of a W2A2 step's GPU time on an H200, lowbit.optim); capturable for CUDA graphs
        opt = GroupedAdam(groups, betas=(0.9, 0.95), capturable=self.config.cuda_graph)
        if saved is not None:
            load_optimizer_state(opt, saved)
            for g in opt.param_groups:  # a group's lr is its base rate (older checkpoints hold the scheduled one)
                g["lr"] = float(g["base_lr"])
        self._graph = None
        return opt

    def set_lr(self, step: int, total: int) -> None:
        """Cosine decay to zero over the phase's ``total`` steps, after a linear ramp over the
        first ``warmup * total`` steps (none by default)."""
        f = 0.5 * (1 + math.cos(math.pi * step / max(1, total)))  # cosine to zero
        ramp = self.config.warmup * total
        if ramp > 0 and step < ramp:
            f *= (step + 1) / (ramp + 1)
        self.optimizer.set_lr_factor(f)

    def _update(self, loss: torch.Tensor) -> None:
        """Backward, gradient clipping and the optimizer step (gradients must be None before)."""
        loss.backward()
        if self.config.grad_clip > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.optimizer.step()

    def train_step(self, loss_fn, inputs: tuple, step: int, total: int) -> torch.Tensor:
        """One optimizer step on ``loss_fn(*inputs)`` at ``step`` of ``total`` (the learning-rate
        schedule); returns the loss. With ``cuda_graph`` the step is replayed from a CUDA graph
        once the phase has run :data:`GRAPH_WARMUP` eager steps."""
        self.set_lr(step, total)
        if self.config.cuda_graph:
            loss = self._graph_step(loss_fn, inputs)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(*inputs)
            self._update(loss)
        self._steps_done += 1
        self.step_times.append(time.perf_counter())
        return loss.detach()

    def _graph_step(self, loss_fn, inputs: tuple) -> torch.Tensor:
        if self._graph is None:
            self._graph = {"eager": 0, "graph": None}
        gs = self._graph
        if gs["graph"] is None and gs["eager"] < GRAPH_WARMUP:
            # eager steps on a side stream first, as CUDA graph capture requires (lazy state,
            # the optimizer's included, is created outside the capture)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(*inputs)
                self._update(loss)
            torch.cuda.current_stream().wait_stream(side)
            gs["eager"] += 1
            return loss
        if gs["graph"] is None:
            static = tuple(x.clone() for x in inputs)
            self.optimizer.zero_grad(set_to_none=True)  # the captured backward writes fresh gradients
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = loss_fn(*static)
                self._update(loss)
            gs.update(graph=graph, static=static, loss=loss)  # capturing runs nothing: replay below
        for dst, src in zip(gs["static"], inputs):
            dst.copy_(src)
        gs["graph"].replay()
        self.graph_replays += 1
        return gs["loss"]

    def _end_phase(self) -> None:
        """Drop the phase's optimizer, captured graph and gradients (their memory is freed)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.optimizer, self._graph = None, None

    # -- block reconstruction ------------------------------------------------------------------
    def block_inputs(self, block: nn.Module, quantized: bool, samples: int | None = None):
        """Inputs of ``block`` over the block-reconstruction data (hidden states [S, T, D],
        or the first ``samples`` sequences) and the keyword arguments of its call, from the
        quantized or the float model."""
        captured = {}

        def hook(mod, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Stop

        h = block.register_forward_pre_hook(hook, with_kwargs=True)
        xs = []
        ctx = contextlib.nullcontext() if quantized else self.teacher()
        n = self.data.shape[0]
        if self.config.block_samples:
            n = min(n, max(self.config.batch_size, self.config.block_samples))
        if samples is not None:
            n = min(n, samples)
        try:
            with torch.no_grad(), ctx, self.autocast():
                for i in range(0, n, self.config.batch_size):
                    try:
                        _call_logits(self.model, self.data[i:i + self.config.batch_size].to(self.device))
                    except _Stop:
                        pass
                    args, kwargs = captured["args"], dict(captured["kwargs"])
                    x = args[0] if args else kwargs.pop("hidden_states")
                    xs.append(x.float())
        finally:
            h.remove()
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return torch.cat(xs), kwargs

    def train_block(self, name: str, stage: int, block_idx: int, start_step: int) -> None:
        cfg = self.config
        block = self.model.get_submodule(name)
        sites = fake_quant_sites(block)
        bs = cfg.batch_size
        if self._carry is not None and self._carry[0] == (stage, block_idx):
            # the previous block's outputs (quantized model, float model) are this block's inputs;
            # only the keyword arguments (masks, position embeddings) are captured anew
            _, x_q, x_f = self._carry
            kw = self.block_inputs(block, quantized=True, samples=bs)[1]
        else:
            x_q, kw = self.block_inputs(block, quantized=True)
            x_f, _ = self.block_inputs(block, quantized=False)
        self._carry = None
        with torch.no_grad(), self.teacher(), self.autocast():
            y_f = torch.cat([_first(block(x_f[i:i + bs], **kw)).float() for i in range(0, x_f.shape[0], bs)])
        del x_f
        self.optimizer = self.make_optimizer(sites, self._pending_optimizer, scope=name)
        self._pending_optimizer = None
        from tqdm.auto import tqdm

        def block_loss(x, target):
            with self.autocast():
                out = _first(block(x, **kw)).float()
            return relative_squared_error(out, target)

        bar = tqdm(range(start_step, cfg.block_steps), desc=f"stage {stage} {name}", disable=not self.progress,
                   leave=False)
        for step in bar:
            idx = self.batch_index(stage, 0, block_idx, step).to(x_q.device) % x_q.shape[0]
            lv = float(self.train_step(block_loss, (x_q[idx], y_f[idx]), step, cfg.block_steps))
            bar.set_postfix(loss=f"{lv:.4g}")
            self.history.append({"stage": stage, "phase": "block", "block": block_idx, "step": step, "loss": lv})
        bar.close()
        self._end_phase()
        with torch.no_grad(), self.autocast():
            x_next = torch.cat([_first(block(x_q[i:i + bs], **kw)).float() for i in range(0, x_q.shape[0], bs)])
        self._carry = ((stage, block_idx + 1), x_next, y_f)

    # -- end to end --------------------------------------------------------------------------------
    def e2e_loss(self, ids: torch.Tensor, hidden: bool = True) -> torch.Tensor:
        t = self.config.temperature
        hidden = hidden and self.config.hidden_weight > 0
        with torch.no_grad(), self.teacher(), self.autocast():
            teacher, teacher_hidden = _call_logits_hidden(self.model, ids, hidden)
        with self.autocast():
            student, student_hidden = _call_logits_hidden(self.model, ids, hidden)
        kl = (self._compiled_kl if self._compiled_kl is not None else logits_kl)(teacher, student, t)
        if not hidden:
            return kl
        err = [relative_squared_error(s, h) for s, h in zip(student_hidden, teacher_hidden)]
        return kl + self.config.hidden_weight * torch.stack(err).mean()

    @torch.no_grad()
    def heldout_kl(self) -> float:
        """Mean end-to-end KL over the held-out sequences (in batches of ``batch_size``)."""
        total, rows = 0.0, 0
        for i in range(0, self.eval_data.shape[0], self.config.batch_size):
            ids = self.eval_data[i:i + self.config.batch_size].to(self.device)
            total += float(self.e2e_loss(ids, hidden=False)) * ids.shape[0]
            rows += ids.shape[0]
        return total / rows

    def _site_tensors(self) -> dict[str, torch.Tensor]:
        """What training changes: the sites' latent weights, log scales and learned activation
        clip ratios, and the trained normalization weights (by parameter name)."""
        tensors = {f"{name}.{k}": p.detach().clone() for name, m in fake_quant_sites(self.model).items()
                   for k, p in (("weight", m.weight), ("log_scale", m.log_scale),
                                ("act_clip_ratio", m.act_clip_ratio)) if p is not None}
        tensors.update({n: p.detach().clone() for n, p in self._norms.items()})
        return tensors

    def _evaluate(self, stage: int, step: int) -> None:
        """Held-out KL after ``step`` end-to-end steps; remember the site tensors if it is the best."""
        kl = self.heldout_kl()
        self.history.append({"stage": stage, "phase": "eval", "block": 0, "step": step, "loss": kl})
        if self.best is None or kl < self.best["loss"]:
            self.best = {"loss": kl, "step": step, "tensors": self._site_tensors()}

    def _restore_best(self, stage: int) -> None:
        sites = fake_quant_sites(self.model)
        with torch.no_grad():
            for name, m in sites.items():
                m.weight.copy_(self.best["tensors"][f"{name}.weight"])
                m.log_scale.copy_(self.best["tensors"][f"{name}.log_scale"])
                if m.act_clip_ratio is not None:
                    m.act_clip_ratio.copy_(self.best["tensors"][f"{name}.act_clip_ratio"])
            for n, p in self._norms.items():
                p.copy_(self.best["tensors"][n])
        self.history.append({"stage": stage, "phase": "restore", "block": 0, "step": self.best["step"],
                             "loss": self.best["loss"]})

    def train_e2e(self, stage: int, start_step: int) -> None:
        """End-to-end KL steps. With ``eval_every``, the held-out KL is measured before the first
        step and every ``eval_every`` steps; with ``keep_best`` the phase ends with the site
        tensors of the lowest one (so it never ends worse, on held-out data, than it began).
        With ``compile`` the blocks run compiled during the phase, and on unpadded causal SDPA
        models they are called without an attention mask (:func:`compile_blocks`)."""
        drop_mask = causal_mask_droppable(self.model)
        if not (self.config.compile or drop_mask):
            return self._train_e2e(stage, start_step)
        compile_blocks(self.model, True, compile=self.config.compile, drop_mask=drop_mask)
        if self.config.compile:
            # the KL over the vocabulary too: eager, its casts, log-softmaxes and products are a dozen
            # passes over [batch, seq, vocab] float32 tensors, forward and backward
            self._compiled_kl = torch.compile(logits_kl)
        try:
            self._train_e2e(stage, start_step)
        finally:
            compile_blocks(self.model, False)
            self._compiled_kl = None

    def _train_e2e(self, stage: int, start_step: int) -> None:
        cfg = self.config
        sites = fake_quant_sites(self.model)
        evals = cfg.eval_every > 0
        if evals and start_step == 0:
            self.best = None
            self._evaluate(stage, 0)
        self.optimizer = self.make_optimizer(sites, self._pending_optimizer)
        self._pending_optimizer = None
        from tqdm.auto import tqdm

        bar = tqdm(range(start_step, cfg.e2e_steps), desc=f"stage {stage} end-to-end", disable=not self.progress)
        for step in bar:
            ids = self.data[self.batch_index(stage, 1, 0, step)].to(self.device)
            lv = float(self.train_step(self.e2e_loss, (ids,), step, cfg.e2e_steps))
            self.history.append({"stage": stage, "phase": "e2e", "block": 0, "step": step, "loss": lv})
            if evals and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.e2e_steps):
                self._evaluate(stage, step + 1)
                bar.set_postfix(kl=f"{lv:.4g}", heldout=f"{self.history[-1]['loss']:.4g}",
                                best=f"{self.best['loss']:.4g}@{self.best['step']}")
            else:
                bar.set_postfix(kl=f"{lv:.4g}")
            if step + 1 < cfg.e2e_steps and (self._at_limit() or (
                    cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)):
                self.state.update(phase="e2e", step=step + 1)
                self._checkpoint()
        bar.close()
        self._end_phase()
        if evals and cfg.keep_best and self.best is not None and self.best["step"] != cfg.e2e_steps:
            self._restore_best(stage)
        self.best = None

    # -- the schedule -----------------------------------------------------------------------------------
    def run(self, max_steps: int | None = None, seconds: float | None = None) -> nn.Module:
        """Run (or continue) the stages. ``max_steps`` stops early after that many optimizer
        steps of this call (in a block phase at the end of the block, end to end at once), with a
        checkpoint written there; ``seconds`` stops
        at the first end-to-end step or block end after that much time, with a checkpoint
        written there (a run that must fit a time limit, continued later with ``resume``)."""
        _require_step_budget(max_steps)
        self._budget, self._steps_done = max_steps, 0
        self._deadline = None if seconds is None else time.monotonic() + seconds
        self.interrupted = False
        try:
            self._run()
        except _Interrupted:
            self.interrupted = True
        return self.model

    def _out_of_time(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _at_limit(self) -> bool:
        """A limit of :meth:`run` is reached: its step budget or its deadline."""
        return (self._budget is not None and self._steps_done >= self._budget) or self._out_of_time()

    def _checkpoint(self, due: bool = True) -> None:
        """Write a checkpoint if one is ``due`` or a limit of :meth:`run` is reached; stop at a limit."""
        limit = self._at_limit()
        if limit and self.progress and self.out is not None:
            print(f"limit reached at {self.state}: writing the checkpoint", file=sys.stderr, flush=True)
        if due or limit:
            t0 = time.perf_counter()
            self.save_checkpoint()
            if limit and self.progress and self.out is not None:
                print(f"checkpoint written in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        if limit:
            raise _Interrupted

    def cannot_finish(self) -> str | None:
        """Why the run cannot be finished where it stands (None when it can): only its last
        stage can end early, earlier stages are at other formats than the recipe's."""
        cfg, stage = self.config, self.state["stage"]
        if stage < len(cfg.stages) and (stage != len(cfg.stages) - 1 or self.state["formats_stage"] != stage):
            return (f"the run is in stage {stage} ({cfg.stages[stage]}); it can only be finished early in "
                    f"its last stage ({cfg.stages[-1]}): continue it with resume")
        return None

    def finish(self) -> None:
        """End the run at its checkpoint: the end-to-end phase in progress ends now, at its best
        held-out evaluation with ``keep_best``, and the phases left are skipped. Only in the
        last stage (:meth:`cannot_finish`)."""
        cfg, stage = self.config, self.state["stage"]
        if stage >= len(cfg.stages):
            return
        reason = self.cannot_finish()
        if reason:
            raise ValueError(reason)
        if self.state["phase"] == "e2e" and cfg.keep_best and self.best is not None:
            self._restore_best(stage)
        self.best, self._pending_optimizer = None, None
        self.history.append({"stage": stage, "phase": "finish", "block": self.state["block"],
                             "step": self.state["step"], "loss": None})
        self.state.update(stage=stage + 1, phase="block", block=0, step=0)
        self.save_checkpoint()

    def _run(self) -> None:
        blocks = block_names(self.model)
        for stage in range(self.state["stage"], len(self.full_config.stages)):
            self.config = cfg = self.full_config.for_stage(stage)
            if self.state["formats_stage"] != stage:
                w, a = stage_formats(self.recipe, cfg.stages[stage])
                set_formats(self.model, w, a, refit=cfg.transition == "refit")
                self._take_pending_act_clips()
                self._learn_act_clips()
                self.state.update(formats_stage=stage, phase="block", block=0, step=0)
            self.state["stage"] = stage
            if self.state["phase"] == "block" and cfg.block_steps:
                for b in range(self.state["block"], len(blocks)):
                    self.train_block(blocks[b], stage, b, self.state["step"] if b == self.state["block"] else 0)
                    self.state.update(block=b + 1, step=0)
                    self._checkpoint(due=bool(cfg.checkpoint_every))
            self._carry = None
            if self.state["phase"] == "block":
                self.state.update(phase="e2e", step=0)
            if cfg.e2e_steps and self.state["step"] < cfg.e2e_steps:
                self.train_e2e(stage, self.state["step"])
            self.state.update(stage=stage + 1, phase="block", block=0, step=0)
            self._checkpoint()

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write the checkpoint: every file is written beside its place first, then all are
        renamed into place, ``state.json`` last, so a run killed while writing (a time limit)
        leaves the previous checkpoint whole."""
        if self.out is None:
            return
        from safetensors.torch import save_file

        self.out.mkdir(parents=True, exist_ok=True)
        files: dict[str, dict] = {}
        # the float weights (the teacher) are left out: a resumed run rebuilds them, bit for bit,
        # from the model and the recipe's passes (a fifth of the checkpoint's size)
        files["sites.safetensors"] = {f"{name}.{k}": v.detach().contiguous().cpu()
                                      for name, m in fake_quant_sites(self.model).items()
                                      for k, v in m.state_dict().items() if k not in _REBUILT}
        if self._norms:
            files["norms.safetensors"] = {n: p.detach().contiguous().cpu() for n, p in self._norms.items()}
        if not (self.out / "data.safetensors").exists():
            files["data.safetensors"] = {"ids": self._all_data.contiguous()}
        if self.state["stage"] >= len(self.config.stages):  # the run has ended: its latents, compact
            files[LATENTS_FILE] = self.latent_offsets()
        best_meta = None
        if self.best is not None:
            files["best.safetensors"] = {k: v.contiguous().cpu() for k, v in self.best["tensors"].items()}
            best_meta = {"loss": self.best["loss"], "step": self.best["step"]}
        opt_meta = None
        if self.optimizer is not None:
            files["optimizer.safetensors"], opt_meta = optimizer_state(self.optimizer)
        formats = {}
        for name, m in fake_quant_sites(self.model).items():
            formats = {"weight": m.weight_format.to_dict(), "act": m.act_format.to_dict() if m.act_format else None}
            break
        if formats.get("act"):  # each site's activation clip ratio (its own with act_clip_search)
            formats["act_clips"] = {name: m.current_act_format().clip
                                    for name, m in fake_quant_sites(self.model).items() if m.act_format is not None}
        state = {"state": self.state, "optimizer": opt_meta, "best": best_meta, "config": self.full_config.to_dict(),
                 "recipe": self.recipe.to_dict(), "formats": formats, "history": self.history,
                 "init_from": self.init_from,
                 "init_latents": self.init_latents,
                 "pending_act_clips": self.pending_act_clips,
                 "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
        for fname, tensors in files.items():
            meta = {"latent_bits": str(LATENT_BITS)} if fname == LATENTS_FILE else None
            save_file(tensors, str(self.out / (fname + ".tmp")), metadata=meta)
        (self.out / "state.json.tmp").write_text(json.dumps(state, indent=1))
        for fname in [*files, "state.json"]:
            (self.out / (fname + ".tmp")).replace(self.out / fname)

    def load_checkpoint(self) -> None:
        from safetensors.torch import load_file

        state = json.loads((self.out / "state.json").read_text())
        self.state = dict(state["state"])
        self.history = list(state["history"])
        self.config = self.full_config.for_stage(min(self.state["stage"], len(self.full_config.stages) - 1))
        self.pending_act_clips = dict(state.get("pending_act_clips") or {})
        f = state["formats"]
        if f:
            set_formats(self.model, QFormat.from_dict(f["weight"]), QFormat.from_dict(f["act"]) if f["act"] else None)
            for name, m in fake_quant_sites(self.model).items():
                if m.act_format is not None and name in f.get("act_clips", {}):
                    m.act_format = replace(m.act_format, clip=f["act_clips"][name])
            self._learn_act_clips()  # the saved stage may quantize activations the rebuilt one did not
        tensors = load_file(str(self.out / "sites.safetensors"), device=str(self.device))
        for name, m in fake_quant_sites(self.model).items():
            saved = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            missing, unexpected = m.load_state_dict(saved, strict=False)
            if unexpected or set(missing) - _REBUILT:
                raise ValueError(f"{self.out / 'sites.safetensors'}: site {name} does not match the rebuilt model "
                                 f"(missing {sorted(set(missing) - _REBUILT)}, unexpected {unexpected})")
        self.init_from = state.get("init_from")
        self.init_latents = state.get("init_latents")
        if (self.out / "norms.safetensors").exists():  # trained normalization weights
            self._track_norms()  # the rebuilt model's are the float ones: the teacher's
            norms = self._norms
            saved = load_file(str(self.out / "norms.safetensors"), device=str(self.device))
            if set(saved) != set(norms):
                raise ValueError(f"{self.out / 'norms.safetensors'}: normalization weights {sorted(saved)} do not "
                                 f"match the rebuilt model's {sorted(norms)}")
            with torch.no_grad():
                for n, v in saved.items():
                    norms[n].copy_(v)
        if state.get("best") is not None:
            self.best = dict(state["best"], tensors=load_file(str(self.out / "best.safetensors"),
                                                              device=str(self.device)))
        if state.get("optimizer") is not None:
            self._pending_optimizer = {"meta": state["optimizer"],
                                       "tensors": load_file(str(self.out / "optimizer.safetensors"),
                                                            device=str(self.device))}

    def start_from_artifact(self, directory: str | Path) -> None:
        """Start from a lowbit artifact instead of the prepared codes (a model trained and frozen
        before, whose training state is gone): every site takes the artifact's codes, group and
        global scales, bias and activation clip ratio, and the normalization weights the
        artifact's, so the student computes exactly the artifact's model. Sites whose activations
        the artifact leaves in float may take this run's activation format (and the clip ratio
        this run's preparation chose): a W2A16 model starts W2A2 training. The latent weight is
        the float weight wherever that rounds to the artifact's code and the code's value
        elsewhere (:meth:`FakeQuantLinear.load_qtensor`); the teacher stays this run's float
        model. Raises ValueError when the artifact cannot be a quantization of this model:
        other passes (weights in another basis), sites, formats or prologues, or unquantized
        tensors (embeddings, head) that differ (another source model)."""
        from .artifacts import load as load_artifact
        from .formats import QTensor
        from .quant_linear import QuantLinear
        from .sites import is_site_module

        directory = Path(directory)
        art = load_artifact(directory)  # checks the manifest, sizes and checksums first
        art_recipe = getattr(art, "lowbit_recipe", None)
        if art_recipe is None:
            raise ValueError(f"{directory}: the artifact records no recipe, so its passes are unknown")
        if [dict(p) for p in art_recipe.passes] != [dict(p) for p in self.recipe.passes]:
            raise ValueError(f"{directory}: the artifact was compiled with passes {art_recipe.passes}, this run "
                             f"uses {self.recipe.passes}: its weights are in another basis")
        sites = fake_quant_sites(self.model)
        art_sites = {n: m for n, m in art.named_modules() if is_site_module(m)}
        _require_same_sites(directory, "the artifact", art_sites, sites)
        for name, m in sites.items():
            ql = art_sites[name]
            if not isinstance(ql, QuantLinear):
                raise ValueError(f"{directory}: site {name} is a {type(ql).__name__}, not a QuantLinear")
            # float activations in the artifact may gain this run's activation format (a W2A16 model
            # starting W2A2 training); the other way round, or another activation format, is refused
            act_clip = m.act_format.clip if m.act_format is not None else None
            if ql.weight_format != m.weight_format or (ql.act_format is not None and m.act_format is None) or (
                    ql.act_format is not None and replace(ql.act_format, clip=act_clip) != m.act_format):
                raise ValueError(f"{directory}: site {name} holds {ql.weight_format.name} weights and "
                                 f"{ql.act_format.name if ql.act_format else 'float'} activations; this run starts "
                                 f"at {m.weight_format.name} and "
                                 f"{m.act_format.name if m.act_format else 'float'}")
            if [p.config() for p in ql.prologue] != [p.config() for p in m.prologue] or \
                    ql.weight_in_features != m.weight_in_features or ql.out_features != m.out_features or \
                    ql.packed_in_features != m.packed_in_features:
                raise ValueError(f"{directory}: site {name} has another shape or prologue than this model's")
        site_keys = tuple(name + "." for name in sites)
        norms = norm_weights(self.model)
        own = {k: v for k, v in self.model.state_dict().items() if not k.startswith(site_keys) and k not in norms}
        theirs = {k: v for k, v in art.state_dict().items() if not k.startswith(site_keys) and k not in norms}
        if set(own) != set(theirs):
            raise ValueError(f"{directory}: the artifact's unquantized tensors differ from this model's "
                             f"({sorted(set(own) ^ set(theirs))[:5]})")
        for k, v in own.items():
            a, b = theirs[k].to(self.device).double(), v.double()
            if a.shape != b.shape or (a.numel() and float((a - b).abs().max()) > 1e-3 * float(b.abs().max()) + 1e-6):
                raise ValueError(f"{directory}: {k} differs from this model's: the artifact was made from another "
                                 f"model")
        art_norms = norm_weights(art)
        self._track_norms()  # the float ones, for the teacher
        with torch.no_grad():
            for name, m in sites.items():
                ql = art_sites[name]
                k = m.packed_in_features
                codes = unpack_codes(ql.weight_packed.to(self.device), ql.weight_format.bits, k)
                m.load_qtensor(QTensor(codes, ql.weight_scales.to(self.device), ql.weight_global.to(self.device),
                                       m.weight_format), m.float_weight)
                if m.bias is not None:
                    m.bias.copy_(ql.bias.float())
                if m.act_format is not None and ql.act_format is not None:
                    m.act_format = ql.act_format
                    if m.act_clip_ratio is not None:  # a learned ratio starts at the artifact's
                        m.act_clip_ratio.fill_(ql.act_format.clip)
            for n, p in self._norms.items():
                p.copy_(art_norms[n].to(p))
        self.init_from = str(directory)

    def latent_offsets(self) -> dict[str, torch.Tensor]:
        """Every site's latent weight offsets (:meth:`FakeQuantLinear.latent_offsets`) at
        ``LATENT_BITS`` bits, packed as the formats pack codes: what a run that starts from this
        run's frozen model needs to start from its latent weights too (:meth:`load_latents`)."""
        return {name: pack_codes(m.latent_offsets(LATENT_BITS), LATENT_BITS).cpu()
                for name, m in fake_quant_sites(self.model).items()}

    def load_latents(self, path: str | Path) -> None:
        """Move the latent weights to the offsets in ``path`` (an ended run's
        ``latents.safetensors``) inside their current codes' intervals; after
        :meth:`start_from_artifact` with that run's model the student so continues from that
        run's latent weights, to within half a part (1/8 of a group step at 2 bits), and computes
        the same outputs."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            bits = (f.metadata() or {}).get("latent_bits")
        if bits is None:
            raise ValueError(f"{path}: not a file of latent offsets (no latent_bits in its metadata)")
        bits = int(bits)
        tensors = load_file(str(path))
        sites = fake_quant_sites(self.model)
        _require_same_sites(path, "the file", tensors, sites)
        for name, m in sites.items():
            packed = tensors[name]
            if tuple(packed.shape) != (m.out_features, m.packed_in_features * bits // 8):
                raise ValueError(f"{path}: site {name} has offsets for another shape ({tuple(packed.shape)})")
            m.set_latent_offsets(unpack_codes(packed.to(m.weight.device), bits, m.packed_in_features), bits)
        self.init_latents = str(path)


def _require_same_sites(source, what: str, theirs, ours) -> None:
    """Raise ValueError naming a few sites when ``theirs`` (from ``what`` at ``source``) and
    ``ours`` (this model's) hold other site names."""
    if set(theirs) != set(ours):
        raise ValueError(f"{source}: the sites of {what} differ from this model's (only in {what}: "
                         f"{sorted(set(theirs) - set(ours))[:5]}, only here: {sorted(set(ours) - set(theirs))[:5]})")


LATENTS_FILE = "latents.safetensors"  # written beside an ended run's checkpoint (Trainer.latent_offsets)
LATENT_BITS = 2  # 4 parts of a code's interval, a quarter byte per weight (on stories260K as good as 16, docs/qat.md)
_REBUILT = {"float_weight"}  # site buffers a checkpoint does not hold (rebuilt on resume)


def logits_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Distillation loss: KL(p_t || p_s) with ``p = softmax(logits / temperature)`` over the last
    axis, averaged over the other positions, times ``temperature ** 2`` (so that its gradients
    keep their scale across temperatures); computed in float32."""
    logp_t = F.log_softmax(teacher.float() / temperature, -1)
    logp_s = F.log_softmax(student.float() / temperature, -1)
    return (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean() * (temperature * temperature)


def hash_key(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An optimizer's state as (tensors for safetensors, JSON-able metadata)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    groups = [{k: (float(v) if torch.is_tensor(v) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, saved: dict) -> None:
    state: dict = {}
    for key, v in saved["tensors"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in saved["meta"]["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": saved["meta"]["param_groups"]})


# the recipe fields a trained model depends on; the others (name, weight method and options, clip
# searches) only choose the start, which a resumed run does not repeat
_TRAINED_RECIPE_FIELDS = ("weight", "activation", "passes", "ignore", "overrides")


def _check_resumed_recipe(recipe: Recipe, saved: dict | None, out: Path) -> None:
    """Refuse to resume a checkpoint under another recipe: its site tensors would be loaded into
    a model of other passes (another basis) or formats, with no error from the shapes."""
    if saved is None:
        return
    ours = json.loads(json.dumps(recipe.to_dict()))
    differ = [k for k in _TRAINED_RECIPE_FIELDS if ours[k] != saved.get(k)]
    if differ:
        detail = "; ".join(f"{k}: {saved.get(k)} there, {ours[k]} here" for k in differ)
        raise ValueError(f"{out}: the checkpoint was trained with recipe {saved.get('name')!r}, and this run's "
                         f"{recipe.name!r} differs ({detail}); resume with the checkpoint's recipe "
                         f"(`lowbit train --resume` without --recipe, --passes and --gptq takes it)")


def train(model: nn.Module, recipe="w2a16", data: torch.Tensor | None = None, config: TrainConfig | None = None,
          calibration=None, out: str | Path | None = None, resume: bool = False, progress: bool = True,
          max_steps: int | None = None, seconds: float | None = None, finish: bool = False,
          init_from: str | Path | None = None, finish_at_limit: bool = False,
          init_latents: str | Path | None = None) -> nn.Module:
    """Quantization-aware training of ``model`` (float, not modified) for ``recipe``.

    ``data``: [S, T] token ids (see :func:`training_data`); on resume it is read from the
    checkpoint. ``calibration``: token ids for the recipe's calibrated passes and GPTQ
    (default: the first rows of ``data``). ``seconds``: stop at the first end-to-end step or
    block end once this long has passed since the call (preparing the model, GPTQ included,
    counts), with a checkpoint written there. ``init_from``: a lowbit artifact of this model
    and recipe (an earlier run's result) to start from instead of the recipe's weight method
    (:meth:`Trainer.start_from_artifact`); ``init_latents``: with ``init_from``, the
    ``latents.safetensors`` that the artifact's run left beside its checkpoint, so the latent
    weights start where that run left them (:meth:`Trainer.load_latents`).
    ``finish_at_limit``: when ``max_steps`` or ``seconds`` stops the run in its last stage, end
    it there as ``finish`` would, in the same call (earlier stages are left at their checkpoint,
    with a warning). Returns the trained model with FakeQuantLinear sites; :func:`lowbit.freeze`
    packs it.
    """
    import copy

    # the time limit counts from here: preparing the model (GPTQ, minutes on a real one) uses it too
    deadline = None if seconds is None else time.monotonic() + seconds
    recipe = get_recipe(recipe)
    config = config or TrainConfig.from_recipe(recipe)
    if not config.stages:  # a config made by hand: one stage at the recipe's own formats
        config = replace(config, stages=[recipe_stage(recipe)])
    if stage_formats(recipe, config.stages[-1]) != (recipe.weight, recipe.activation):
        raise ValueError(f"the last stage {config.stages[-1]!r} must be the recipe's formats ({recipe_stage(recipe)})")
    out = Path(out) if out else None
    _require_step_budget(max_steps)
    if resume and init_from is not None:
        raise ValueError("init_from starts a new run; a resumed one continues from its checkpoint")
    if init_latents is not None and init_from is None:
        raise ValueError("init_latents moves the latent weights of a run started with init_from: give both")
    if resume:
        if out is None or not (out / "state.json").exists():
            raise FileNotFoundError(f"no checkpoint to resume from in {out}")
        from safetensors.torch import load_file

        data = load_file(str(out / "data.safetensors"))["ids"]
        saved = json.loads((out / "state.json").read_text())
        config = TrainConfig(**saved["config"])
        _check_resumed_recipe(recipe, saved.get("recipe"), out)
    if data is None:
        raise ValueError("train needs data: token ids from lowbit.train.training_data(...)")
    if calibration is None:
        calibration = data[: min(len(data), 8)]
    first = stage_recipe(recipe, config.stages[0])
    if resume:
        # the structure comes from the passes; the values (clip ratios too) from the checkpoint
        first = replace(first, weight_method="rtn", clip_search=False, act_clip_search=[])
    elif init_from is not None:
        # the weights come from the artifact (no GPTQ); the activation clip search stays, on the
        # recipe's RTN weights, for the sites whose activations the artifact leaves in float
        # (elsewhere the artifact's ratio replaces its choice, so with none left it is skipped, and
        # the weight clip search with it: every code is replaced)
        first = replace(first, weight_method="rtn")
        art_sites = json.loads((Path(init_from) / "manifest.json").read_text()).get("sites", {})
        if art_sites and all(site.get("act_format") for site in art_sites.values()):
            first = replace(first, act_clip_search=[], clip_search=False)
    pending_search = None
    if not resume and init_from is None and first.activation is None and recipe.act_clip_search:
        # a later stage brings in activation quantization: its clip search runs now, on the prepared
        # weights and the calibration data, and the first stage leaves the activations in float
        later = [stage_formats(recipe, spec)[1] for spec in config.stages[1:]]
        pending_search = next((a for a in later if a is not None), None)
        if pending_search is not None:
            first = replace(first, activation=pending_search, act_clip_search=list(recipe.act_clip_search))
    # compiled on the CPU (the passes' calibration runs there), then moved to the model's device
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    # a rebuild's site values are replaced, so the report's per-site errors would only cost time
    student = prepare_qat(copy.deepcopy(model).cpu(), first, calibration=calibration.cpu(), inplace=True,
                          progress=progress, measure_errors=not (resume or init_from is not None)).to(device)
    pending_clips = {}
    if pending_search is not None:
        pending_clips = {name: m.act_format.clip for name, m in fake_quant_sites(student).items()
                         if m.act_format is not None}
        set_formats(student, first.weight, None)
    trainer = Trainer(student, recipe, config, data.to(torch.long), out=out, progress=progress)
    trainer.pending_act_clips = pending_clips
    if init_from is not None:
        trainer.start_from_artifact(init_from)
        if init_latents is not None:
            trainer.load_latents(init_latents)
    if progress:
        how = f"from {init_from}" if init_from is not None else first.weight_method
        print(f"{'rebuilt' if resume else 'prepared'} the trainable model ({how}) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if resume:
        trainer.load_checkpoint()
    if finish:
        if not resume:
            raise ValueError("finish=True ends a run from its checkpoint: it needs resume=True")
        trainer.finish()
    else:
        trainer.run(max_steps=max_steps, seconds=None if deadline is None else deadline - time.monotonic())
        if finish_at_limit and trainer.interrupted:
            reason = trainer.cannot_finish()
            if reason:
                warnings.warn(f"the limit came before the last stage, so the run stays at its checkpoint: {reason}")
            else:
                trainer.finish()
    student.lowbit_recipe = recipe
    student.lowbit_train_history = trainer.history
    return student
