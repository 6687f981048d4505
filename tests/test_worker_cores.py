"""The prefill and decode worker cores joined by the in-memory loopback: one process, no sockets.

The same frames and checks as over ZeroMQ (tests/test_datapath.py runs them across processes);
here the cores alone are proven against transformers, with every block pool full afterwards.
"""

from __future__ import annotations

import time

import pytest
import torch

from disagg.services.workers.decode import DecodeWorker
from disagg.services.workers.prefill import PrefillJob, PrefillWorker
from disagg.shared.engine.runtime import Runtime, RuntimeConfig, build_runtime
from disagg.shared.engine.scheduler import EngineConfig
from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.transfer.loopback import Loopback
from tests.conftest import assert_pool_full, hf_greedy, hf_logprobs

BLOCK = 4
STEP_BOUND = 2000  # steps; far more than any request here needs


def runtime(model, *, budget: int = 512, blocks: int = 128) -> Runtime:
    cfg = RuntimeConfig(dtype="float32", 
        model=model, num_blocks=blocks, block_size=BLOCK,
        engine=EngineConfig(max_num_batched_tokens=budget),
    )  # fmt: skip
    return build_runtime(cfg)


class Pair:
    """A prefill core and a decode core over one loopback."""

    def __init__(self, model, *, wire_dtype: str | None = None, prefill_budget: int = 512) -> None:
        self.prefill_rt, self.decode_rt = runtime(model, budget=prefill_budget), runtime(model)
        self.link = Loopback(self.prefill_rt.fingerprint, max_chunk_bytes=BLOCK * 1024)
        self.prefill = PrefillWorker(self.prefill_rt.engine, self.link.sender)
        self.decode = DecodeWorker(
            self.decode_rt.engine, self.link.receiver, fingerprint=self.decode_rt.fingerprint,
            wire_dtype=wire_dtype,
        )  # fmt: skip
        self.sent: list = []  # every transfer the prefill side finished

    def generate(self, prompts: list[list[int]], params: SamplingParams, forks=None):
        """Admit on decode, prefill, decode to the end; returns (tokens, first tokens, descs).
        ``forks`` (id -> sampling) are forks of the first prompt: their tokens come after."""
        forks = forks or {}
        ids = [f"r{i}" for i in range(len(prompts))]
        descs = []
        for rid, prompt in zip(ids, prompts):
            desc = self.decode.admit(rid, prompt, params, "p", forks if rid == "r0" else None)
            self.prefill.submit(PrefillJob(rid, prompt, params, desc))
            descs.append(desc)
        ids += list(forks)
        firsts, tokens, done = {}, {rid: {} for rid in ids}, set()
        for _ in range(STEP_BOUND):
            if len(done) == len(ids):
                break
            for result in self.prefill.step() if self.prefill.has_work() else []:
                assert result.error is None, result.error
                firsts[result.request_id] = result.first_token
            for out in self.decode.step():
                assert out.error is None, out.error
                for i, token in enumerate(out.new_token_ids):
                    tokens[out.request_id][out.index + i] = token
                if out.finished:
                    done.add(out.request_id)
        assert done == set(ids), f"unfinished after {STEP_BOUND} steps: {set(ids) - done}"
        self.settle()
        seqs = [[tokens[r][i] for i in sorted(tokens[r])] for r in ids]
        return seqs, [firsts[r] for r in ids if r not in forks], descs

    def settle(self) -> None:
        """Let the prefill side retire its finished sends (the loopback delivers synchronously)."""
        deadline = time.monotonic() + 10.0
        while self.prefill.has_work() and time.monotonic() < deadline:
            self.prefill.step()
        assert not self.prefill.has_work()
        sent = self.prefill.poll_sent()
        assert all(s.error is None for s in sent), [s.error for s in sent]
        self.sent += sent

    def assert_pools_full(self) -> None:
        assert_pool_full(self.prefill_rt.pool)
        assert_pool_full(self.decode_rt.pool)


