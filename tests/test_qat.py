"""Quantization-aware training: fake-quant gradients, freezing, nested stages, training, resume."""
from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.formats import QFormat, dequantize_codes, effective_scales, quantize_codes, quantize_weight_rtn
from lowbit.prologue import ChannelSplitPrologue, HadamardPrologue
from lowbit.qat import (FakeQuantLinear, fake_quant_sites, fake_quantize_weight, float_mode, freeze, prepare_qat,
                        set_formats)
from lowbit.quant_linear import QuantLinear
from lowbit.train import LATENT_BITS, Trainer, TrainConfig, norm_weights, train


def _site(n, k, wfmt, afmt=None, prologue=None, in_features=None, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    ql = QuantLinear.from_weight(w, b, wfmt, afmt, in_features=in_features, prologue=prologue)
    return FakeQuantLinear.from_quant_linear(ql, w), ql, w


@pytest.mark.parametrize("grid", ["int", "half"])
def test_weight_fake_quant_values_and_ste_lsq_gradients(grid):
    """Forward = formats' quantize/dequantize; gradients = a plain float64 STE written with
    detach() (a different construction), for the latent weight and the group scales."""
    fmt = QFormat(2, grid, 16, "e4m3")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 64, generator=g, dtype=torch.float64).float()
    qt = quantize_weight_rtn(w, fmt)
    eff = effective_scales(qt.scales, qt.global_scale) * torch.empty(6, 4).uniform_(0.5, 1.2, generator=g)
    upstream = torch.randn(6, 64, generator=g)

    w1, s1 = w.clone().requires_grad_(), eff.clone().requires_grad_()
    out = fake_quantize_weight(w1, s1, fmt)
    assert torch.equal(out, dequantize_codes(quantize_codes(w, eff, fmt), eff, fmt))
    (out * upstream).sum().backward()

    w2, s2 = w.double().clone().requires_grad_(), eff.double().clone().requires_grad_()
    r = w2.view(6, 4, 16) / s2.unsqueeze(-1)
    rounded = torch.floor(r) + 0.5 if grid == "half" else torch.round(r)
    levels = (r + (rounded - r).detach()).clamp(fmt.level_lo, fmt.level_hi)
    ((levels * s2.unsqueeze(-1)).view(6, 64) * upstream.double()).sum().backward()
    assert torch.allclose(w1.grad.double(), w2.grad, atol=1e-6)
    assert torch.allclose(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-5)
    # both kinds of element occur: clipped ones (no weight gradient) and inside ones
    assert (w1.grad == 0).any() and (w1.grad != 0).any()


def test_scale_gradient_matches_finite_differences_when_no_code_moves():
    """With the codes fixed (a step too small to move any), W_q = q * s and dW_q/ds = q: the
    part of LSQ's gradient a finite difference can see. The rest (-r) is the STE term."""
    fmt = QFormat(4, "int", 16, "fp32")
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 32, generator=g, dtype=torch.float64).float()
    eff = effective_scales(quantize_weight_rtn(w, fmt).scales, torch.tensor(1.0)) * 0.93  # some clip
    s = eff.clone().requires_grad_()
    fake_quantize_weight(w, s, fmt).sum().backward()
    q = quantize_codes(w, eff, fmt).float().view(3, 2, 16)
    r = w.view(3, 2, 16) / eff.unsqueeze(-1)
    h = 1e-4 * eff
    fd = (dequantize_codes(quantize_codes(w, eff + h, fmt), eff + h, fmt)
          - dequantize_codes(quantize_codes(w, eff - h, fmt), eff - h, fmt)).view(3, 2, 16).sum(-1) / (2 * h)
    assert torch.equal(quantize_codes(w, eff + h, fmt), quantize_codes(w, eff - h, fmt))
    assert torch.allclose(fd, q.sum(-1), rtol=1e-3, atol=1e-3)
    inside = (r >= fmt.level_lo - 0.5) & (r < fmt.level_hi + 0.5)
    assert torch.allclose(s.grad, q.sum(-1) - (r * inside).sum(-1), rtol=1e-4, atol=1e-4)


def test_stored_scales_are_e4m3_values_and_log_scale_gradient():
    fq, _, _ = _site(8, 48, QFormat(2, "int", 16, "e4m3"))
    with torch.no_grad():
        fq.log_scale.add_(torch.randn_like(fq.log_scale) * 0.1)
    s = fq.stored_scales()
    assert torch.equal(s, s.to(torch.float8_e4m3fn).float())
    assert float(s.detach().max()) <= 224.0
    fq.quantized_weight().sum().backward()
    # chain rule through exp and the straight-through E4M3 rounding: dL/dt = dL/ds * g * exp(t)
    eff = fq.eff_scales().detach().requires_grad_()
    fake_quantize_weight(fq.weight.detach(), eff, fq.weight_format).sum().backward()
    expect = eff.grad * fq.weight_global * torch.exp(fq.log_scale.detach()) * fq.live_groups
    assert torch.allclose(fq.log_scale.grad, expect, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("act_bits,act_grid,clip", [(0, "int", 1.0), (2, "int", 1.0), (2, "half", 0.6)])
def test_freeze_is_exact_against_reference_qlinear(act_bits, act_grid, clip):
    """After arbitrary training updates, the frozen QuantLinear (reference qlinear op) gives
    the same fp32 numbers as the FakeQuantLinear; prologues (Hadamard, channel split),
    padding (K=40 -> 48) and a clipped activation format included."""
    wfmt = QFormat(2, "int", 16, "e4m3")
    afmt = QFormat(act_bits, act_grid, 16, "e4m3", clip) if act_bits else None
    split = ChannelSplitPrologue(32, 40, index=torch.cat([torch.arange(32), torch.arange(8)]),
                                 scale=torch.cat([torch.ones(32), torch.ones(8)]))
    fq, ql, _ = _site(24, 40, wfmt, afmt, prologue=[HadamardPrologue(32), split], in_features=32)
    x = torch.randn(5, 7, 32)
    assert torch.equal(fq(x), ql(x))  # the trainable twin starts at the compiled codes
    with torch.no_grad():
        fq.weight.add_(torch.randn_like(fq.weight) * 0.02)
        fq.log_scale.add_(torch.randn_like(fq.log_scale) * 0.2)
    y = fq(x)
    frozen = fq.to_quant_linear()
    assert torch.equal(frozen(x), y)
    xp = x
    for op in frozen.prologue:
        xp = op(xp)
    ref = torch.ops.lowbit.qlinear(xp, frozen.weight_packed, frozen.weight_scales, frozen.weight_global, frozen.bias,
                                   2, "int", 16, "e4m3", act_bits, act_grid, 16, "e4m3", clip)
    assert torch.equal(ref, y)
    assert frozen.weight_scales.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("grid", ["int", "half"])
def test_clipped_activation_fake_quant_value_and_gradient(grid):
    """A clipped activation format: the fake-quant value is the op's, and the gradient is a
    float64 straight-through estimate written out here: 1 inside the grid's range, 0 where the
    element is clamped to an end level (some are, at clip 0.5)."""
    from lowbit.qat import fake_quantize_act

    fmt = QFormat(2, grid, 16, "e4m3", 0.5)
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(3)) * 3).requires_grad_()
    y = fake_quantize_act(x, fmt)
    assert torch.equal(y.detach(), lowbit.ops.fake_quantize_act(x.detach(), fmt))
    g = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    y.backward(g)
    _, stored, gscale = torch.ops.lowbit.quantize_act(x.detach(), 2, grid, 16, "e4m3", 0.5)
    eff = (stored.double() * gscale.double()).repeat_interleave(16, -1)
    r = x.detach().double() / eff
    lo, hi = (fmt.qmin, fmt.qmax + 1) if grid == "half" else (fmt.qmin - 0.5, fmt.qmax + 0.5)
    inside = (r >= lo) & ((r < hi) if grid == "half" else (r <= hi))
    assert 0 < (~inside).sum() < inside.sum()
    assert torch.equal(x.grad, torch.where(inside, g.double(), 0.0).float())
    with pytest.raises(ValueError, match="activation format"):
        lowbit.Recipe("bad", fmt)


