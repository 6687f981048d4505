"""How one request picks its tokens and when it stops: the sampling part of the request
contract, carried whole to every worker that serves the request (prefill, decode, after a move).

Token ids only: stop strings live in the gateway, which owns the tokenizer. The sampler that
applies these parameters is ``disagg.shared.engine.sampler``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from disagg.shared.protocol.types import (
    FINITE_MAX,
    MAX_STOP_TOKENS,
    MAX_TOKEN_ID,
    MAX_TOKENS,
    TokenId,
)


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """``temperature`` 0 is greedy; ``top_k`` 0 or -1 is off; ``seed`` None draws a fresh one."""

    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS)] = 16
    temperature: Annotated[float, Meta(ge=0.0, le=FINITE_MAX)] = 0.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=-1, le=MAX_TOKEN_ID)] = 0
    # torch's seed range is [-2**63, 2**64 - 1]; msgpack carries no int above it.
    seed: Annotated[int, Meta(ge=-(1 << 63))] | None = None
    stop_token_ids: Annotated[tuple[TokenId, ...], Meta(max_length=MAX_STOP_TOKENS)] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def replace(self, **changes: object) -> SamplingParams:
        """A copy with ``changes`` applied."""
        return msgspec.structs.replace(self, **changes)
