"""n sequences of one prompt started as one request: placed, admitted and prefilled once, its KV
shipped once, and the n sequences run on the decode worker over the prompt's blocks.

Each sequence keeps a request (and stream) of its own; only their first attempt is shared. The
*leader* (sequence 0) waits, briefly, until the others have registered their streams, then
places and admits the prompt with them as ``AdmitRequest.forks``. A sequence the admit covered
is *attached* to its decode worker (and to the prefill worker until its first token); one that
was not (late, or the admit failed) starts on its own. From the admit on, an attached sequence
fails and moves like any request: a failed transfer or an abandoned leader gives each fork a
retryable error, and each one moves alone, with the tokens it has.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import Generic, TypeVar

from disagg.shared.protocol.sampling import SamplingParams

JOIN_S = 1.0  # how long the leader waits for its sequences' streams (they start together)
Placement = TypeVar("Placement")


class ForkGroup(Generic[Placement]):
    """The shared first attempt of one prompt's sequences (no I/O)."""

    def __init__(self, leader: str, forks: dict[str, SamplingParams]) -> None:
        self.leader, self.forks = leader, dict(forks)
        self._joined: dict[str, asyncio.Future[Placement | None]] = {}
        self._all_joined = asyncio.Event()
        self._closed = False
        if not forks:
            self._all_joined.set()

    def join(self, request_id: str) -> asyncio.Future[Placement | None]:
        """A sequence's stream is registered: its future says where it was admitted (None:
        start alone)."""
        future = asyncio.get_running_loop().create_future()
        if self._closed or request_id not in self.forks:
            future.set_result(None)
            return future
        self._joined[request_id] = future
        if len(self._joined) == len(self.forks):
            self._all_joined.set()
        return future

    async def placement(self, request_id: str, timeout: float) -> Placement | None:
        """A sequence: where the leader admitted it, or None (start alone), within `timeout`
        (above the leader's own bounds)."""
        future = self.join(request_id)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            return None

    async def gather(self, timeout: float = JOIN_S) -> dict[str, SamplingParams]:
        """The leader: wait (bounded) for the sequences; those that joined ride along."""
        with suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._all_joined.wait()
        self._closed = True
        return {request_id: self.forks[request_id] for request_id in self._joined}

    def attach(self, placed: Placement | None) -> None:
        """The leader's admit succeeded there (None: it failed; everyone goes alone).
        Only the first call counts."""
        for future in self._joined.values():
            if not future.done():
                future.set_result(placed)


def fork_groups(choices) -> dict[str, ForkGroup]:
    """Request id -> its group, for the choices that are n > 1 sequences of one prompt and do
    not ask for the prompt's logprobs (each computes its own: they need its logits)."""
    by_prompt: dict[tuple[int, ...], list] = {}
    for choice in choices:
        if choice.params.prompt_logprobs is None:
            by_prompt.setdefault(tuple(choice.prompt_token_ids), []).append(choice)
    groups: dict[str, ForkGroup] = {}
    for same in by_prompt.values():
        if len(same) > 1:
            group = ForkGroup(same[0].request_id, {c.request_id: c.params for c in same[1:]})
            groups |= {c.request_id: group for c in same}
    return groups