@pytest.mark.parametrize("grid", ["int", "half"])
def test_learned_activation_clip_value_and_gradient(grid):
    """A learned clip ratio (an fp32 tensor): the values are the op's with ``clip=float(ratio)``
    for many ratios, and the ratio's gradient equals a float64 LSQ construction written out here
    (straight-through rounding, clamp to the end levels, global scale times the ratio)."""
    from lowbit.qat import fake_quantize_act

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 64, generator=gen) * torch.rand(6, 1, generator=gen) * 4
    for ratio in torch.rand(40, generator=gen) * 0.95 + 0.05:
        fmt = QFormat(2, grid, 16, "e4m3")
        c = ratio.clone().requires_grad_()
        y = fake_quantize_act(x, fmt, c)
        assert torch.equal(y.detach(), lowbit.ops.fake_quantize_act(x, QFormat(2, grid, 16, "e4m3", float(ratio))))
    g = torch.randn(6, 64, generator=gen)
    c = torch.tensor(0.45, requires_grad=True)
    xg = x.clone().requires_grad_()
    fake_quantize_act(xg, QFormat(2, grid, 16, "e4m3"), c).backward(g)
    _, stored, gscale = torch.ops.lowbit.quantize_act(x, 2, grid, 16, "e4m3", 1.0)
    c64 = torch.tensor(0.45, dtype=torch.float64, requires_grad=True)
    eff = (stored.double() * gscale.double() * c64).repeat_interleave(16, -1)
    r = x.double() / eff
    rounded = torch.floor(r) + 0.5 if grid == "half" else torch.round(r)
    fmt = QFormat(2, grid, 16, "e4m3")
    levels = (r + (rounded - r).detach()).clamp(fmt.level_lo, fmt.level_hi)
    ((levels * eff) * g.double()).sum().backward()
    assert float(c.grad) == pytest.approx(float(c64.grad), rel=1e-4)
    assert (xg.grad == 0).any() and (xg.grad != 0).any()  # some elements clip at 0.45


def test_nested_stage_transition_carries_codes():
    fq, _, _ = _site(16, 64, QFormat(4, "int", 16, "e4m3"), seed=3)
    with torch.no_grad():
        fq.weight.add_(torch.randn_like(fq.weight) * 0.01)
    q4 = fq.codes()
    g4, s4 = fq.weight_global.clone(), fq.stored_scales().detach()
    fq.set_formats(QFormat(2, "int", 16, "e4m3"))
    # independent formula: round half up of q4 / 4, clamped to the 2-bit range
    expect = torch.floor((q4.double() + 2) / 4).clamp(-2, 1)
    assert torch.equal(fq.codes().double(), expect)
    factor = 4.0 if float(s4.max()) <= 224 else 8.0
    assert torch.equal(fq.weight_global, g4 * factor)
    assert torch.equal(fq.stored_scales().detach(), s4 * 4.0 / factor)
    # refit: the latent weight stays, the scales are searched anew (RTN with clipping search)
    latent = fq.weight.detach().clone()
    fq.set_formats(QFormat(3, "int", 16, "e4m3"), refit=True)
    assert torch.equal(fq.weight.detach(), latent)
    assert torch.equal(fq.codes(), quantize_weight_rtn(latent, QFormat(3, "int", 16, "e4m3")).codes)


def _tiny_llama(seed=0, layers=2):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_prepare_qat_matches_compiled_model_and_composes_with_passes():
    model = _tiny_llama()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    recipe = lowbit.get_recipe("w2a2").with_passes({"name": "rotate"}, {"name": "split_outliers"})
    ref = lowbit.compile_quantized(model, recipe, calibration=ids, progress=False)
    qm = prepare_qat(model, recipe, calibration=ids, progress=False)
    sites = fake_quant_sites(qm)
    assert len(sites) == 14 and any(len(m.prologue) for m in sites.values())
    with torch.no_grad():
        assert torch.equal(qm(ids).logits, ref(ids).logits)
        with float_mode(qm):  # the rotated, split float model: the original up to float rounding
            assert torch.allclose(qm(ids).logits, model(ids).logits, atol=1e-4)
        frozen = freeze(copy.deepcopy(qm))
        assert not fake_quant_sites(frozen)
        assert torch.equal(frozen(ids).logits, ref(ids).logits)


def _stories_data():
    from lowbit.llama2c import shared_data_dir

    d = shared_data_dir()
    if d is None or not (d / "stories260K" / "stories260K.bin").is_file():
        pytest.skip("stories260K is not in the shared data folder (../shared/data)")
    from lowbit.calibration import from_text
    from lowbit.models import load_model

    model, tok = load_model("stories260k")
    data = from_text(tok, d / "text" / "tinystories_val_head.txt", samples=4, seq_len=32, seed=0)
    return model, data


def test_train_stories260k_w2a16_loss_drops():
    model, data = _stories_data()
    recipe = lowbit.get_recipe("w2a16")
    cfg = TrainConfig(stages=["w2"], block_steps=3, e2e_steps=6, batch_size=2, seed=0)
    student = prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], inplace=True, progress=False)
    trainer = Trainer(student, recipe, cfg, data, progress=False)
    probe = data[:2]
    with torch.no_grad():
        before = float(trainer.e2e_loss(probe))
    trainer.run()
    with torch.no_grad():
        after = float(trainer.e2e_loss(probe))
    blocks = [h for h in trainer.history if h["phase"] == "block"]
    assert len(blocks) == 5 * 3 and len(trainer.history) == 5 * 3 + 6
    first = [h["loss"] for h in blocks if h["step"] == 0]
    last = [h["loss"] for h in blocks if h["step"] == 2]
    assert sum(last) < sum(first)          # block reconstruction improves the blocks
    assert after < 0.8 * before, (before, after)   # and the KL to the float model drops


def test_warmup_ramp_and_gradient_clipping():
    """Learning rate = base * ramp * cosine (computed here from the formula); with clipping on,
    the gradients an optimizer step sees have at most the clip norm, and training still runs."""
    import math

    model = _tiny_llama(2)
    data = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(2))
    recipe = lowbit.get_recipe("w2a16")
    cfg = TrainConfig(stages=["w2"], e2e_steps=20, batch_size=2, warmup=0.25, grad_clip=1e-3)
    student = prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], inplace=True, progress=False)
    trainer = Trainer(student, recipe, cfg, data, progress=False)
    trainer.optimizer = trainer.make_optimizer(fake_quant_sites(student))
    base = [g["base_lr"] for g in trainer.optimizer.param_groups]
    for step in (0, 2, 4, 5, 12, 19):
        trainer.set_lr(step, 20)
        ramp = min(1.0, (step + 1) / 6) if step < 5 else 1.0
        want = ramp * 0.5 * (1 + math.cos(math.pi * step / 20))
        for g, b in zip(trainer.optimizer.param_groups, base):
            assert trainer.optimizer.lr_of(g) == pytest.approx(b * want, rel=1e-12)
    seen = []
    orig_step = trainer.optimizer.step

    def spy(*a, **k):
        grads = [p.grad for g in trainer.optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))
        return orig_step(*a, **k)

    trainer.optimizer.step = spy
    trainer._steps_done = 0
    trainer.train_step(trainer.e2e_loss, (data[:2],), 0, 20)
    assert seen and seen[0] <= 1e-3 * (1 + 1e-5)
    trainer.optimizer = None
    trainer.run()
    assert len(trainer.history) == 20 and all(math.isfinite(h["loss"]) for h in trainer.history)


def test_hidden_weight_adds_the_blocks_relative_output_error():
    """``hidden_weight``: the end-to-end loss is the logits' KL plus w times the mean over the
    decoder blocks of ||h_student - h_teacher||^2 / ||h_teacher||^2, the last block's output taken
    after the final norm. Checked against outputs caught by forward hooks on the blocks, the
    float model's taken from a copy made before quantization, in float64; the held-out KL leaves
    the term out."""
    model = _tiny_llama(7, layers=3)
    teacher = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(7))
    recipe = lowbit.get_recipe("w2a2")
    student = prepare_qat(model, recipe, calibration=ids, progress=False)
    trainer = Trainer(student, recipe, TrainConfig(stages=["w2a2"], hidden_weight=0.7, batch_size=2), ids,
                      progress=False)

    def outputs(m):
        caught = []
        hooks = [blk.register_forward_hook(lambda mod, a, out: caught.append(out[0] if isinstance(out, tuple) else out))
                 for blk in list(m.model.layers)[:-1]] + \
            [m.model.norm.register_forward_hook(lambda mod, a, out: caught.append(out))]
        with torch.no_grad():
            logits = m(ids, use_cache=False).logits
        for h in hooks:
            h.remove()
        return logits.double(), [c.double() for c in caught]

    t_logits, t_hidden = outputs(teacher)
    s_logits, s_hidden = outputs(student)
    logp_t, logp_s = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
    kl = float((logp_t.exp() * (logp_t - logp_s)).sum(-1).mean())
    rel = [float(((s - t) ** 2).mean() / (t ** 2).mean()) for s, t in zip(s_hidden, t_hidden)]
    assert len(rel) == 3 and min(rel) > 1e-4
    with torch.no_grad():
        assert float(trainer.e2e_loss(ids)) == pytest.approx(kl + 0.7 * sum(rel) / 3, rel=1e-4)
        assert float(trainer.e2e_loss(ids, hidden=False)) == pytest.approx(kl, rel=1e-4)
    trainer.eval_data = ids
    assert trainer.heldout_kl() == pytest.approx(kl, rel=1e-4)


