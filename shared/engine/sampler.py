"""The sampler: one batched pass over a step's logits for every request in it.

Order, as vLLM's: logits processors (allowed ids, bad words, ``min_tokens``, logit bias), then
penalties (repetition over prompt and output as Hugging Face; presence and frequency over output
as OpenAI), then greedy argmax or temperature, top-k, top-p, min-p and a draw. Logprobs are
log-softmax of the raw float32 logits, before any of that (vLLM's default ``raw_logprobs``).

A seeded draw is inverse-CDF sampling with one uniform number per row hashed from
(seed, output position): no generator state, so where earlier tokens were drawn (prefill
worker, decode worker, another worker after a migration) cannot change a later draw.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from disagg.shared.protocol.sampling import Logprob, SamplingParams

_M32 = 0xFFFFFFFF


@dataclass
class SeqState:
    """What the sampler keeps for one request between steps."""

    params: SamplingParams
    seed: int
    counts: torch.Tensor | None = None  # output token counts [vocab] (penalized requests)
    in_prompt: torch.Tensor | None = None  # bool [vocab]: tokens of the prompt (repetition)

    @classmethod
    def new(cls, params: SamplingParams, prompt: Sequence[int], vocab: int) -> SeqState:
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        state = cls(params, seed)
        if params.penalized:
            carried = list(prompt[len(prompt) - params.output_offset :])
            state.counts = torch.bincount(torch.tensor(carried, dtype=torch.long), minlength=vocab)
            state.in_prompt = torch.zeros(vocab, dtype=torch.bool)
            state.in_prompt[torch.tensor(list(prompt), dtype=torch.long)] = True
        return state

    def observe(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1


@dataclass(frozen=True)
class Row:
    """One row of a step's logits: its request's state, outputs so far (this attempt's)."""

    state: SeqState
    output: Sequence[int]


def sample(
    logits: torch.Tensor, rows: Sequence[Row], eos_ids: Collection[int] = ()
) -> tuple[list[int], list[Logprob | None]]:
    """One token per row of ``logits`` [rows, vocab] (float32), and logprobs where asked."""
    params = [r.state.params for r in rows]
    raw = logits
    if any(p.processed for p in params):
        logits = _process(logits.clone(), rows, eos_ids)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    chosen = logits.argmax(dim=-1)
    if sampled:
        index = torch.tensor(sampled, dtype=torch.long)
        chosen[index] = _draw(logits[index], [rows[i] for i in sampled])
    tokens = chosen.tolist()
    for row, token in zip(rows, tokens):
        row.state.observe(token)
    return tokens, _logprobs(raw, params, chosen)


# -- logits processors and penalties -------------------------------------------------------------


def _process(logits: torch.Tensor, rows: Sequence[Row], eos_ids: Collection[int]) -> torch.Tensor:
    """Apply every row's processors and penalties in place; returns ``logits``."""
    neg_inf = float("-inf")
    for i, row in enumerate(rows):  # only rows that have any, and each a few tensor ops
        p = row.state.params
        if not p.processed:
            continue
        if p.allowed_token_ids is not None:
            keep = torch.zeros(logits.shape[1], dtype=torch.bool)
            keep[list(p.allowed_token_ids)] = True
            logits[i].masked_fill_(~keep, neg_inf)
        if banned := _banned_words(p, row.output):
            logits[i, banned] = neg_inf
        if p.output_offset + len(row.output) < p.min_tokens:
            stops = [*p.stop_token_ids, *([] if p.ignore_eos else eos_ids)]
            if stops:
                logits[i, stops] = neg_inf
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias)
            logits[i, list(ids)] += torch.tensor(bias, dtype=logits.dtype)
    penalized = [i for i, r in enumerate(rows) if r.state.params.penalized]
    if penalized:
        index = torch.tensor(penalized, dtype=torch.long)
        logits[index] = _penalize(logits[index], [rows[i].state for i in penalized])
    return logits