def prompts_of(lens, seed=0, vocab=380):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cores_over_loopback_equal_transformers(checkpoints, arch):
    model = checkpoints(arch=arch)
    pair = Pair(model, prefill_budget=8)  # chunked prefill on the prefill side
    prompts = prompts_of((1, 5, 19, 9))  # a single token; one longer than 4 blocks (2 chunks)
    outs, firsts, _ = pair.generate(prompts, SamplingParams(max_tokens=8))
    for prompt, out, first in zip(prompts, outs, firsts):
        assert out == hf_greedy(model, prompt, 8)
        assert out[0] == first  # the token prefill streams first is the one decode continues from
    pair.assert_pools_full()


def test_decode_held_prefix_is_not_shipped_again(checkpoints):
    model = checkpoints(arch="llama")
    pair = Pair(model)
    shared = prompts_of((12,), seed=3)[0]  # three full blocks
    first, second = shared + [7, 8], shared + [9, 10, 11]
    params = SamplingParams(max_tokens=6)
    (out_a,), _, (desc_a,) = pair.generate([first], params)
    (out_b,), _, (desc_b,) = pair.generate([second], params)
    assert desc_a.first_block == 0 and desc_b.first_block == 3  # decode held the prefix
    assert out_a == hf_greedy(model, first, 6) and out_b == hf_greedy(model, second, 6)
    pair.assert_pools_full()


def test_int8_wire_over_loopback_frees_every_block(checkpoints):
    model = checkpoints(arch="llama")
    pair = Pair(model, wire_dtype="int8")
    prompts = prompts_of((6, 17))
    outs, firsts, descs = pair.generate(prompts, SamplingParams(max_tokens=4))
    assert all(d.wire_dtype == "int8" for d in descs)
    assert all(len(o) == 4 and o[0] == f for o, f in zip(outs, firsts))
    pair.assert_pools_full()


def test_min_tokens_and_logit_bias_hold_on_both_sides_of_the_hand_off(checkpoints):
    model = checkpoints(arch="llama")
    pair = Pair(model)
    eos = next(iter(pair.decode_rt.model.args.eos_token_ids))
    # EOS is the argmax everywhere; min_tokens masks it on prefill (token 0) and decode (1, 2).
    params = SamplingParams(max_tokens=10, min_tokens=3, logit_bias=((eos, 100.0),))
    (out,), (first,), _ = pair.generate([[3, 1, 4, 1, 5]], params)
    assert out[:3] == [first, *out[1:3]] and eos not in out[:3]
    assert out[3:] == [eos]  # then it stops on EOS
    pair.assert_pools_full()


def test_logprobs_cross_the_hand_off_and_equal_transformers(checkpoints):
    model = checkpoints(arch="llama")
    pair = Pair(model)
    prompt = prompts_of((11,), seed=5)[0]
    params = SamplingParams(max_tokens=6, logprobs=4)
    rid = "lp"
    desc = pair.decode.admit(rid, prompt, params, prefill_id="p")
    pair.prefill.submit(PrefillJob(rid, prompt, params, desc))
    tokens, logprobs, first = [], [], None
    for _ in range(STEP_BOUND):
        for result in pair.prefill.step() if pair.prefill.has_work() else []:
            first = result.logprob  # what the prefill worker streams for token 0
        outs = pair.decode.step()
        for out in outs:
            tokens += out.new_token_ids
            logprobs += list(out.logprobs or ())
        if any(o.finished for o in outs):
            break
    pair.settle()
    assert len(logprobs) == len(tokens) == 6
    assert logprobs[0] == first  # decode reports token 0 with the logprobs prefill shipped
    ref = hf_logprobs(model, prompt, tokens)
    for i, (token, lp) in enumerate(zip(tokens, logprobs)):
        assert lp.logprob == pytest.approx(ref[i, token].item(), abs=1e-4)
        top = ref[i].topk(4)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    pair.assert_pools_full()