def test_keep_best_ends_the_phase_at_the_lowest_heldout_kl():
    """A step size that wrecks the model: with keep_best the end-to-end phase ends at the best
    held-out KL it measured (here the start: the site tensors come back bit for bit);
    without it the phase ends at its last, worse, state. Held-out rows are never trained on."""
    model = _tiny_llama(3)
    data = torch.randint(0, 96, (10, 16), generator=torch.Generator().manual_seed(3))
    recipe = lowbit.get_recipe("w2a16")
    ends = {}
    for keep in (True, False):
        cfg = TrainConfig(stages=["w2"], e2e_steps=6, batch_size=2, holdout=4, eval_every=2, keep_best=keep,
                          lr=50.0, scale_lr=1.0)
        student = prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], inplace=True, progress=False)
        trainer = Trainer(student, recipe, cfg, data, progress=False)
        assert trainer.data.shape[0] == 6 and torch.equal(trainer.eval_data, data[6:])
        start = {k: v.clone() for k, v in trainer._site_tensors().items()}
        trainer.run()
        evals = [h for h in trainer.history if h["phase"] == "eval"]
        assert [h["step"] for h in evals] == [0, 2, 4, 6]
        final = trainer.heldout_kl()
        best = min(h["loss"] for h in evals)
        ends[keep] = final
        if keep:
            assert final == pytest.approx(best, rel=1e-6)
            if evals[0]["loss"] == best:
                assert all(torch.equal(v, start[k]) for k, v in trainer._site_tensors().items())
        else:
            assert final == pytest.approx(evals[-1]["loss"], rel=1e-6)
    assert ends[True] < ends[False]
    with pytest.raises(ValueError, match="held-out"):
        Trainer(prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], progress=False), recipe,
                TrainConfig(stages=["w2"], eval_every=2), data, progress=False)


@pytest.mark.skipif(not any(__import__("shutil").which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_end_to_end_steps_match_eager():
    """compile=True runs the end-to-end steps with each block compiled (rotated sites included:
    the Hadamard op's base matrix enters the trace as a constant); the losses and the trained
    latent weights stay within float rounding of the eager run. The blocks share their compiled
    graphs: a model of 4 blocks traces the same graphs as one of 2, and after the phase the
    blocks are plain eager modules again."""
    from torch._dynamo.utils import counters

    recipe = lowbit.get_recipe("w2a16").with_passes({"name": "rotate"})
    data = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(4))
    graphs = {}
    for layers in (2, 4):
        model = _tiny_llama(4, layers)
        runs = {}
        for comp in (False, True):
            cfg = TrainConfig(stages=["w2"], e2e_steps=2, batch_size=2, compile=comp, holdout=2, eval_every=1)
            student = prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], inplace=True, progress=False)
            trainer = Trainer(student, recipe, cfg, data, progress=False)
            torch._dynamo.reset()
            counters.clear()
            trainer.run()
            graphs[layers] = (counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"])
            runs[comp] = ([(h["phase"], h["loss"]) for h in trainer.history], fake_quant_sites(student))
            assert all(getattr(b, "_compiled_call_impl", None) is None for b in student.model.layers)
        (he, se), (hc, sc) = runs[False], runs[True]
        assert [p for p, _ in he] == [p for p, _ in hc] and [p for p, _ in he].count("e2e") == 2
        le, lc = [v for _, v in he], [v for _, v in hc]
        assert min(le) > 0 and lc == pytest.approx(le, rel=1e-3)
        start = fake_quant_sites(prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], inplace=True,
                                             progress=False))
        for name in se:
            assert torch.allclose(sc[name].weight, se[name].weight, rtol=1e-4, atol=1e-6), name
            # both runs trained the site (torch 2.11 compiled zero gradients for autograd Functions)
            for p in ("weight", "log_scale"):
                moved = (getattr(se[name], p) - getattr(start[name], p)).abs().max()
                assert moved > 0 and (getattr(sc[name], p) - getattr(start[name], p)).abs().max() > 0.5 * moved, name
    # the same graphs, as many traced calls, for twice the blocks (a whole-model trace would grow)
    assert graphs[4] == graphs[2] and graphs[2][0] > 0


def test_compiled_steps_train_learned_activation_clip_ratios_like_eager():
    """compile=True on a W2A2 model whose sites learn their clip ratios: the losses, and the
    ratios the steps moved, stay close to the eager run's (float rounding flips a few 2-bit
    activation codes)."""
    recipe = lowbit.get_recipe("w2a2-half")
    data = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(7))
    model = _tiny_llama(7)
    prepared = prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], inplace=True, progress=False)
    runs = {}
    for comp in (False, True):
        cfg = TrainConfig(stages=["w2a2"], e2e_steps=3, batch_size=2, compile=comp, act_clip_lr=0.02)
        student = copy.deepcopy(prepared)
        trainer = Trainer(student, recipe, cfg, data, progress=False)
        torch._dynamo.reset()
        trainer.run()
        runs[comp] = ([h["loss"] for h in trainer.history],
                      {n: float(m.act_clip().detach()) for n, m in fake_quant_sites(student).items()})
    (le, ce), (lc, cc) = runs[False], runs[True]
    # the first loss: the same tensors, compiled blocks and KL against eager (this tiny model's KL is
    # ~5e-4, where float32 cancellation over the vocabulary alone is ~1e-3 of it); later steps: 2-bit
    # activations, where a float rounding that flips a code moves the loss more than at W2A16
    assert lc[0] == pytest.approx(le[0], rel=2e-3)
    assert lc == pytest.approx(le, rel=5e-2)
    start = {n: m.act_format.clip for n, m in fake_quant_sites(prepared).items()}
    moved = [abs(ce[n] - start[n]) for n in start]
    assert sum(d > 1e-3 for d in moved) > len(moved) // 2
    assert all(abs(cc[n] - ce[n]) <= 0.05 * abs(ce[n] - start[n]) + 1e-6 for n in start)


def test_blocks_called_without_a_mask_attend_causally():
    """With ``drop_mask`` the blocks of an SDPA model get ``attention_mask=None`` even when the
    model built a mask (as Hugging Face models do while a CUDA graph is being captured; here a
    prepared 4-D causal mask forces one), and the logits equal those of the same model in eager
    attention with its own mask (a different attention implementation). Models where a missing
    mask would not mean full causal attention keep theirs."""
    from lowbit.train import causal_mask_droppable, compile_blocks

    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    model = prepare_qat(_tiny_llama(3), lowbit.get_recipe("w2a16"), calibration=ids, progress=False)
    causal = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 1, 12, 12)
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "eager"
    assert causal_mask_droppable(model) and not causal_mask_droppable(reference)
    windowed = copy.deepcopy(model)
    windowed.config.sliding_window = 4
    assert not causal_mask_droppable(windowed)

    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
             for b in model.model.layers]
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
        compile_blocks(model, True, compile=False, drop_mask=True)
        got = model(ids, attention_mask=causal, use_cache=False).logits
        assert seen and all(m is None for m in seen)
        compile_blocks(model, False)
        seen.clear()
        masked = model(ids, attention_mask=causal, use_cache=False).logits
        assert seen and all(m is not None for m in seen)
    for h in hooks:
        h.remove()
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(masked, want, atol=1e-5)


@pytest.mark.parametrize("evaluation,rotated", [({}, False),
                                                 (dict(holdout=2, eval_every=1, lr=0.5, norm_lr=0.05), True)])
