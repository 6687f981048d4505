"""The batched sampler: draws follow the distribution, depend only on (seed, position), and the
processors and penalties match their references (Hugging Face, OpenAI's formula)."""

from __future__ import annotations

import pytest
import torch

from disagg.shared.engine.engine import Engine
from disagg.shared.engine.runtime import RuntimeConfig, build_runtime
from disagg.shared.engine.sampler import Row, SeqState, _penalize, sample, uniform
from disagg.shared.engine.scheduler import EngineConfig
from disagg.shared.protocol.sampling import SamplingParams
from tests.conftest import assert_pool_full, hf_greedy, hf_logprobs

VOCAB = 8


def rows_of(params: SamplingParams, outputs, prompt=(1, 2, 3)):
    return [Row(SeqState.new(params, list(prompt)), out) for out in outputs]


def test_uniform_depends_only_on_seed_and_position():
    a = uniform([7, 7, 8, -1], [0, 1, 0, 0])
    b = uniform([8, 7], [0, 1])
    assert a[2] == b[0] and a[1] == b[1]  # batch company does not matter
    assert len(set(a.tolist())) == 4
    many = uniform([3] * 20000, range(20000))
    assert many.min() > 0 and many.max() < 1
    assert abs(many.mean().item() - 0.5) < 0.01  # ~ U(0,1): sd of the mean is 0.002


def test_draws_follow_the_softmax_and_the_masks():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -9.0, 1.5, 0.2])
    n = 20000
    params = SamplingParams(temperature=0.7, seed=11)
    tokens, _ = sample(logits.repeat(n, 1), rows_of(params, [[0] * i for i in range(n)]))
    freq = torch.bincount(torch.tensor(tokens), minlength=VOCAB).double() / n
    expected = torch.softmax(logits / 0.7, -1).double()
    assert (freq - expected).abs().max() < 0.015  # binomial sd <= 0.0035
    for params, allowed in (
        (SamplingParams(temperature=1.0, top_k=2, seed=1), {0, 6}),
        (SamplingParams(temperature=1.0, top_p=0.5, seed=1), {0, 6}),
        (SamplingParams(temperature=1.0, min_p=0.5, seed=1), {0, 6}),
    ):
        tokens, _ = sample(logits.repeat(2000, 1), rows_of(params, [[0] * i for i in range(2000)]))
        assert set(tokens) == allowed, params


def test_processors_mask_bias_and_min_tokens():
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = 3.0  # the argmax
    greedy = SamplingParams()
    assert sample(logits, rows_of(greedy, [[]]))[0] == [5]
    cases = [
        (SamplingParams(allowed_token_ids=(1, 2), logit_bias=((2, 1.0),)), [], 2),
        (SamplingParams(logit_bias=((3, 5.0),)), [], 3),
        (SamplingParams(bad_words_token_ids=((5,),)), [], 0),
        (SamplingParams(bad_words_token_ids=((4, 5),), logit_bias=((6, 1.0),)), [4], 6),
        (SamplingParams(bad_words_token_ids=((4, 5),)), [3], 5),  # the word's head is absent
        (SamplingParams(min_tokens=2, logit_bias=((7, 1.0),)), [1], 7),  # 5 is EOS: masked
        (SamplingParams(min_tokens=2), [1, 1], 5),
        (SamplingParams(min_tokens=2, output_offset=1), [1], 5),  # counted from the offset
        (SamplingParams(min_tokens=3, stop_token_ids=(7,), ignore_eos=True), [], 5),
    ]
    for params, output, want in cases:
        tokens, _ = sample(logits.clone(), rows_of(params, [output]), eos_ids={5})
        assert tokens == [want], (params, output)
    # A bad word whose head was generated before a move (it ends the moved prompt).
    moved = SamplingParams(bad_words_token_ids=((4, 5),), logit_bias=((6, 1.0),), output_offset=1)
    tokens, _ = sample(logits.clone(), rows_of(moved, [[]], prompt=(1, 2, 4)))
    assert tokens == [6]


def openai_penalty(logits, output, presence, frequency):
    """OpenAI's documented formula: mu[j] - c[j] * frequency - (c[j] > 0) * presence."""
    out = logits.clone()
    for j in range(len(out)):
        c = output.count(j)
        out[j] -= c * frequency + (1.0 if c > 0 else 0.0) * presence
    return out


def test_presence_and_frequency_penalties_equal_the_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, VOCAB, generator=gen)
    outputs = [[1, 1, 2], [], [7, 3, 3, 3]]
    prompt = [4, 5]
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=0.4, logprobs=0)
    states = [SeqState.new(params, prompt) for _ in outputs]
    for state, out in zip(states, outputs):
        for t in out:
            state.observe(t)
    got = _penalize(logits.clone(), states)
    for row, out in enumerate(outputs):
        torch.testing.assert_close(got[row], openai_penalty(logits[row], out, 0.7, 0.4))