def _banned_words(p: SamplingParams, output: Sequence[int]) -> list[int]:
    """Last tokens of the bad words whose other tokens end the output so far."""
    banned = []
    for word in p.bad_words_token_ids:
        head = list(word[:-1])
        if not head or list(output[len(output) - len(head) :]) == head:
            banned.append(word[-1])
    return banned


def _penalize(logits: torch.Tensor, states: Sequence[SeqState]) -> torch.Tensor:
    """Repetition (HF: divide a positive logit, multiply a negative one), then frequency and
    presence (OpenAI: minus ``count * frequency + (count > 0) * presence``), batched."""
    counts = torch.stack([s.counts for s in states]).to(logits.dtype)
    seen = torch.stack([s.in_prompt for s in states]) | (counts > 0)
    rep = torch.tensor([s.params.repetition_penalty for s in states], dtype=logits.dtype)[:, None]
    freq = torch.tensor([s.params.frequency_penalty for s in states], dtype=logits.dtype)[:, None]
    pres = torch.tensor([s.params.presence_penalty for s in states], dtype=logits.dtype)[:, None]
    scaled = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, scaled, logits)
    return logits - counts * freq - (counts > 0).to(logits.dtype) * pres


# -- the draw ---------------------------------------------------------------------------------


def _draw(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then inverse-CDF with a (seed, position) uniform."""
    params = [r.state.params for r in rows]
    vocab = logits.shape[1]
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)[:, None]
    probs = torch.softmax(logits / temps, dim=-1)
    probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(vocab)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params])[:, None]
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype)[:, None]
    min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype)[:, None]
    # Drop a token past top-k, when the mass before it already reaches top_p, or when it is
    # under min_p of the most likely one; the most likely token always stays.
    drop = (rank >= top_k) | (probs.cumsum(-1) - probs >= top_p) | (probs < min_p * probs[:, :1])
    drop[:, 0] = False
    probs = probs.masked_fill(drop, 0.0).double()
    cdf = probs.cumsum(-1)
    positions = [p.output_offset + len(r.output) for p, r in zip(params, rows)]
    u = uniform([r.state.seed for r in rows], positions).double()
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=vocab - 1)
    return order.gather(1, picked).squeeze(1)


def uniform(seeds: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
    """A number in (0, 1) per (seed, position), the same on every machine (float64 [rows])."""
    # torch has no uint64 arithmetic: the 64-bit seed goes in as two 32-bit halves.
    lo = torch.tensor([s & _M32 for s in seeds], dtype=torch.long)
    hi = torch.tensor([(s >> 32) & _M32 for s in seeds], dtype=torch.long)
    pos = torch.tensor(positions, dtype=torch.long)
    h = _mix(lo ^ _mix(hi ^ _mix(pos ^ 0x5BD1E995)))
    h2 = _mix(h ^ 0x27D4EB2F)
    bits = ((h >> 8) << 24) | (h2 >> 8)  # 48 bits
    return (bits.double() + 0.5) / float(1 << 48)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) in int64 without overflow: every product is
    of a value below 2**32 and a constant below 2**31."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x46CA68B5) & _M32
    return x ^ (x >> 16)


# -- logprobs ---------------------------------------------------------------------------------


def _logprobs(
    raw: torch.Tensor, params: Sequence[SamplingParams], chosen: torch.Tensor
) -> list[Logprob | None]:
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[Logprob | None] = [None] * len(params)
    if not wanted:
        return out
    index = torch.tensor(wanted, dtype=torch.long)
    logp = torch.log_softmax(raw[index].float(), dim=-1)
    own = logp.gather(1, chosen[index][:, None]).squeeze(1).tolist()
    n = max(params[i].logprobs for i in wanted)
    top_v, top_i = logp.topk(n, dim=-1) if n else (logp[:, :0], logp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(wanted):
        k = params[i].logprobs
        out[i] = Logprob(own[j], tuple(zip(top_i[j][:k], top_v[j][:k])))
    return out