def test_resume_from_checkpoint_gives_the_same_state(tmp_path, evaluation, rotated):
    """Interrupted and resumed twice = uninterrupted, bit for bit; with held-out evaluation the
    best-so-far site tensors travel in the checkpoint too (a large step size makes the best
    one an earlier step, so the phase end restores it). The checkpoint leaves out the float
    weights, which the resumed run rebuilds (here after a rotation, from a GPTQ start that
    the rebuild does not repeat)."""
    model = _tiny_llama(1)
    data = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))
    recipe = lowbit.get_recipe("w2a16")
    if rotated:
        recipe = recipe.with_passes({"name": "rotate"}).with_gptq()
    cfg = TrainConfig(stages=["w4", "w2"], block_steps=2, e2e_steps=4, batch_size=2, checkpoint_every=2,
                      **evaluation)
    full = train(model, recipe, data, copy.deepcopy(cfg), out=tmp_path / "a", progress=False)
    # stop after the first block of the second stage, resume; stop mid-way through its
    # end-to-end phase (optimizer state saved), resume to the end
    train(model, recipe, data, copy.deepcopy(cfg), out=tmp_path / "b", progress=False, max_steps=4 + 4 + 2)
    state = json.loads((tmp_path / "b" / "state.json").read_text())["state"]
    assert state["stage"] == 1 and state["phase"] == "block" and state["block"] == 1
    train(model, recipe, out=tmp_path / "b", resume=True, progress=False, max_steps=2 + 2)
    state = json.loads((tmp_path / "b" / "state.json").read_text())["state"]
    assert state["stage"] == 1 and state["phase"] == "e2e" and state["step"] == 2
    assert (tmp_path / "b" / "optimizer.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "b" / "sites.safetensors"), framework="pt") as f:
        saved = list(f.keys())
    assert any(k.endswith(".weight") for k in saved) and not any(k.endswith(".float_weight") for k in saved)
    if evaluation:
        assert (tmp_path / "b" / "best.safetensors").is_file()
    resumed = train(model, recipe, out=tmp_path / "b", resume=True, progress=False)
    assert [(h["phase"], h["loss"]) for h in resumed.lowbit_train_history] == \
        [(h["phase"], h["loss"]) for h in full.lowbit_train_history]
    if evaluation:
        assert any(h["phase"] == "restore" for h in full.lowbit_train_history)
    if cfg.norm_lr:  # trained normalization weights travel in the checkpoint (and the best state)
        assert (tmp_path / "b" / "norms.safetensors").is_file()
        na, nb = norm_weights(full), norm_weights(resumed)
        assert any(not torch.equal(p, norm_weights(model)[n]) for n, p in na.items())
        assert all(torch.equal(na[n], nb[n]) for n in na)
    a, b = fake_quant_sites(full), fake_quant_sites(resumed)
    for name in a:
        assert a[name].weight_format == b[name].weight_format == recipe.weight
        for k, v in a[name].state_dict().items():
            assert torch.equal(v, b[name].state_dict()[k]), (name, k)


def test_trained_normalization_weights_leave_the_teacher_float(tmp_path):
    """With ``norm_lr`` the normalization weights train (in the block phase those of the block,
    end to end all of them), while the teacher keeps the float ones: inside ``teacher()`` the
    model computes exactly the logits of the untrained model in ``float_mode``, and after it
    the trained weights are back. The saved artifact holds the trained weights."""
    model = _tiny_llama(2)
    data = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(2))
    recipe = lowbit.get_recipe("w2a16").with_passes({"name": "rotate"})
    prepared = prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], inplace=True, progress=False)
    start = {n: p.detach().clone() for n, p in norm_weights(prepared).items()}
    assert set(start) == {"model.norm.weight"} | {f"model.layers.{i}.{k}.weight" for i in range(2)
                                                  for k in ("input_layernorm", "post_attention_layernorm")}
    with torch.no_grad(), float_mode(prepared):
        float_logits = prepared(data[:2]).logits
    student = copy.deepcopy(prepared)
    trainer = Trainer(student, recipe, TrainConfig(stages=["w2"], block_steps=2, e2e_steps=3, batch_size=2,
                                                   norm_lr=0.05), data, progress=False)
    trainer.run()
    trained = {n: p.detach().clone() for n, p in norm_weights(student).items()}
    assert all(not torch.equal(trained[n], start[n]) for n in start)
    with torch.no_grad():
        with trainer.teacher():
            assert torch.equal(student(data[:2]).logits, float_logits)
        assert all(torch.equal(p, trained[n]) for n, p in norm_weights(student).items())
        assert not torch.allclose(float_mode_logits(student, data[:2]), float_logits)
    frozen = freeze(student)
    lowbit.save(frozen, tmp_path / "art")
    loaded = lowbit.load(tmp_path / "art")
    assert all(torch.equal(p, trained[n]) for n, p in norm_weights(loaded).items())
    with torch.no_grad():
        assert torch.allclose(loaded(data[:2]).logits, frozen(data[:2]).logits, atol=1e-5)


def test_sites_keep_their_activation_clip_ratios_across_stages_and_checkpoints(tmp_path):
    """With ``act_clip_search`` every site has its own activation clip ratio: a stage change
    keeps it (only the bits change) and a checkpoint restores it on a rebuilt model, whose
    own search may have chosen others."""
    from dataclasses import replace

    model = _tiny_llama(3)
    data = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(3))
    recipe = lowbit.Recipe.from_dict(dict(lowbit.get_recipe("w2a2-half").to_dict(), act_clip_search=[0.4, 0.7, 1.0]))
    student = prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], inplace=True, progress=False)
    sites = fake_quant_sites(student)
    assert all(m.act_format.clip in (0.4, 0.7, 1.0) for m in sites.values())
    from lowbit.train import stage_recipe  # a weight-only first stage searches nothing (and is a valid recipe)

    assert stage_recipe(recipe, "w4").act_clip_search == [] and stage_recipe(recipe, "w3a4").act_clip_search
    clips = {name: c for name, c in zip(sites, [0.31, 0.62, 0.93] * len(sites))}
    for name, m in sites.items():
        m.act_format = replace(m.act_format, clip=clips[name])
    set_formats(student, replace(recipe.weight, bits=3), replace(recipe.activation, bits=4))
    assert all(m.act_format == replace(recipe.activation, bits=4, clip=clips[n]) for n, m in sites.items())
    set_formats(student, recipe.weight, recipe.activation)
    trainer = Trainer(student, recipe, TrainConfig(stages=["w2a2"], e2e_steps=1, batch_size=2), data,
                      out=tmp_path, progress=False)
    trainer.save_checkpoint()
    rebuilt = prepare_qat(copy.deepcopy(model), replace(recipe, weight_method="rtn"), calibration=data[:2],
                          inplace=True, progress=False)
    Trainer(rebuilt, recipe, TrainConfig(stages=["w2a2"], e2e_steps=1, batch_size=2), data, out=tmp_path,
            progress=False).load_checkpoint()
    assert {n: m.act_format for n, m in fake_quant_sites(rebuilt).items()} == \
        {n: replace(recipe.activation, clip=clips[n]) for n in sites}


def test_a_run_started_from_an_artifact_continues_its_model(tmp_path):
    """``init_from``: the student starts as exactly the artifact's model (same codes and logits,
    the trained normalization weights too) while the teacher stays the float model; a run
    started so and interrupted, then resumed, equals the uninterrupted one (the loaded norms,
    frozen here, are swapped out for the teacher after the resume as well). Artifacts of other
    passes, formats or source models are refused."""
    from dataclasses import replace

    from lowbit.formats import unpack_codes

    model = _tiny_llama(4)
    data = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(4))
    recipe = lowbit.get_recipe("w2a16").with_passes({"name": "rotate"})
    first = train(model, recipe, data, TrainConfig(stages=["w2"], block_steps=2, e2e_steps=3, batch_size=2,
                                                   norm_lr=0.05), progress=False)
    lowbit.save(freeze(first), tmp_path / "art")
    art = lowbit.load(tmp_path / "art")
    rebuilt = prepare_qat(copy.deepcopy(model), replace(recipe, clip_search=False), calibration=data[:2],
                          inplace=True, progress=False)
    with torch.no_grad(), float_mode(rebuilt):
        float_logits = rebuilt(data[:2]).logits
    cfg = TrainConfig(stages=["w2"], block_steps=1, e2e_steps=4, batch_size=2, checkpoint_every=1)
    trainer = Trainer(rebuilt, recipe, cfg, data, progress=False)
    trainer.start_from_artifact(tmp_path / "art")
    art_sites = {n: m for n, m in art.named_modules() if isinstance(m, QuantLinear)}
    for name, m in fake_quant_sites(rebuilt).items():
        ql = art_sites[name]
        assert torch.equal(m.codes(), unpack_codes(ql.weight_packed, 2, m.packed_in_features)), name
    assert all(torch.equal(p, norm_weights(art)[n]) for n, p in norm_weights(rebuilt).items())
    assert any(not torch.equal(p, norm_weights(model)[n]) for n, p in norm_weights(rebuilt).items())
    with torch.no_grad():
        assert torch.equal(rebuilt(data[:2]).logits, art(data[:2]).logits)
        with trainer.teacher():
            assert torch.equal(rebuilt(data[:2]).logits, float_logits)
    full = train(model, recipe, data, copy.deepcopy(cfg), out=tmp_path / "a", progress=False,
                 init_from=tmp_path / "art")
    train(model, recipe, data, copy.deepcopy(cfg), out=tmp_path / "b", progress=False, init_from=tmp_path / "art",
          max_steps=1 + 1 + 2)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["init_from"] == str(tmp_path / "art")
    resumed = train(model, recipe, out=tmp_path / "b", resume=True, progress=False)
    assert [(h["phase"], h["loss"]) for h in resumed.lowbit_train_history] == \
        [(h["phase"], h["loss"]) for h in full.lowbit_train_history]
    for name, m in fake_quant_sites(full).items():
        assert torch.equal(m.weight, fake_quant_sites(resumed)[name].weight), name
    with pytest.raises(ValueError, match="init_from starts a new run"):
        train(model, recipe, out=tmp_path / "b", resume=True, progress=False, init_from=tmp_path / "art")
    with pytest.raises(ValueError, match="passes"):
        train(model, lowbit.get_recipe("w2a16"), data, copy.deepcopy(cfg), progress=False, init_from=tmp_path / "art")
    with pytest.raises(ValueError, match="holds int2"):
        train(model, lowbit.get_recipe("w2a16-half").with_passes({"name": "rotate"}), data,
              copy.deepcopy(cfg), progress=False, init_from=tmp_path / "art")
    with pytest.raises(ValueError, match="another model"):
        train(_tiny_llama(5), recipe, data, copy.deepcopy(cfg), progress=False, init_from=tmp_path / "art")


