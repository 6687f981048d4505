"""How one request picks its tokens and when it stops: the sampling part of the request
contract, carried whole to every worker that serves the request (prefill, decode, after a move).

Token ids only: stop strings live in the gateway, which owns the tokenizer. The sampler that
applies these parameters is ``disagg.shared.engine.sampler``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from disagg.shared.protocol.types import (
    FINITE_MAX,
    MAX_STOP_TOKENS,
    MAX_TOKEN_ID,
    MAX_TOKENS,
    TokenId,
)

Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
Bias = Annotated[float, Meta(ge=-100.0, le=100.0)]
MAX_LOGPROBS = 20  # top logprobs per token, as OpenAI
MAX_BIASED = 1024  # logit_bias entries
MAX_BAD_WORDS = 128


LogprobValue = Annotated[float, Meta(le=0.0)]  # -inf allowed (a masked token); NaN is not


class Logprob(msgspec.Struct, frozen=True, array_like=True):
    """One output token's logprob and the top ``len(top)`` (token id, logprob), highest first:
    log-softmax of the raw float32 logits (vLLM's default ``raw_logprobs``)."""

    logprob: LogprobValue
    top: Annotated[tuple[tuple[TokenId, LogprobValue], ...], Meta(max_length=MAX_LOGPROBS)] = ()
    rank: Annotated[int, Meta(ge=1)] | None = None  # the token's rank in the vocabulary (prompt)


MAX_GRAMMAR_CHARS = 64 * 1024


class Structured(msgspec.Struct, frozen=True):
    """A grammar the output follows (structured output): ``json`` a JSON schema (its text),
    ``regex`` a regular expression, ``grammar`` EBNF (GBNF). The gateway turns what clients
    send (``response_format``, ``structured_outputs``, ``guided_*``, tools) into one of these."""

    kind: Literal["json", "regex", "grammar"]
    spec: Annotated[str, Meta(min_length=1, max_length=MAX_GRAMMAR_CHARS)]


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How tokens are picked; each field has vLLM's meaning.

    ``temperature`` 0 is greedy; ``top_k`` 0 or -1 is off; ``seed`` None draws a fresh one.
    Penalties act on the logits before temperature: ``repetition_penalty`` over prompt and
    output tokens (as Hugging Face), ``presence_penalty``/``frequency_penalty`` over output
    tokens (OpenAI's formula). ``logprobs``: how many top logprobs to return per output token
    (0: only the sampled token's; None: none); ``prompt_logprobs`` the same for every prompt
    token after the first (computed where the prompt is prefilled, never from a prefix cache).

    ``output_offset`` is the output position of this attempt's first token: after a move the
    tokens generated so far end the prompt, and the last ``output_offset`` prompt tokens count as
    output (penalties, ``min_tokens``). A seeded draw depends only on (seed, output position),
    so a request sampled partly on a prefill worker, partly on a decode worker and partly after
    a migration draws what it would have drawn on one worker.

    ``structured``: only tokens its grammar accepts are drawn, the first one too (on the
    prefill worker); a worker that continues a request advances its matcher over the tokens
    generated so far (``output_offset``) before it samples; EOS only where the grammar may end.
    """

    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS)] = 16
    temperature: Annotated[float, Meta(ge=0.0, le=FINITE_MAX)] = 0.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=-1, le=MAX_TOKEN_ID)] = 0
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    # torch's seed range is [-2**63, 2**64 - 1]; msgpack carries no int above it.
    seed: Annotated[int, Meta(ge=-(1 << 63))] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=FINITE_MAX)] = 1.0
    logit_bias: Annotated[tuple[tuple[TokenId, Bias], ...], Meta(max_length=MAX_BIASED)] = ()
    allowed_token_ids: Annotated[tuple[TokenId, ...], Meta(min_length=1)] | None = None
    bad_words_token_ids: Annotated[
        tuple[Annotated[tuple[TokenId, ...], Meta(min_length=1, max_length=64)], ...],
        Meta(max_length=MAX_BAD_WORDS),
    ] = ()
    min_tokens: Annotated[int, Meta(ge=0, le=MAX_TOKENS)] = 0
    stop_token_ids: Annotated[tuple[TokenId, ...], Meta(max_length=MAX_STOP_TOKENS)] = ()
    ignore_eos: bool = False
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    prompt_logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    output_offset: Annotated[int, Meta(ge=0, le=MAX_TOKENS)] = 0
    structured: Structured | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether the logits depend on the tokens so far (penalties)."""
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )

    @property
    def processed(self) -> bool:
        """Whether anything but temperature/top-k/top-p changes the logits of some step."""
        return self.penalized or bool(
            self.logit_bias
            or self.allowed_token_ids is not None
            or self.bad_words_token_ids
            or self.min_tokens
            or self.structured is not None
        )

    def replace(self, **changes: object) -> SamplingParams:
        """A copy with ``changes`` applied."""
        return msgspec.structs.replace(self, **changes)
