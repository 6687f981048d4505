"""One request end to end, with no HTTP or NATS API of its own: admission under the gateway's
bound, generation through the backend, detokenization with stop strings, and the OpenAI bodies
(whole, or as stream chunks). The HTTP app and the NATS API both serve through ``Gateway``."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from disagg.services.gateway.backend import Backend, BackendError
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
from disagg.shared.protocol.sampling import Logprob


@dataclass
class Finished:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict[str, Any]
    logprobs: dict[str, Any] | None = None  # the OpenAI block of `token_ids`


class _Logprobs:
    """The workers' logprobs, in token order, formatted as the detokenizer releases ids."""

    def __init__(self, req: GenerationRequest, tokenizer) -> None:
        self.fmt = None
        if req.params.logprobs is not None:
            self.fmt = LogprobFormatter(tokenizer, req.kind, len(req.echo_prompt_text or ""))
        self.queue: deque[Logprob] = deque()

    def add(self, logprobs: list[Logprob] | None) -> None:
        if self.fmt is not None and logprobs:
            self.queue.extend(logprobs)

    def block(self, ids: list[int]) -> dict[str, Any] | None:
        if self.fmt is None or not ids or len(self.queue) < len(ids):
            return None
        return self.fmt.block(ids, [self.queue.popleft() for _ in ids])


class Slot:
    """One admitted request's place under --max-concurrent-requests; `release` is idempotent
    (whoever ends the request calls it)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self.released = False
        gateway.running += 1
        gateway.metrics.set_num_requests(gateway.running, 0)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._gateway.running -= 1
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
        self.created = int(time.time())

    def parse(self, kind: str, body: Any) -> GenerationRequest:
        return (
            parse_completion(body, self.ctx) if kind == "completion" else parse_chat(body, self.ctx)
        )

    def admit(self) -> Slot:
        """Take a slot; 429 beyond the bound, 503 while draining or with no worker of a role."""
        if self.draining:
            raise service_unavailable("the gateway is shutting down", 1)
        if self.running >= self.max_concurrent:
            self.metrics.observe_rejected("queue_full")
            raise queue_full(retry_after_s=1)
        if not self.backend.can_serve():
            self.metrics.observe_rejected("no_worker")
            raise service_unavailable("no worker can serve this request right now", 1)
        return Slot(self)

    async def chunks(self, req: GenerationRequest, slot: Slot) -> AsyncIterator[dict[str, Any]]:
        """The OpenAI chunk dicts of a streamed request (errors after the first become chunks)."""
        assembler = StreamAssembler(req)
        events = self._events(req, slot)
        try:
            async for item in events:
                if isinstance(item, Finished):
                    for chunk in assembler.finish(
                        item.finish_reason, item.usage, item.text, item.token_ids, item.logprobs
                    ):
                        yield chunk
                else:
                    for chunk in assembler.delta(*item):
                        yield chunk
        finally:
            await events.aclose()

    async def complete(self, req: GenerationRequest, slot: Slot) -> dict[str, Any]:
        text, ids, blocks = [], [], []
        async for item in self._events(req, slot):
            if isinstance(item, Finished):
                build = completion_response if req.kind == "completion" else chat_response
                blocks += [item.logprobs] if item.logprobs else []
                return build(
                    req,
                    "".join(text) + item.text,
                    item.finish_reason,
                    item.usage,
                    ids + item.token_ids,
                    merge(blocks),
                )
            text.append(item[0])
            ids.extend(item[1])
            blocks += [item[2]] if item[2] else []
        raise internal_error("the stream ended without a finish")

    async def _events(
        self, req: GenerationRequest, slot: Slot
    ) -> AsyncIterator[tuple[str, list[int], dict[str, Any] | None] | Finished]:
        """(text, ids, logprobs block) deltas, then one Finished; BackendError -> APIError.
        Releases `slot`."""
        start = last = time.monotonic()
        detok = StreamDetokenizer(self.ctx.tokenizer, req.stop, req.prompt_token_ids)
        logprobs = _Logprobs(req, self.ctx.tokenizer)
        ids: list[int] = []
        reason, cached, served = "error", 0, False
        try:
            async for event in self.backend.generate(
                req.request_id, req.prompt_token_ids, req.params
            ):
                # After a migration a worker may have cached generated tokens too: cap.
                cached, served = min(req.prompt_len, max(cached, event.num_cached_tokens)), True
                now = time.monotonic()
                self._observe_tokens(len(ids), len(event.token_ids), now - start, now - last)
                last = now
                final_stop = self._ends_on_stop_token(req, event)
                logprobs.add(event.logprobs)
                delta = detok.push(event.token_ids, final_token_is_stop=final_stop)
                ids += delta.token_ids
                block = logprobs.block(delta.token_ids)
                if delta.stopped or event.finish_reason is not None:
                    reason = "stop" if delta.stopped else event.finish_reason
                    tail = detok.flush()
                    usage = usage_body(req.prompt_len, len(ids), cached)
                    yield Finished(
                        delta.text + tail.text,
                        delta.token_ids + tail.token_ids,
                        reason,
                        usage,
                        block,
                    )
                    return
                if delta.text or delta.token_ids:
                    yield delta.text, delta.token_ids, block
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