def test_a_w2a16_artifact_starts_w2a2_training(tmp_path, monkeypatch):
    """``init_from`` a W2A16 artifact in a W2A2 run: the student keeps the artifact's weight codes,
    scales and norms and quantizes its activations with this run's formats, so its logits are
    those of the artifact's QuantLinear sites given the same activation formats (the reference
    op); it trains from there. A W2A2 artifact cannot start a W2A16 run."""
    from dataclasses import replace

    from lowbit.formats import unpack_codes

    model = _tiny_llama(6)
    data = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(6))
    passes = ({"name": "rotate"},)
    w2a16 = lowbit.get_recipe("w2a16-half").with_passes(*passes)
    w2a2 = lowbit.get_recipe("w2a2-half").with_passes(*passes)
    first = train(model, w2a16, data, TrainConfig(stages=["w2"], block_steps=2, e2e_steps=3, batch_size=2,
                                                  norm_lr=0.05), progress=False)
    lowbit.save(freeze(first), tmp_path / "art")
    student = prepare_qat(copy.deepcopy(model), replace(w2a2, act_clip_search=[]), calibration=data[:2],
                          inplace=True, progress=False)
    trainer = Trainer(student, w2a2, TrainConfig(stages=["w2a2"], e2e_steps=2, batch_size=2), data, progress=False)
    trainer.start_from_artifact(tmp_path / "art")
    expected = lowbit.load(tmp_path / "art")
    art_sites = {n: m for n, m in expected.named_modules() if isinstance(m, QuantLinear)}
    for name, m in fake_quant_sites(student).items():
        assert m.act_format is not None and m.act_format.bits == 2 and art_sites[name].act_format is None
        assert torch.equal(m.codes(), unpack_codes(art_sites[name].weight_packed, 2, m.packed_in_features)), name
        art_sites[name].act_format = m.act_format
    with torch.no_grad():
        student_logits = student(data[:2]).logits
        assert torch.equal(student_logits, expected(data[:2]).logits)
        assert not torch.equal(student_logits, lowbit.load(tmp_path / "art")(data[:2]).logits)
    cfg = TrainConfig(stages=["w2a2"], block_steps=1, e2e_steps=3, batch_size=2, checkpoint_every=1,
                      act_clip_lr=0.01)
    trained = train(model, w2a2, data, copy.deepcopy(cfg), progress=False, init_from=tmp_path / "art")
    assert all(m.act_format is not None for m in fake_quant_sites(trained).values())
    assert all(math.isfinite(h["loss"]) for h in trained.lowbit_train_history)
    # with fixed ratios, the sites keep the ones the recipe's search chose on the float model
    fixed = train(model, w2a2, data, replace(cfg, act_clip_lr=0.0), progress=False, init_from=tmp_path / "art")
    searched = prepare_qat(copy.deepcopy(model), w2a2, calibration=data, inplace=True, progress=False)
    clips = {n: m.act_format.clip for n, m in fake_quant_sites(searched).items()}
    assert {n: m.act_format.clip for n, m in fake_quant_sites(fixed).items()} == clips
    assert any(c != w2a2.activation.clip for c in clips.values())
    # interrupted and resumed (the resume rebuilds the W2A2 model from the float one): the same run
    train(model, w2a2, data, copy.deepcopy(cfg), out=tmp_path / "run", progress=False, init_from=tmp_path / "art",
          max_steps=2 + 1)
    resumed = train(model, w2a2, out=tmp_path / "run", resume=True, progress=False)
    assert [(h["phase"], h["loss"]) for h in resumed.lowbit_train_history] == \
        [(h["phase"], h["loss"]) for h in trained.lowbit_train_history]
    for name, m in fake_quant_sites(trained).items():
        other = fake_quant_sites(resumed)[name]
        assert torch.equal(m.weight, other.weight) and torch.equal(m.act_clip(), other.act_clip()), name
    lowbit.save(freeze(trained), tmp_path / "art2")
    with pytest.raises(ValueError, match="activations; this run starts"):
        train(model, w2a16, data, TrainConfig(stages=["w2"], e2e_steps=1, batch_size=2), progress=False,
              init_from=tmp_path / "art2")
    # a W2A2 artifact holds every site's ratio and code: the run from it skips the searches and starts at its
    # outputs (one step at learning rate 0 changes nothing)
    import lowbit.train as train_module

    searches = []

    def recording_prepare_qat(model, recipe, *args, **kwargs):
        searches.append((list(recipe.act_clip_search), recipe.clip_search))
        return prepare_qat(model, recipe, *args, **kwargs)

    monkeypatch.setattr(train_module, "prepare_qat", recording_prepare_qat)
    again = train(model, w2a2, data, TrainConfig(stages=["w2a2"], block_steps=0, e2e_steps=1, batch_size=2,
                                                 lr=0.0), progress=False, init_from=tmp_path / "art2")
    with torch.no_grad():
        assert torch.equal(again(data[:2]).logits, lowbit.load(tmp_path / "art2")(data[:2]).logits)
    train(model, w2a2, data, TrainConfig(stages=["w2a2"], block_steps=0, e2e_steps=1, batch_size=2),
          progress=False, init_from=tmp_path / "art")
    assert searches == [([], False), (list(w2a2.act_clip_search), True)]


def test_a_run_from_w2_to_w2a2_with_per_stage_values_and_searched_clip_ratios(tmp_path):
    """One run of two stages, W2 (activations in float) then W2A2, with steps and learning rates
    given per stage. The first stage, at lr 0, keeps the codes of a weight-only preparation (so
    preparing with the activation formats, for their clip search, moves no weight); each stage runs
    its own number of steps; the W2A2 stage starts every site at the clip ratio the recipe's search
    picks for it in a direct W2A2 preparation, not at the format's default. A run stopped after the
    first stage and resumed (its model rebuilt from the float one) ends as the uninterrupted run."""
    from lowbit.train import stage_recipe

    model = _tiny_llama(7)
    data = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(7))
    recipe = lowbit.Recipe.from_dict(dict(lowbit.get_recipe("w2a2-half").with_passes({"name": "rotate"}).to_dict(),
                                          act_clip_search=[0.4, 0.7, 1.0]))
    cfg = TrainConfig(stages=["w2", "w2a2"], block_steps=[1, 0], e2e_steps=[3, 2], lr=[0.0, 0.01], scale_lr=0.0,
                      batch_size=2)
    direct = prepare_qat(copy.deepcopy(model), recipe, calibration=data, inplace=True, progress=False)
    searched = {n: m.act_format.clip for n, m in fake_quant_sites(direct).items()}
    assert all(c != recipe.activation.clip for c in searched.values())
    weight_only = prepare_qat(copy.deepcopy(model), stage_recipe(recipe, "w2"), calibration=data, inplace=True,
                              progress=False)
    # stopped after the first stage's 2 x 1 block steps and 3 end-to-end steps
    first = train(model, recipe, data, copy.deepcopy(cfg), out=tmp_path / "run", progress=False, max_steps=5)
    for name, m in fake_quant_sites(first).items():
        assert m.act_format is None, name
        assert torch.equal(m.codes(), fake_quant_sites(weight_only)[name].codes()), name
        assert torch.equal(m.weight, fake_quant_sites(weight_only)[name].weight), name  # lr 0: not moved
    resumed = train(model, recipe, out=tmp_path / "run", resume=True, progress=False)
    whole = train(model, recipe, data, copy.deepcopy(cfg), progress=False)
    e2e = [h["stage"] for h in whole.lowbit_train_history if h["phase"] == "e2e"]
    assert e2e == [0, 0, 0, 1, 1]
    assert [(h["phase"], h["loss"]) for h in resumed.lowbit_train_history] == \
        [(h["phase"], h["loss"]) for h in whole.lowbit_train_history]
    for name, m in fake_quant_sites(whole).items():
        assert m.act_format.clip == searched[name], name  # fixed ratios (act_clip_lr 0): the searched ones
        assert not torch.equal(m.weight, fake_quant_sites(weight_only)[name].weight), name  # lr 0.01 moved it
        other = fake_quant_sites(resumed)[name]
        assert torch.equal(m.weight, other.weight) and other.act_format == m.act_format, name


def test_per_stage_values_are_checked_against_the_stages():
    cfg = TrainConfig(stages=["w4", "w2"], e2e_steps=[5, 7], lr=[1e-3, 2e-3], block_steps=3)
    assert (cfg.for_stage(1).e2e_steps, cfg.for_stage(1).lr, cfg.for_stage(1).block_steps) == (7, 2e-3, 3)
    assert TrainConfig(**cfg.to_dict()) == cfg  # the checkpoint's JSON round trip
    with pytest.raises(ValueError, match="e2e_steps has 3 values for 2 stages"):
        TrainConfig(stages=["w4", "w2"], e2e_steps=[1, 2, 3])
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        TrainConfig(stages=["w4", "w2"], lr=[1e-3, -1.0])
    with pytest.raises(ValueError, match="empty list"):
        TrainConfig(block_steps=[])
    with pytest.raises(ValueError, match="1 values for 2 stages"):  # the stages filled in from a recipe count too
        TrainConfig.from_recipe(lowbit.get_recipe("w2a16"), stages=["w4", "w2"], e2e_steps=[3])


