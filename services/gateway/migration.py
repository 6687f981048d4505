"""Retry and migration policy of one request, with no I/O.

A request runs as a sequence of *attempts*, each on one (prefill, decode) pair. An attempt that
ends because a worker failed it (died, timed out, refused with 429/503, lost part of the stream)
raises `WorkerLost`; the request then moves: the next attempt prefills the prompt plus every
token generated so far on another pair and decodes the rest, so the client sees one
uninterrupted stream and greedy output equals an uninterrupted run. After `limit` moves the
request fails with a clear error instead.

Placement avoids the workers that failed the request: dead ones always (`dead`), merely suspect
ones (a refusal, a timeout, a failed transfer) unless that leaves no worker of a role.

Each attempt has its own worker-side request id (`attempt_id`): late chunks or aborts of an
abandoned attempt can never touch the next one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.protocol.types import MAX_ID_LEN

# Worker replies that mean "not here, not now": the request may go elsewhere.
RETRYABLE_STATUS = frozenset({429, 503, 504})


class BackendError(Exception):
    """A request the workers could not serve; `status` is HTTP-like."""

    def __init__(
        self, status: int, message: str, kind: str | None = None, *, gone: bool = False
    ) -> None:
        """`gone`: nothing listens where the request was sent (the worker is not running)."""
        super().__init__(message)
        self.status, self.message, self.gone = status, message, gone
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


class WorkerLost(Exception):
    """An attempt failed because of a worker: `suspects` are avoided by the next placement,
    and never placed on again when `dead`."""

    def __init__(
        self, reason: str, suspects: Iterable[str | None] = (), *, dead: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason, self.dead = reason, dead
        self.suspects = frozenset(s for s in suspects if s)


def retryable(err: BackendError, worker_id: str) -> WorkerLost | BackendError:
    """What a worker's refusal means: move elsewhere (429, 503, 504) or fail (anything else)."""
    if err.status in RETRYABLE_STATUS:
        return WorkerLost(f"{worker_id}: {err.message}", [worker_id], dead=err.gone)
    return err


@dataclass
class Progress:
    """What one request has produced so far, across its attempts."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    generated: list[int] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)
    suspect: set[str] = field(default_factory=set)
    moves: int = 0

    @property
    def excluded(self) -> set[str]:
        """Workers the next placement should avoid."""
        return self.dead | self.suspect

    @property
    def attempt_id(self) -> str:
        """The worker-side id of the current attempt (the request id for the first)."""
        if self.moves == 0:
            return self.request_id
        suffix = f"-m{self.moves}"
        return self.request_id[: MAX_ID_LEN - len(suffix)] + suffix

    @property
    def remaining_tokens(self) -> int:
        return self.params.max_tokens - len(self.generated)

    def attempt_prompt(self) -> list[int]:
        """Prompt of the current attempt: the original prompt and every token generated."""
        return self.prompt + self.generated

    def attempt_params(self) -> SamplingParams:
        """Sampling of the current attempt: max_tokens shrunk by what was generated, and the
        output position it starts at, so seeded draws, penalties and ``min_tokens`` go on as
        in an uninterrupted run."""
        return self.params.replace(
            max_tokens=self.remaining_tokens,
            output_offset=self.params.output_offset + len(self.generated),
            # the client has the prompt's logprobs once a token went out: not asked again
            prompt_logprobs=None if self.generated else self.params.prompt_logprobs,
        )

    def move(self, lost: WorkerLost, limit: int) -> None:
        """Count one move away from `lost.suspects`; BackendError (503) once past `limit`."""
        if self.moves >= limit:
            raise BackendError(
                503,
                f"the request failed after {self.moves} migrations: {lost.reason}",
                "service_unavailable",
            )
        self.moves += 1
        (self.dead if lost.dead else self.suspect).update(lost.suspects)
