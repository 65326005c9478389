"""lowbit.calibration.from_generations: our decoding loop against transformers' own forward and
generate, on a tiny random Llama in float32 (CPU)."""
import pytest
import torch

from lowbit import calibration
from lowbit.calibration import _decode, _own_loop_supported, _sample

VOCAB = 256


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).float().eval()


def _generate(model, **kw):
    return calibration.from_generations(model, progress=False, **kw)


def test_uses_own_loop_for_llama(model):
    assert _own_loop_supported(model)


def test_shape_dtype_range_and_first_tokens(model):
    ids = _generate(model, samples=7, seq_len=24, seed=3, batch_size=3)  # 3 does not divide 7
    assert ids.shape == (7, 24) and ids.dtype == torch.int64 and ids.device.type == "cpu"
    assert int(ids.min()) >= 0 and int(ids.max()) < VOCAB
    torch.manual_seed(3)
    assert torch.equal(ids[:, :1], torch.randint(0, VOCAB, (7, 1)))  # the seeded first tokens, as before
    # the first tokens do not depend on the batch size
    assert torch.equal(_generate(model, samples=7, seq_len=24, seed=3, batch_size=4)[:, 0], ids[:, 0])


def test_deterministic_per_seed(model):
    a = _generate(model, samples=5, seq_len=16, seed=0, batch_size=2)
    b = _generate(model, samples=5, seq_len=16, seed=0, batch_size=2)
    c = _generate(model, samples=5, seq_len=16, seed=1, batch_size=2)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 1:], c[:, 1:])


def test_edge_sizes(model):
    assert _generate(model, samples=0, seq_len=8).shape == (0, 8)
    one = _generate(model, samples=3, seq_len=1, seed=2)
    torch.manual_seed(2)
    assert torch.equal(one, torch.randint(0, VOCAB, (3, 1)))
    with pytest.raises(ValueError):
        _generate(model, samples=2, seq_len=8, temperature=-1.0)


@pytest.mark.parametrize("greedy", [dict(top_k=1), dict(temperature=0.0)])
def test_greedy_equals_hf_generate(model, greedy):
    ids = _generate(model, samples=5, seq_len=20, seed=4, batch_size=5, **greedy)
    first = ids[:, :1]
    ref = model.generate(first, attention_mask=torch.ones_like(first), max_new_tokens=19, min_new_tokens=19,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(ids, ref)


def test_step_logits_match_full_forward(model):
    first = torch.randint(0, VOCAB, (3, 1), generator=torch.Generator().manual_seed(5))
    steps = []
    ids = _decode(model, first, 32, torch.Generator().manual_seed(0), 1.0, 0,
                  on_step=lambda step, logits: steps.append(logits.clone()))
    with torch.no_grad():
        full = model(ids).logits  # one pass over the whole sequences, no cache
    assert len(steps) == 31
    torch.testing.assert_close(torch.stack(steps, 1), full[:, :-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 5)])
def test_sampled_tokens_are_possible_under_full_forward(model, temperature, top_k):
    ids = _generate(model, samples=6, seq_len=24, seed=6, batch_size=4, temperature=temperature, top_k=top_k)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].double() / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth - 1e-4, float("-inf"))  # the slack covers cache-vs-full rounding
    logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.isfinite(logp).all()
    assert (logp > -30).all()


def test_sampler_frequencies_follow_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0, float("-inf")]]).expand(20000, -1)
    gen = torch.Generator().manual_seed(0)
    for temperature, top_k in [(1.0, 0), (0.5, 0), (1.0, 3)]:
        draws = _sample(logits, gen, temperature, top_k)
        freq = torch.bincount(draws, minlength=6).double() / draws.numel()
        expect = logits[0].double() / temperature
        if top_k:
            expect[top_k:] = float("-inf")
        expect = expect.softmax(-1)
        assert freq[expect == 0].sum() == 0
        assert (freq - expect).abs().max() < 0.015  # about 4 standard deviations at 20,000 draws


def test_generate_fallback_for_other_models(model, monkeypatch):
    monkeypatch.setattr(calibration, "_own_loop_supported", lambda m: False)
    ids = _generate(model, samples=3, seq_len=10, seed=7, batch_size=2)
    again = _generate(model, samples=3, seq_len=10, seed=7, batch_size=2)
    assert ids.shape == (3, 10) and torch.equal(ids, again)
    greedy = _generate(model, samples=3, seq_len=10, seed=7, batch_size=2, top_k=1)
    monkeypatch.undo()
    assert torch.equal(greedy, _generate(model, samples=3, seq_len=10, seed=7, batch_size=2, top_k=1))


def test_needs_a_vocabulary():
    with pytest.raises(TypeError, match="vocab_size"):
        calibration.from_generations(torch.nn.Linear(2, 2), samples=1, seq_len=4, progress=False)


def test_bf16_autocast(model):
    a = _generate(model, samples=4, seq_len=16, seed=8, amp="bf16")
    assert a.shape == (4, 16) and torch.equal(a, _generate(model, samples=4, seq_len=16, seed=8, amp="bf16"))
    # "auto" autocasts on CUDA only
    assert torch.equal(_generate(model, samples=4, seq_len=16, seed=8),
                       _generate(model, samples=4, seq_len=16, seed=8, amp="none"))
    with pytest.raises(ValueError, match="amp"):
        _generate(model, samples=1, seq_len=4, amp="fp8")


def test_sampling_replays_from_full_forward_logits(model):
    """Each sampled token is the Gumbel-max draw that the same generator state gives on the
    full-sequence logits (no cache): the loop feeds step t's logits, in order, to the sampler."""
    first = torch.randint(0, VOCAB, (4, 1), generator=torch.Generator().manual_seed(9))
    ids = _decode(model, first, 20, torch.Generator().manual_seed(123), 1.0, 0)
    with torch.no_grad():
        full = model(ids).logits[:, :-1].float()
    gen = torch.Generator().manual_seed(123)
    for t in range(19):
        noise = torch.empty(4, VOCAB).exponential_(generator=gen)
        want = (full[:, t] - noise.clamp_min(torch.finfo(noise.dtype).tiny).log()).argmax(-1)
        assert torch.equal(ids[:, t + 1], want), t