def test_an_ended_run_leaves_its_latent_weights_for_a_run_from_its_model(tmp_path):
    """An ended run writes ``latents.safetensors`` beside its checkpoint: where each latent weight
    sits inside its code's interval, at ``LATENT_BITS`` bits. A run ``init_from`` its frozen model with
    ``init_latents`` that file starts with the same codes and outputs as the artifact and with
    latent weights within half a part (2**-(bits+1) group steps) of the ended run's (checked against the
    artifact's own scales), far closer than the codes' values."""
    from safetensors.torch import load_file, save_file

    from lowbit.formats import unpack_codes

    model = _tiny_llama(7)
    data = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(7))
    recipe = lowbit.get_recipe("w2a2-half").with_passes({"name": "rotate"})
    cfg = TrainConfig(block_steps=1, e2e_steps=4, batch_size=2, lr=0.02, act_clip_lr=0.01)
    first = train(model, recipe, data, copy.deepcopy(cfg), out=tmp_path / "a", progress=False)
    latents_file = tmp_path / "a" / "latents.safetensors"
    assert latents_file.is_file()
    ended_latents = {n: m.weight.detach().clone() for n, m in fake_quant_sites(first).items()}
    lowbit.save(freeze(first), tmp_path / "art")
    art = lowbit.load(tmp_path / "art")
    art_sites = {n: m for n, m in art.named_modules() if isinstance(m, QuantLinear)}

    student = prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], inplace=True, progress=False)
    trainer = Trainer(student, recipe, TrainConfig(e2e_steps=1, batch_size=2, act_clip_lr=0.01), data,
                      progress=False)
    trainer.start_from_artifact(tmp_path / "art")
    trainer.load_latents(latents_file)
    with torch.no_grad():
        assert torch.equal(student(data[:2]).logits, art(data[:2]).logits)
    far = near = 0
    for name, m in fake_quant_sites(student).items():
        ql, ended = art_sites[name], ended_latents[name]
        codes = unpack_codes(ql.weight_packed, 2, m.packed_in_features)
        assert torch.equal(m.codes(), codes), name
        # the group step from the artifact's stored scales, and the code intervals' edges
        step = effective_scales(ql.weight_scales.float(), ql.weight_global).repeat_interleave(16, dim=1)
        lower, upper = (codes.float() * step, (codes.float() + 1) * step)  # half grid: value (q + 1/2) s
        inside = (ended >= lower) & (ended < upper) & (step > 0)
        assert inside.float().mean() > 0.9, name
        err = (m.weight.detach() - ended).abs()[inside]
        bound = step[inside] / 2 ** (LATENT_BITS + 1) * (1 + 1e-5)
        assert bool((err <= bound).all()), (name, float((err / step[inside]).max()))
        assert bool(((m.weight >= lower) & (m.weight < upper))[step > 0].all()), name
        far += float(((lower + upper) / 2 - ended).abs()[inside].sum())  # the codes' values
        near += float(err.sum())
    assert near < far / 2
    # through train() (a step at learning rate 0): the same start, recorded in the checkpoint
    again = train(model, recipe, data, TrainConfig(e2e_steps=1, batch_size=2, act_clip_lr=0.01, lr=0.0),
                  out=tmp_path / "b", progress=False, init_from=tmp_path / "art", init_latents=latents_file)
    for name, m in fake_quant_sites(again).items():
        assert torch.equal(m.weight, fake_quant_sites(student)[name].weight), name
    assert json.loads((tmp_path / "b" / "state.json").read_text())["init_latents"] == str(latents_file)
    with pytest.raises(ValueError, match="give both"):
        train(model, recipe, data, copy.deepcopy(cfg), progress=False, init_latents=latents_file)
    save_file(load_file(str(latents_file)), str(tmp_path / "no_meta.safetensors"))
    with pytest.raises(ValueError, match="latent_bits"):
        train(model, recipe, data, copy.deepcopy(cfg), progress=False, init_from=tmp_path / "art",
              init_latents=tmp_path / "no_meta.safetensors")
    fewer = dict(load_file(str(latents_file)))
    fewer.pop(next(iter(fewer)))
    save_file(fewer, str(tmp_path / "fewer.safetensors"), metadata={"latent_bits": "4"})
    with pytest.raises(ValueError, match="sites of the file differ"):
        train(model, recipe, data, copy.deepcopy(cfg), progress=False, init_from=tmp_path / "art",
              init_latents=tmp_path / "fewer.safetensors")


def test_learned_activation_clip_ratios_train_freeze_and_resume(tmp_path):
    """``act_clip_lr``: every W2A2 site's clip ratio trains (starting at the preset's, which
    changes no output); the frozen model's formats hold the learned ratios and compute what the
    trainable one did; interrupted and resumed equals uninterrupted."""
    model = _tiny_llama(6)
    data = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(6))
    recipe = lowbit.get_recipe("w2a2-half")
    cfg = TrainConfig(stages=["w2a2"], block_steps=2, e2e_steps=4, batch_size=2, checkpoint_every=1,
                      act_clip_lr=0.02)
    prepared = prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], inplace=True, progress=False)
    with torch.no_grad():
        before = prepared(data[:2]).logits
    Trainer(prepared, recipe, copy.deepcopy(cfg), data, progress=False)  # enables the learned ratios
    with torch.no_grad():
        assert torch.equal(prepared(data[:2]).logits, before)
    full = train(model, recipe, data, copy.deepcopy(cfg), out=tmp_path / "a", progress=False)
    sites = fake_quant_sites(full)
    learned = {n: float(m.act_clip().detach()) for n, m in sites.items()}
    assert all(m.act_clip_ratio is not None for m in sites.values())
    assert sum(abs(v - recipe.activation.clip) > 1e-3 for v in learned.values()) > len(sites) // 2
    train(model, recipe, data, copy.deepcopy(cfg), out=tmp_path / "b", progress=False, max_steps=2 + 2 + 2)
    resumed = train(model, recipe, out=tmp_path / "b", resume=True, progress=False)
    assert [(h["phase"], h["loss"]) for h in resumed.lowbit_train_history] == \
        [(h["phase"], h["loss"]) for h in full.lowbit_train_history]
    assert {n: float(m.act_clip().detach()) for n, m in fake_quant_sites(resumed).items()} == learned
    with torch.no_grad():
        y = full(data[:2]).logits
        frozen = freeze(full)
        assert {n: frozen.get_submodule(n).act_format.clip for n in learned} == learned
        assert torch.equal(frozen(data[:2]).logits, y)


def float_mode_logits(model, ids):
    with float_mode(model):
        return model(ids).logits


def test_a_second_trainer_on_a_model_with_learned_clip_ratios():
    """A trainer built on a model whose sites already learn their clip ratios (a benchmark's copy,
    a second phase) trains them too with ``act_clip_lr``, and leaves them as they are without it
    (the constructor freezes every parameter first; before, the ratios stayed frozen and the
    multi-tensor optimizer refused them)."""
    model = _tiny_llama(6)
    data = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(6))
    recipe = lowbit.get_recipe("w2a2-half")
    cfg = TrainConfig(stages=["w2a2"], e2e_steps=3, batch_size=2, act_clip_lr=0.02)
    student = prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], inplace=True, progress=False)
    Trainer(student, recipe, copy.deepcopy(cfg), data, progress=False)  # the ratios become parameters
    start = {n: float(m.act_clip().detach()) for n, m in fake_quant_sites(student).items()}
    fixed = copy.deepcopy(student)
    Trainer(student, recipe, copy.deepcopy(cfg), data, progress=False).run()
    moved = {n: abs(float(m.act_clip().detach()) - start[n]) for n, m in fake_quant_sites(student).items()}
    assert sum(d > 1e-4 for d in moved.values()) > len(moved) // 2
    no_clips = copy.deepcopy(cfg)
    no_clips.act_clip_lr = 0.0
    trainer = Trainer(fixed, recipe, no_clips, data, progress=False)
    trainer.run()
    assert trainer.history and all(math.isfinite(h["loss"]) for h in trainer.history)
    assert {n: float(m.act_clip().detach()) for n, m in fake_quant_sites(fixed).items()} == start


