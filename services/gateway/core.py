"""One request end to end, with no HTTP or NATS API of its own: admission under the gateway's
bound, generation through the backend, detokenization with stop strings, and the OpenAI bodies
(whole, or as stream chunks). The HTTP app and the NATS API both serve through ``Gateway``."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from disagg.services.gateway.backend import Backend, BackendError
from disagg.services.gateway.choices import merged_chunks, merged_complete
from disagg.services.gateway.detok import StreamDetokenizer
from disagg.services.gateway.metrics import GatewayMetrics
from disagg.services.gateway.openai.errors import (
    APIError,
    gateway_timeout,
    internal_error,
    invalid_request,
    queue_full,
    service_unavailable,
)
from disagg.services.gateway.openai.logprobs import LogprobFormatter, merge
from disagg.services.gateway.openai.parse import parse_chat, parse_completion
from disagg.services.gateway.openai.request import GenerationRequest, ParseContext
from disagg.services.gateway.openai.responses import (
    StreamAssembler,
    chat_response,
    completion_response,
    models_response,
)
from disagg.services.gateway.openai.responses import usage as usage_body
from disagg.services.gateway.stream import TokenEvent


@dataclass
class Delta:
    """Text released, the ids it consumed, and their OpenAI logprobs blocks (when asked)."""

    text: str
    token_ids: list[int]
    logprobs: dict[str, Any] | None = None  # of `token_ids` (and of an echoed prompt, first)
    prompt_logprobs: list | None = None  # vLLM's `prompt_logprobs`, on the first delta


@dataclass
class Finished(Delta):
    finish_reason: str = "stop"
    usage: dict[str, Any] = field(default_factory=dict)


class _Logprobs:
    """The workers' logprobs, in token order, formatted as the detokenizer releases ids."""

    def __init__(self, req: GenerationRequest, tokenizer) -> None:
        self.req, self.queue = req, deque()
        self.fmt = LogprobFormatter(tokenizer, req.kind, len(req.echo_prompt_text or ""))
        self.prompt_block: dict[str, Any] | None = None
        self.vllm_prompt: list | None = None

    def add(self, event: TokenEvent) -> None:
        if self.req.params.logprobs is not None and event.logprobs:
            self.queue.extend(event.logprobs)
        if event.prompt_logprobs is None:
            return
        ids, lps = self.req.prompt_token_ids, event.prompt_logprobs
        if self.req.echo_prompt_text is not None and self.req.params.logprobs is not None:
            self.prompt_block = self.fmt.prompt_block(ids, lps, self.req.params.logprobs)
        if self.req.prompt_logprobs is not None:
            self.vllm_prompt = self.fmt.vllm_prompt(ids, lps, self.req.prompt_logprobs)

    def delta(self, text: str, ids: list[int]) -> Delta:
        """``text`` and ``ids`` with their blocks (the prompt's go out once, first)."""
        blocks = [self.prompt_block] if self.prompt_block else []
        if self.req.params.logprobs is not None and ids and len(self.queue) >= len(ids):
            blocks.append(self.fmt.block(ids, [self.queue.popleft() for _ in ids]))
        prompt, self.prompt_block, self.vllm_prompt = self.vllm_prompt, None, None
        return Delta(text, ids, merge(blocks), prompt)


class Slot:
    """One admitted request's place under --max-concurrent-requests (``weight``: its choices);
    `release` is idempotent (whoever ends the request calls it)."""

    def __init__(self, gateway: Gateway | None, weight: int = 1) -> None:
        self._gateway, self.weight = gateway, weight
        self.released = gateway is None  # a choice's slot: its request holds the real one
        if gateway is not None:
            gateway.running += weight
            gateway.metrics.set_num_requests(gateway.running, 0)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._gateway.running -= self.weight
            self._gateway.metrics.set_num_requests(self._gateway.running, 0)


