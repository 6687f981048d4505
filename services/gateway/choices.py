"""A request with several choices (a list of prompts, or n > 1): every choice runs as a request
of its own, concurrently, and the answers merge into one OpenAI body or one stream (chunks
interleaved as they come, each with its choice's `index`; one usage for all at the end).

The n sequences of one prompt share their first attempt (`fork.ForkGroup`): the prompt is
placed, prefilled and shipped once, and they run on its blocks on one decode worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from disagg.services.gateway.fork import fork_groups
from disagg.services.gateway.openai.request import GenerationRequest
from disagg.services.gateway.openai.responses import usage, usage_chunk

if TYPE_CHECKING:
    from disagg.services.gateway.core import Gateway, Slot

STREAM_QUEUE = 1024  # chunks waiting to be sent, all choices together
_DONE = object()


def total_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """The usage of every choice together (prompt tokens counted per choice, as vLLM)."""
    cached = sum(u.get("prompt_tokens_details", {}).get("cached_tokens", 0) for u in usages)
    prompt = sum(u["prompt_tokens"] for u in usages)
    return usage(prompt, sum(u["completion_tokens"] for u in usages), cached)


async def merged_complete(gateway: Gateway, req: GenerationRequest, slot: Slot) -> dict:
    """One body with every choice, in index order."""
    from disagg.services.gateway.core import Slot

    groups = fork_groups(req.choices)
    try:
        bodies = await asyncio.gather(
            *(gateway.complete(c, Slot(None), groups.get(c.request_id)) for c in req.choices)
        )
    finally:
        slot.release()
    body = bodies[0] | {"choices": [b["choices"][0] for b in bodies]}
    body["usage"] = total_usage([b["usage"] for b in bodies])
    return body


async def merged_chunks(
    gateway: Gateway, req: GenerationRequest, slot: Slot
) -> AsyncIterator[dict[str, Any]]:
    """Every choice's chunks as they come; a failing choice fails the stream (the others are
    cancelled, which aborts them on their workers)."""
    from disagg.services.gateway.core import Slot

    queue: asyncio.Queue = asyncio.Queue(maxsize=STREAM_QUEUE)
    usages: list[dict[str, Any]] = []

    async def run(choice: GenerationRequest) -> None:
        try:
            group = groups.get(choice.request_id)
            async for chunk in gateway.stream_one(choice, Slot(None), usages, group):
                await queue.put(chunk)
            await queue.put(_DONE)
        except Exception as err:  # handed to the reader, which re-raises it (the reader keeps
            await queue.put(err)  # reading until then, so this put does not wait forever)

    quiet = [replace(c, include_usage=False) for c in req.choices]
    groups = fork_groups(quiet)
    error: Exception | None = None
    try:
        # run() hands its errors to this reader, so the group itself never cancels the
        # consumer; leaving it (an error, or a client that stopped reading) cancels the rest.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(run(c)) for c in quiet]
            try:
                left = len(tasks)
                while left:
                    item = await queue.get()
                    if item is _DONE:
                        left -= 1
                    elif isinstance(item, Exception):
                        error = item
                        break
                    else:
                        if req.include_usage:  # OpenAI: null on every chunk but the last
                            item["usage"] = None
                        yield item
            finally:
                for task in tasks:
                    task.cancel()
        if error is not None:
            raise error
        if req.include_usage:
            yield usage_chunk(req, total_usage(usages))
    finally:
        slot.release()