def test_forks_take_one_transfer_and_draw_what_each_would_alone(checkpoints):
    model = checkpoints(arch="llama")
    prompt = prompts_of((14,), seed=9)[0]  # three full blocks shared, a partial one per fork
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    forks = {f"f{s}": params.replace(seed=s) for s in (6, 7, 8)}
    pair = Pair(model)
    outs, _, descs = pair.generate([prompt], params, forks)
    assert len(descs) == len(pair.sent) == 1  # the prompt's KV shipped once for 4 sequences
    assert pair.decode_rt.engine.scheduler.num_prefill_tokens_computed == 3 * 2  # the tails
    alone = Pair(model)
    for seq, p in zip(outs, [params, *forks.values()]):
        assert seq == alone.generate([prompt], p)[0][0]
    assert len({tuple(seq) for seq in outs}) == 4
    greedy = SamplingParams(max_tokens=6)
    outs, _, _ = pair.generate([prompt], greedy, {"g1": greedy, "g2": greedy})
    assert outs == [hf_greedy(model, prompt, 6)] * 3
    pair.assert_pools_full()
    alone.assert_pools_full()


def test_forks_of_an_aborted_or_failed_transfer_fail_over_and_free_everything(checkpoints):
    pair = Pair(checkpoints(arch="llama"))
    prompt, params = prompts_of((9,), seed=2)[0], SamplingParams(max_tokens=4)
    pair.decode.admit("a", prompt, params, "p", {"a1": params, "a2": params})
    assert pair.decode.abort("a2")  # one fork leaves; the transfer stays for the others
    assert pair.decode.num_held == 2
    assert pair.decode.abort("a")
    failed = pair.decode.step()
    assert [(o.request_id, type(o).__name__) for o in failed] == [("a1", "FailedTransfer")]
    pair.decode.admit("b", prompt, params, "p", {"b1": params})
    assert pair.decode.fail_transfers_from("p") == 1
    assert {o.request_id for o in pair.decode.step()} == {"b", "b1"}
    assert pair.decode.num_held == 0
    pair.assert_pools_full()


def test_structured_output_holds_across_the_hand_off_and_bad_grammars_free_everything(
    checkpoints,
):
    """Token 0 is masked on the prefill side, the decode side's matcher continues from it: the
    pair gives what one engine gives. A grammar that does not compile (one the gateway would
    have refused) is the admission's 400 on decode and a RequestError on prefill, holding
    nothing."""
    from disagg.services.workers.decode import AdmitError
    from disagg.shared.engine.request import RequestError
    from disagg.shared.protocol.sampling import Structured

    model = checkpoints(arch="llama")
    pair = Pair(model)
    regex = Structured("regex", "[a-z]{3}-[0-9]{2}")
    params = SamplingParams(max_tokens=20, structured=regex)
    prompts = prompts_of((7, 12), seed=4)
    outs, firsts, _ = pair.generate(prompts, params)
    alone = runtime(model).engine.generate(prompts, params)
    assert outs == alone and [o[0] for o in outs] == firsts
    pair.assert_pools_full()
    bad = SamplingParams(structured=Structured("regex", "a(b"))
    with pytest.raises(AdmitError) as info:
        pair.decode.admit("bad", prompts[0], bad, "p")
    assert info.value.status == 400 and "does not compile" in str(info.value)
    with pytest.raises(AdmitError):  # a bad fork refuses the whole admission
        pair.decode.admit("good", prompts[0], params, "p", {"good-1": bad})
    assert pair.decode.num_held == 0
    desc = pair.decode.admit("r9", prompts[0], params, "p")
    with pytest.raises(RequestError, match="does not compile"):
        pair.prefill.submit(PrefillJob("r9", prompts[0], bad, desc))
    assert pair.decode.abort("r9")  # what the gateway does when the job is refused
    pair.decode.step()
    pair.assert_pools_full()