def test_time_limit_checkpoints_and_finish_ends_at_the_best_evaluation(tmp_path, monkeypatch):
    """A run out of time writes a checkpoint and stops; ``finish`` ends it there: the site
    tensors become those of the best held-out evaluation so far, and the run counts as done."""
    from safetensors.torch import load_file

    import lowbit.train as train_mod

    model = _tiny_llama(1)
    data = torch.randint(0, 96, (10, 16), generator=torch.Generator().manual_seed(2))
    recipe = lowbit.get_recipe("w2a16")
    cfg = TrainConfig(stages=["w4", "w2"], block_steps=1, e2e_steps=6, batch_size=2, lr=2.0, holdout=2,
                      eval_every=1)
    train(model, recipe, data, copy.deepcopy(cfg), out=tmp_path, progress=False, max_steps=1)
    with pytest.raises(ValueError, match="only be finished early in its last stage"):
        train(model, recipe, out=tmp_path, resume=True, finish=True, progress=False)
    # a clock that moves one second per reading: 14 s run out within stage 2's end-to-end phase
    clock = iter(range(10**6))
    monkeypatch.setattr(train_mod.time, "monotonic", lambda: float(next(clock)))
    train(model, recipe, out=tmp_path, resume=True, progress=False, seconds=14)
    monkeypatch.undo()
    saved = json.loads((tmp_path / "state.json").read_text())
    state = saved["state"]
    assert state["stage"] == 1 and state["phase"] == "e2e" and 0 < state["step"] < cfg.e2e_steps
    evals = [h for h in saved["history"] if h["phase"] == "eval" and h["stage"] == 1]
    best = min(evals, key=lambda h: h["loss"])
    assert saved["best"]["step"] == best["step"] and saved["best"]["loss"] == best["loss"]
    assert best["step"] < state["step"]  # the large steps overshoot: finishing goes back
    best_tensors = load_file(str(tmp_path / "best.safetensors"))
    done = train(model, recipe, out=tmp_path, resume=True, finish=True, progress=False)
    assert json.loads((tmp_path / "state.json").read_text())["state"]["stage"] == len(cfg.stages)
    assert done.lowbit_train_history[-1]["phase"] == "finish"
    for name, m in fake_quant_sites(done).items():
        assert torch.equal(m.weight, best_tensors[f"{name}.weight"])
        assert torch.equal(m.log_scale, best_tensors[f"{name}.log_scale"])
        assert m.weight_format == recipe.weight


def test_finish_at_limit_ends_the_run_in_the_call_that_reaches_the_limit(tmp_path):
    """``finish_at_limit`` gives, in one call, the model that a run stopped at a limit and then
    ended with ``finish`` gives in two; a limit before the last stage leaves the checkpoint."""
    import shutil

    model = _tiny_llama(1)
    data = torch.randint(0, 96, (10, 16), generator=torch.Generator().manual_seed(2))
    recipe = lowbit.get_recipe("w2a16")
    cfg = TrainConfig(stages=["w4", "w2"], block_steps=1, e2e_steps=6, batch_size=2, lr=2.0, holdout=2,
                      eval_every=1)
    with pytest.warns(UserWarning, match="before the last stage"):
        train(model, recipe, data, copy.deepcopy(cfg), out=tmp_path / "a", progress=False, max_steps=1,
              finish_at_limit=True)
    assert json.loads((tmp_path / "a" / "state.json").read_text())["state"]["stage"] == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    train(model, recipe, out=tmp_path / "a", resume=True, progress=False, max_steps=10)
    state = json.loads((tmp_path / "a" / "state.json").read_text())["state"]
    assert state["stage"] == 1 and state["phase"] == "e2e" and 0 < state["step"] < cfg.e2e_steps
    two_calls = train(model, recipe, out=tmp_path / "a", resume=True, finish=True, progress=False)
    one_call = train(model, recipe, out=tmp_path / "b", resume=True, progress=False, max_steps=10,
                     finish_at_limit=True)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["state"]["stage"] == len(cfg.stages)
    assert [(h["phase"], h["step"], h["loss"]) for h in one_call.lowbit_train_history] == \
        [(h["phase"], h["step"], h["loss"]) for h in two_calls.lowbit_train_history]
    restored = [h for h in one_call.lowbit_train_history if h["phase"] == "restore"]
    assert restored and restored[-1]["step"] < state["step"]  # it went back to the best evaluation
    sites_two = fake_quant_sites(two_calls)
    for name, m in fake_quant_sites(one_call).items():
        assert torch.equal(m.weight, sites_two[name].weight) and torch.equal(m.log_scale, sites_two[name].log_scale)


def test_a_step_budget_below_one_is_refused_before_any_work(tmp_path):
    """``max_steps=0`` used to take one step anyway (the budget is checked after each step)."""
    model = _tiny_llama(1)
    data = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(e2e_steps=3, batch_size=2)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_steps must be at least 1"):
            train(model, "w2a16", data, copy.deepcopy(cfg), out=tmp_path, progress=False, max_steps=bad)
    assert not any(tmp_path.iterdir())  # refused before the model was prepared or a checkpoint written
    trainer = Trainer(prepare_qat(copy.deepcopy(model), "w2a16"), "w2a16", cfg, data, progress=False)
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        trainer.run(max_steps=0)


def test_time_limit_counts_the_preparation(tmp_path, monkeypatch):
    """``seconds`` counts from the call of ``train``: a preparation (GPTQ) that takes longer than
    the limit leaves no time to train, so the run stops with a checkpoint at its first chance."""
    import lowbit.train as train_mod

    now = [0.0]
    real_prepare = train_mod.prepare_qat

    def slow_prepare(*args, **kwargs):
        now[0] += 1000.0          # the preparation takes 1000 s on this clock
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(train_mod.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(train_mod, "prepare_qat", slow_prepare)
    model = _tiny_llama(1)
    data = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(block_steps=1, e2e_steps=4, batch_size=2)
    student = train(model, "w2a16", data, cfg, out=tmp_path, progress=False, seconds=500)
    state = json.loads((tmp_path / "state.json").read_text())["state"]
    assert state["stage"] == 0 and state["phase"] == "block" and state["block"] == 1
    assert [h["phase"] for h in student.lowbit_train_history] == ["block"]


def test_resume_refuses_another_recipe(tmp_path):
    """A checkpoint resumed without its passes would load rotated site tensors into an unrotated
    model of the same shapes: refused, as are other formats."""
    model = _tiny_llama(1)
    data = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(0))
    rotated = lowbit.get_recipe("w2a16").with_passes({"name": "rotate"})
    cfg = TrainConfig(e2e_steps=2, batch_size=2)
    train(model, rotated, data, cfg, out=tmp_path, progress=False, max_steps=1)
    # (the message's hint names --passes too: match the difference itself)
    with pytest.raises(ValueError, match=r"passes: \[\{'name': 'rotate'\}\] there, \[\] here"):
        train(model, "w2a16", out=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"weight: \{[^}]*'grid': 'int'[^}]*\} there, \{[^}]*'grid': 'half'"):
        train(model, lowbit.get_recipe("w2a16-half").with_passes({"name": "rotate"}), out=tmp_path, resume=True,
              progress=False)
    # the start's method is not part of the trained model: GPTQ named or not, the run resumes
    done = train(model, rotated.with_gptq(), out=tmp_path, resume=True, progress=False)
    assert [h["step"] for h in done.lowbit_train_history if h["phase"] == "e2e"] == [0, 1]


