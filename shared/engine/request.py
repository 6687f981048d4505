"""A request as the engine holds it, and what a step reports for it. No torch."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from disagg.shared.protocol.sampling import Logprob, SamplingParams


class RequestError(ValueError):
    """A request the engine cannot take (bad prompt, too long, duplicate id)."""


class Status(enum.Enum):
    HELD = "held"  # a fork waiting for its parent's prompt to be computed
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival: int
    output: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks committed
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Of prompt tokens 1, 2, ... as computed here; None when the prompt was prefilled elsewhere.
    prompt_logprobs: list[Logprob] | None = field(default_factory=list)
    parent: str | None = None  # a fork: the request whose prompt (and cached blocks) it shares

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_pending(self) -> int:
        """Tokens still to be run through the model before the next one can be sampled."""
        return self.num_tokens - self.num_computed

    def token_at(self, position: int) -> int:
        n = len(self.prompt)
        return self.prompt[position] if position < n else self.output[position - n]

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end)."""
        return [self.token_at(p) for p in range(start, end)]


@dataclass(frozen=True)
class RequestOutput:
    """What one step did for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None  # set with finish_reason "error"
    num_cached_tokens: int = 0
    logprobs: tuple[Logprob, ...] | None = None  # one per new token, when the request asks
    # With the first token, when asked: one per prompt token after the first.
    prompt_logprobs: tuple[Logprob, ...] | None = None

    @property
    def index(self) -> int:
        """Position in the output of the first token in ``new_token_ids``."""
        return self.num_output_tokens - len(self.new_token_ids)


def output_of(req: Request, tokens: list[int], logprob: Logprob | None = None) -> RequestOutput:
    """What a step did for ``req``: ``tokens`` new (and the first's logprob, when asked); the
    prompt's logprobs ride with the first output token."""
    first = req.prompt_logprobs is not None and req.params.prompt_logprobs is not None
    return RequestOutput(
        request_id=req.request_id,
        new_token_ids=tokens,
        finished=req.status is Status.FINISHED,
        finish_reason=req.finish_reason,
        num_prompt_tokens=len(req.prompt),
        num_output_tokens=len(req.output),
        num_cached_tokens=req.num_cached_tokens,
        logprobs=None if logprob is None else (logprob,),
        prompt_logprobs=tuple(req.prompt_logprobs) if first and len(req.output) == 1 else None,
    )