def test_a_moved_request_counts_its_carried_tokens_as_output():
    params = SamplingParams(frequency_penalty=1.0, output_offset=2)
    state = SeqState.new(params, [4, 5, 6, 6])  # 6, 6 were generated before the move
    assert state.seen == {4: 0, 5: 0, 6: 2}  # prompt tokens for repetition, counts of output


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_greedy_with_repetition_penalty_equals_transformers(checkpoints, penalty):
    model_dir = checkpoints(arch="llama")
    rt = build_runtime(RuntimeConfig(dtype="float32", model=model_dir, num_blocks=64, block_size=4))
    engine: Engine = rt.engine
    prompt = [5, 9, 5, 17, 33, 9, 2]
    params = SamplingParams(max_tokens=12, repetition_penalty=penalty, ignore_eos=True)
    (ours,) = engine.generate([prompt], params)
    assert ours == hf_greedy(model_dir, prompt, 12, repetition_penalty=penalty)
    assert ours != engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert_pool_full(rt.pool)


def test_logprobs_are_the_raw_log_softmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, VOCAB, generator=gen)
    params = SamplingParams(temperature=0.5, logprobs=3, seed=4, presence_penalty=1.0)
    tokens, logprobs = sample(logits.clone(), rows_of(params, [[1], [2, 2]]))
    ref = torch.log_softmax(logits, -1)
    for row, (token, lp) in enumerate(zip(tokens, logprobs)):
        assert lp.logprob == pytest.approx(ref[row, token].item(), abs=1e-6)
        top = ref[row].topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert sample(logits, rows_of(SamplingParams(), [[]] * 2))[1] == [None, None]


def test_prompt_logprobs_over_chunks_equal_transformers_and_skip_the_prefix_cache(checkpoints):
    model_dir = checkpoints(arch="llama")
    cfg = RuntimeConfig(dtype="float32", model=model_dir, num_blocks=64, block_size=4,
                        engine=EngineConfig(max_num_batched_tokens=5))  # fmt: skip
    engine = build_runtime(cfg).engine
    prompt = [5, 9, 5, 17, 33, 9, 2, 40, 41, 7, 3, 8, 22]  # 13 tokens: chunks of 5, 5, 3
    engine.generate([prompt], SamplingParams(max_tokens=1))  # now its blocks are cached
    params = SamplingParams(max_tokens=2, prompt_logprobs=2)
    engine.add_request("p", prompt, params)
    firsts = []
    while engine.has_unfinished():
        firsts += [o for o in engine.step() if o.request_id == "p" and o.prompt_logprobs]
    (first,) = firsts
    assert first.num_cached_tokens == 0  # recomputed: the logits are needed
    ref = hf_logprobs(model_dir, prompt[:1], prompt[1:])  # row i: prompt token i + 1
    assert len(first.prompt_logprobs) == len(prompt) - 1
    for i, lp in enumerate(first.prompt_logprobs):  # entry i is prompt token i + 1
        token = prompt[i + 1]
        assert lp.logprob == pytest.approx(ref[i, token].item(), abs=1e-4)
        assert lp.rank == int((ref[i] > ref[i, token]).sum()) + 1
        assert [t for t, _ in lp.top] == ref[i].topk(2).indices.tolist()


def reference_kept(probs: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Top-k then top-p the plain way: sort descending, keep while the mass before < top_p."""
    values, order = probs.sort(descending=True)
    kept, mass = set(), 0.0
    for rank, (v, i) in enumerate(zip(values.tolist(), order.tolist())):
        if (top_k and rank >= top_k) or (rank and mass >= top_p * probs.sum().item()):
            break
        kept.add(i)
        mass += v
    return kept


def test_top_k_top_p_thresholds_keep_what_a_descending_sort_keeps():
    gen = torch.Generator().manual_seed(3)
    vocab, n = 300, 400
    # Peaked rows (a small nucleus) and flat ones (a wide one).
    logits = torch.randn(n, vocab, generator=gen) * torch.linspace(0.1, 8.0, n)[:, None]
    for top_k, top_p in ((0, 0.9), (40, 1.0), (25, 0.5)):
        params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=5)
        rows = [Row(SeqState.new(params, [1]), [0] * i) for i in range(n)]
        tokens, _ = sample(logits.clone(), rows)
        probs = torch.softmax(logits, -1)
        for row, token in enumerate(tokens):
            assert token in reference_kept(probs[row], top_k, top_p), (top_k, top_p, row)