class Gateway:
    """One request end to end: parse, admit, generate, detokenize, assemble OpenAI bodies."""

    def __init__(
        self,
        backend: Backend,
        ctx: ParseContext,
        metrics: GatewayMetrics,
        eos_ids: frozenset[int],
        max_concurrent: int,
    ) -> None:
        self.backend, self.ctx, self.metrics = backend, ctx, metrics
        self.eos_ids = eos_ids
        self.max_concurrent = max_concurrent
        self.running = 0
        self.draining = False
        self.expected_workers: dict[str, int] = {}  # role -> count (--expect-workers)
        self.created = int(time.time())

    def parse(self, kind: str, body: Any) -> GenerationRequest:
        return (
            parse_completion(body, self.ctx) if kind == "completion" else parse_chat(body, self.ctx)
        )

    def admit(self, req: GenerationRequest | None = None) -> Slot:
        """Take a slot (one per choice of ``req``); 429 beyond the bound, 503 while draining or
        with no worker of a role."""
        weight = max(1, len(req.choices)) if req is not None else 1
        if self.draining:
            raise service_unavailable("the gateway is shutting down", 1)
        if self.running + weight > self.max_concurrent:
            self.metrics.observe_rejected("queue_full")
            raise queue_full(retry_after_s=1)
        if not self.backend.can_serve():
            self.metrics.observe_rejected("no_worker")
            raise service_unavailable("no worker can serve this request right now", 1)
        return Slot(self, weight)

    async def chunks(self, req: GenerationRequest, slot: Slot) -> AsyncIterator[dict[str, Any]]:
        """The OpenAI chunk dicts of a streamed request (errors after the first become chunks)."""
        if req.choices:
            async for chunk in merged_chunks(self, req, slot):
                yield chunk
            return
        async for chunk in self.stream_one(req, slot):
            yield chunk

    async def stream_one(
        self, req: GenerationRequest, slot: Slot, usage_out: list | None = None, group=None
    ) -> AsyncIterator[dict[str, Any]]:
        """One choice's chunks; its usage goes to ``usage_out`` when given (a merged stream
        sends one usage chunk for all its choices); ``group``: its prompt's ``ForkGroup``."""
        assembler = StreamAssembler(req)
        events = self._events(req, slot, group)
        try:
            async for item in events:
                if isinstance(item, Finished):
                    if usage_out is not None:
                        usage_out.append(item.usage)
                    for chunk in assembler.finish(
                        item.finish_reason, item.usage, item.text, item.token_ids, item.logprobs,
                        prompt_logprobs=item.prompt_logprobs,
                    ):  # fmt: skip
                        yield chunk
                else:
                    for chunk in assembler.delta(
                        item.text, item.token_ids, item.logprobs,
                        prompt_logprobs=item.prompt_logprobs,
                    ):  # fmt: skip
                        yield chunk
        finally:
            await events.aclose()

    async def complete(self, req: GenerationRequest, slot: Slot, group=None) -> dict[str, Any]:
        if req.choices:
            return await merged_complete(self, req, slot)
        text, ids, blocks, prompt = [], [], [], None
        async for item in self._events(req, slot, group):
            text.append(item.text)
            ids.extend(item.token_ids)
            blocks += [item.logprobs] if item.logprobs else []
            prompt = prompt or item.prompt_logprobs
            if isinstance(item, Finished):
                build = completion_response if req.kind == "completion" else chat_response
                return build(
                    req, "".join(text), item.finish_reason, item.usage, ids, merge(blocks),
                    prompt_logprobs=prompt,
                )  # fmt: skip
        raise internal_error("the stream ended without a finish")

    async def _events(self, req: GenerationRequest, slot: Slot, group) -> AsyncIterator[Delta]:
        """Deltas, the last one a Finished; BackendError -> APIError. Releases `slot`."""
        start = last = time.monotonic()
        detok = StreamDetokenizer(
            self.ctx.tokenizer, req.stop, req.prompt_token_ids,
            include_stop=req.include_stop_str, skip_special_tokens=req.skip_special_tokens,
        )  # fmt: skip
        logprobs = _Logprobs(req, self.ctx.tokenizer)
        ids: list[int] = []
        reason, cached, served = "error", 0, False
        try:
            async for event in self.backend.generate(
                req.request_id, req.prompt_token_ids, req.params, group
            ):
                # After a migration a worker may have cached generated tokens too: cap.
                cached, served = min(req.prompt_len, max(cached, event.num_cached_tokens)), True
                now = time.monotonic()
                self._observe_tokens(len(ids), len(event.token_ids), now - start, now - last)
                last = now
                final_stop = self._ends_on_stop_token(req, event)
                logprobs.add(event)
                delta = detok.push(event.token_ids, final_token_is_stop=final_stop)
                ids += delta.token_ids
                out = logprobs.delta(delta.text, delta.token_ids)
                if delta.stopped or event.finish_reason is not None:
                    reason = "stop" if delta.stopped else event.finish_reason
                    tail = detok.flush()
                    usage = usage_body(req.prompt_len, len(ids), cached)
                    yield Finished(
                        out.text + tail.text, out.token_ids + tail.token_ids, out.logprobs,
                        out.prompt_logprobs, reason, usage,
                    )  # fmt: skip
                    return
                if out.text or out.token_ids:
                    yield out
        except BackendError as err:
            raise _api_error(err) from None
        finally:
            slot.release()
            if served:
                self.metrics.observe_prefix_cache(req.prompt_len, cached)
            self.metrics.observe_request_finished(
                prompt_tokens=req.prompt_len,
                generation_tokens=len(ids),
                e2e_s=time.monotonic() - start,
                finished_reason=reason,
            )

    def _observe_tokens(self, before: int, new: int, since_start: float, gap: float) -> None:
        if before == 0 and new:
            self.metrics.observe_first_token(since_start)
        elif new:
            for _ in range(new):
                self.metrics.observe_inter_token(gap / new)

    def _ends_on_stop_token(self, req: GenerationRequest, event) -> bool:
        if event.finish_reason != "stop" or not event.token_ids:
            return False
        last = event.token_ids[-1]
        eos = last in self.eos_ids and not req.params.ignore_eos
        return eos or last in req.params.stop_token_ids

    def models(self) -> dict[str, Any]:
        return models_response(
            self.ctx.served_models, self.created, max_model_len=self.ctx.max_model_len
        )


def _api_error(err: BackendError) -> APIError:
    if err.status == 429:
        return queue_full(retry_after_s=1)
    if err.status == 503:
        return service_unavailable(err.message, 1)
    if err.status == 504:
        return gateway_timeout(err.message)
    if 400 <= err.status < 500:
        return invalid_request(err.message)
    return internal_error(err.message)
