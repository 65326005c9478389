"""Quantization-aware training on the GPU (skipped without CUDA): the CUDA-graph step.

With ``cuda_graph=True`` each phase runs GRAPH_WARMUP eager steps, then replays one captured
step (forward, backward, clipping, capturable Adam). The replayed steps must train the same
model as the eager ones: losses and latent weights are compared with an eager run of the same
schedule (bf16 autocast, so within bf16 rounding rather than bit for bit).
"""
import copy
import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import lowbit  # noqa: E402
from lowbit.qat import fake_quant_sites, freeze, prepare_qat  # noqa: E402
from lowbit.train import GRAPH_WARMUP, Trainer, TrainConfig, norm_weights, recipe_stage  # noqa: E402


@pytest.mark.parametrize("recipe_name,norm_lr,act_clip_lr", [("w2a16", 0.0, 0.0), ("w2a2", 0.0, 0.0),
                                                             ("w2a16", 0.01, 0.0), ("w2a2-half", 0.0, 0.01)])
def test_cuda_graph_steps_train_like_eager_steps(tiny_llama, recipe_name, norm_lr, act_clip_lr):
    data = torch.randint(0, 256, (10, 32), generator=torch.Generator().manual_seed(3))
    recipe = lowbit.get_recipe(recipe_name).with_passes({"name": "rotate"})
    prepared = prepare_qat(copy.deepcopy(tiny_llama), recipe, calibration=data[:2], inplace=True,
                           progress=False).cuda()
    block_steps, e2e_steps = 6, 12
    runs = {}
    for graphed in (False, True):
        cfg = TrainConfig(stages=[recipe_stage(recipe)],
                          block_steps=block_steps, e2e_steps=e2e_steps, batch_size=4, warmup=0.2, grad_clip=1.0,
                          holdout=2, eval_every=5, cuda_graph=graphed, norm_lr=norm_lr, act_clip_lr=act_clip_lr)
        student = copy.deepcopy(prepared)
        trainer = Trainer(student, recipe, cfg, data, progress=False)
        trainer.run()
        runs[graphed] = (trainer, student)
    (te, se), (tg, sg) = runs[False], runs[True]
    nblocks = 2
    # every phase (2 blocks, 1 end-to-end) replayed all but its eager warm-up steps
    assert tg.graph_replays == nblocks * (block_steps - GRAPH_WARMUP) + e2e_steps - GRAPH_WARMUP
    assert te.graph_replays == 0
    le = [h["loss"] for h in te.history]
    lg = [h["loss"] for h in tg.history]
    assert [h["phase"] for h in te.history] == [h["phase"] for h in tg.history]
    assert all(math.isfinite(x) for x in lg)
    assert lg == pytest.approx(le, rel=2e-2, abs=1e-4)
    for name, m in fake_quant_sites(sg).items():  # the replayed steps move the weights as eager ones do
        ref = fake_quant_sites(se)[name]
        start = prepared.get_submodule(name).weight
        moved = (ref.weight - start).norm()
        assert moved > 0 and (m.weight - start).norm() > 0.5 * moved, name
        assert (m.weight - ref.weight).norm() <= 0.05 * moved + 1e-6, name
    if norm_lr:  # trained normalization weights: moved, alike in both runs (the teacher swaps in copies)
        for name, p in norm_weights(sg).items():
            start, ref = norm_weights(prepared)[name], norm_weights(se)[name]
            moved = (ref - start).norm()
            assert moved > 0 and (p - ref).norm() <= 0.05 * moved + 1e-6, name
    if act_clip_lr:  # learned activation clip ratios: most moved, alike in both runs
        moved = 0
        for name, m in fake_quant_sites(sg).items():
            start = prepared.get_submodule(name).act_format.clip
            ref = float(fake_quant_sites(se)[name].act_clip().detach())
            moved += abs(ref - start) > 1e-3
            assert abs(float(m.act_clip().detach()) - ref) <= 0.05 * abs(ref - start) + 1e-6, name
        assert moved > len(fake_quant_sites(sg)) // 2
    # the frozen graph-trained model computes what its fake-quant form does
    ids = data[:2].cuda()
    with torch.no_grad():
        a = sg(ids).logits.float()
        b = freeze(copy.deepcopy(sg))(ids).logits.float()
    assert ((a - b).norm() / a.norm()).item() < 1e-3


@pytest.mark.parametrize("recipe_name,act_clip_lr,hidden_weight", [("w2a16", 0.0, 0.0), ("w2a2-half", 0.01, 0.0),
                                                                     ("w2a2-half", 0.01, 1.0)])
def test_compiled_blocks_in_cuda_graph_steps_train_like_eager_steps(tiny_llama, recipe_name, act_clip_lr,
                                                                    hidden_weight):
    """compile=True with cuda_graph=True: the blocks are compiled during the eager warm-up steps,
    then the step that calls them is captured and replayed (nothing may compile inside the
    capture). Same checks as above, against compiled eager steps of the same schedule (the same
    inductor kernels, so the comparison measures the replay, not inductor's bf16 rounding; the CPU
    test compares compiled with uncompiled steps); the blocks are eager modules again after. With
    ``hidden_weight`` the loss takes the blocks' outputs too (``output_hidden_states``)."""
    data = torch.randint(0, 256, (10, 32), generator=torch.Generator().manual_seed(5))
    recipe = lowbit.get_recipe(recipe_name).with_passes({"name": "rotate"})
    prepared = prepare_qat(copy.deepcopy(tiny_llama), recipe, calibration=data[:2], inplace=True,
                           progress=False).cuda()
    e2e_steps = 10
    runs = {}
    for fast in (False, True):
        cfg = TrainConfig(stages=[recipe_stage(recipe)], e2e_steps=e2e_steps, batch_size=4, warmup=0.2,
                          grad_clip=1.0, holdout=2, eval_every=5, cuda_graph=fast, compile=True,
                          act_clip_lr=act_clip_lr, hidden_weight=hidden_weight)
        student = copy.deepcopy(prepared)
        trainer = Trainer(student, recipe, cfg, data, progress=False)
        torch._dynamo.reset()  # each run compiles in its own warm-up
        trainer.run()
        runs[fast] = (trainer, student)
    (te, se), (tf, sf) = runs[False], runs[True]
    assert tf.graph_replays == e2e_steps - GRAPH_WARMUP
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in sf.model.layers)
    le = [h["loss"] for h in te.history]
    lf = [h["loss"] for h in tf.history]
    assert [h["phase"] for h in te.history] == [h["phase"] for h in tf.history]
    assert all(math.isfinite(x) for x in lf)
    assert lf == pytest.approx(le, rel=2e-2, abs=1e-4)
    for name, m in fake_quant_sites(sf).items():
        ref = fake_quant_sites(se)[name]
        start = prepared.get_submodule(name).weight
        moved = (ref.weight - start).norm()
        assert moved > 0 and (m.weight - ref.weight).norm() <= 0.05 * moved + 1e-6, name
    if act_clip_lr:  # learned activation clip ratios: alike in both runs
        for name, m in fake_quant_sites(sf).items():
            start = prepared.get_submodule(name).act_format.clip
            ref = float(fake_quant_sites(se)[name].act_clip().detach())
            assert abs(float(m.act_clip().detach()) - ref) <= 0.05 * abs(ref - start) + 1e-6, name