def test_cli_train_and_resume(tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.llama2c import shared_data_dir

    _stories_data()
    text = str(shared_data_dir() / "text" / "tinystories_val_head.txt")
    args = ["train", "stories260k", "--recipe", "w2a16-half", "--out", str(tmp_path), "--data", text, "--samples", "3",
            "--seq-len", "16", "--e2e-steps", "2", "--batch-size", "2", "--checkpoint-every", "1", "--quiet",
            "--holdout", "1", "--eval-every", "1", "--calib-samples", "2", "--block-samples", "2"]
    assert main(args + ["--max-steps", "1"]) == 0
    captured = capsys.readouterr()
    assert "continue with --resume" in captured.out
    # --quiet drops the progress bars, not the line that says how long the data took
    assert re.search(r"training data ready in \d+\.\d s", captured.err), captured.err
    # without checkpoints every step, --max-steps still stops inside the end-to-end phase
    other = tmp_path / "other"
    i = args.index("--checkpoint-every")
    once = [str(other) if a == str(tmp_path) else a for a in args[:i] + args[i + 2:]]
    assert main(once + ["--max-steps", "1"]) == 0
    state = json.loads((other / "checkpoint" / "state.json").read_text())
    assert state["config"]["checkpoint_every"] == 0 and state["state"]["phase"] == "e2e" and state["state"]["step"] == 1
    capsys.readouterr()
    # another recipe would load the sites into another model: refused with the reason
    with pytest.raises(ValueError, match="differs"):
        main(["train", "stories260k", "--recipe", "w2a16", "--out", str(tmp_path), "--resume", "--quiet"])
    # without --recipe the run resumes with its own (w2a16-half, not the default w2a16)
    assert main(["train", "stories260k", "--out", str(tmp_path), "--resume", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "e2e loss" in out and "saved to" in out
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["config"]["holdout"] == 1 and [h["step"] for h in state["history"] if h["phase"] == "eval"] == [0, 1, 2]
    assert state["config"]["block_samples"] == 2
    q = lowbit.load(str(tmp_path))
    assert {m.weight_format.grid for m in q.modules() if isinstance(m, QuantLinear)} == {"half"}
    # a new run from that artifact: its first held-out KL is that of the model the first run ended
    # with (its best evaluation), computed again on the same held-out sequence; the recipe is the
    # artifact's when none is given
    best = min(h["loss"] for h in state["history"] if h["phase"] == "eval")
    cont = tmp_path / "cont"
    i = args.index("--recipe")
    assert main([str(cont) if a == str(tmp_path) else a for a in args[:i] + args[i + 2:]]
                + ["--init-from", str(tmp_path)]) == 0
    again = json.loads((cont / "checkpoint" / "state.json").read_text())
    assert again["init_from"] == str(tmp_path)
    assert [h["loss"] for h in again["history"] if h["phase"] == "eval"][0] == pytest.approx(best, rel=1e-6)


def test_training_data_from_a_checkpoints_token_file(tmp_path):
    from safetensors.torch import save_file

    from lowbit.llama2c import shared_data_dir
    from lowbit.train import training_data

    from lowbit.models import load_model

    _stories_data()
    model, tok = load_model("stories260k")
    text = shared_data_dir() / "text" / "tinystories_val_head.txt"
    windows = training_data(model, tok, str(text), samples=6, seq_len=20, seed=3)
    save_file({"ids": windows}, str(tmp_path / "data.safetensors"))
    again = training_data(model, tok, str(tmp_path / "data.safetensors"), samples=4, seq_len=12)
    assert torch.equal(again, windows[:4, :12])
    with pytest.raises(ValueError, match="holds 6 x 20"):
        training_data(model, tok, str(tmp_path / "data.safetensors"), samples=7, seq_len=20)
    save_file({"ids": windows + model.config.vocab_size}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="vocabulary"):
        training_data(model, tok, str(tmp_path / "bad.safetensors"), samples=2, seq_len=4)
    save_file({"tokens": windows}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no 'ids'"):
        training_data(model, tok, str(tmp_path / "other.safetensors"), samples=2, seq_len=4)


def test_cli_train_refuses_cuda_graph_off_cuda():
    from lowbit.cli import main

    with pytest.raises(SystemExit, match="--device cuda"):
        main(["train", "stories260k", "--cuda-graph", "--device", "cpu", "--out", "unused"])
    with pytest.raises(SystemExit, match="add --resume"):
        main(["train", "stories260k", "--finish", "--out", "unused"])
    with pytest.raises(SystemExit, match="add --time-limit or --max-steps"):
        main(["train", "stories260k", "--finish-at-limit", "--out", "unused"])
    with pytest.raises(SystemExit, match="--max-steps must be at least 1"):
        main(["train", "stories260k", "--max-steps", "0", "--out", "unused"])
    with pytest.raises(SystemExit, match="drop one"):
        main(["train", "stories260k", "--init-from", "unused", "--resume", "--out", "unused"])
    with pytest.raises(SystemExit, match="not a lowbit artifact"):
        main(["train", "stories260k", "--init-from", "unused", "--out", "unused"])
    with pytest.raises(SystemExit, match="give both"):
        main(["train", "stories260k", "--init-latents", "unused", "--out", "unused"])


def test_prologue_ops_have_gradients():
    """Training through rotated/split sites needs the prologue ops' gradients (finite differences)."""
    import lowbit.qat  # noqa: F401  (registers them)

    for n in (16, 12, 20):  # Sylvester and the non-symmetric Paley I bases
        x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(torch.ops.lowbit.hadamard, (x,))
    index, scale = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0.5, 1, 1, 0.5, 1], dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.lowbit.channel_split(t, index, scale), (x,))


def test_train_config_comes_from_the_recipe():
    recipe = lowbit.Recipe.from_yaml(lowbit.get_recipe("w2a2").to_yaml())
    recipe.weight_options["qat"] = {"stages": ["w4a4", "w3a4", "w2a2"], "e2e_steps": 3}
    recipe = lowbit.Recipe.from_yaml(recipe.to_yaml())  # survives the YAML round trip
    cfg = TrainConfig.from_recipe(recipe, batch_size=2)
    assert cfg.stages == ["w4a4", "w3a4", "w2a2"] and cfg.e2e_steps == 3 and cfg.batch_size == 2
    from lowbit.train import stage_formats

    w, a = stage_formats(recipe, "w3a4")
    assert (w.bits, a.bits, w.group_size, a.scale_dtype) == (3, 4, 16, "e4m3")
    assert TrainConfig.from_recipe(lowbit.get_recipe("w2a16")).stages == ["w2"]
    with pytest.raises(ValueError, match="last stage"):
        train(_tiny_llama(), "w2a16", torch.zeros(2, 4, dtype=torch.long), TrainConfig(stages=["w4"]))


def test_cuda_graph_needs_a_cuda_model():
    model = _tiny_llama(1)
    data = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    recipe = lowbit.get_recipe("w2a16")
    student = prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], inplace=True, progress=False)
    with pytest.raises(ValueError, match="CUDA device"):
        Trainer(student, recipe, TrainConfig(stages=["w2"], cuda_graph=True), data, progress=False)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_forward_of_a_weight_only_site(x_dtype):
    """Under bf16 autocast a W*A16 site multiplies bf16(x) by bf16(fake-quant weight), whatever
    dtype x arrives in (the training fast path skips the fp32 copy of x)."""
    wfmt = QFormat(2, "int", 16, "e4m3")
    fq, _, _ = _site(24, 48, wfmt, seed=5)
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(6)).to(x_dtype)
    with torch.no_grad():
        w = fq.quantized_weight()
        want = (x.float().bfloat16().double() @ w.bfloat16().double().T + fq.bias.bfloat16().double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fq(x)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), want, rtol=1e-2, atol=1e-2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        same = torch.nn.functional.linear(x.float(), w, fq.bias)  # the path without the shortcut
    assert torch.equal(got, same)


def test_a_checkpoint_interrupted_while_writing_leaves_the_last_one_whole(tmp_path, monkeypatch):
    """Files are written beside their places and renamed at the end (state.json last): a write
    that fails half-way (a run killed by a time limit) leaves the previous checkpoint as it was."""
    import safetensors.torch

    model = _tiny_llama(3)
    data = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    recipe = lowbit.get_recipe("w2a16")
    student = prepare_qat(copy.deepcopy(model), recipe, calibration=data[:2], inplace=True, progress=False)
    trainer = Trainer(student, recipe, TrainConfig(stages=["w2"], e2e_steps=3, batch_size=2, checkpoint_every=1),
                      data, out=tmp_path, progress=False)
    trainer.run(max_steps=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert "state.json" in before and not any(n.endswith(".tmp") for n in before)
    trainer.optimizer = trainer.make_optimizer(fake_quant_sites(student))
    with torch.no_grad():
        for m in fake_quant_sites(student).values():
            m.weight.add_(1.0)  # a state different from the saved one
    real = safetensors.torch.save_file

    def failing(tensors, path, *a, **k):
        if "optimizer" in str(path):
            raise OSError("killed")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="killed"):
        trainer.save_checkpoint()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if not p.name.endswith(".tmp")}
    assert after == before


def _kl_logits(seed=3):
    """bf16 teacher and student logits as autocast gives them (the student's with a gradient)."""
    g = torch.Generator().manual_seed(seed)
    teacher = (torch.randn(2, 5, 300, generator=g) * 4).bfloat16()
    student = (teacher.float() + torch.randn(2, 5, 300, generator=g)).bfloat16().requires_grad_(True)
    return teacher, student


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logits_kl_is_the_distillation_kl(temperature):
    """The trainer's loss against torch's kl_div in float64 (a separate implementation)."""
    from lowbit.train import logits_kl

    teacher, student = _kl_logits()
    got = logits_kl(teacher, student, temperature)
    t64, s64 = teacher.double() / temperature, student.detach().double() / temperature
    want = F.kl_div(F.log_softmax(s64, -1).reshape(-1, 300), F.log_softmax(t64, -1).reshape(-1, 300),
                    log_target=True, reduction="batchmean") * temperature ** 2
    assert float(want) > 0.1 and float(got) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.skipif(not any(__import__("shutil").which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logits_kl_through_torch_compile(temperature):
    """Through torch.compile (the compiled end-to-end phases use it so) the value and the
    student's gradient stay within float rounding of the eager loss's."""
    from lowbit.train import logits_kl

    teacher, student = _kl_logits()
    got = logits_kl(teacher, student, temperature)
    (grad,) = torch.autograd.grad(got, student)
    torch._dynamo.reset()
    compiled = torch.compile(logits_kl)(teacher, student, temperature)
    (cgrad,) = torch.autograd.grad(compiled, student)
    assert float(compiled) == pytest.approx(float(got), rel=1e-5)
    torch.testing.assert_close(cgrad.float(), grad.float(), rtol=2e-2, atol=1e-5)
