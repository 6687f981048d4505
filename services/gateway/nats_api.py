"""The public NATS API of the gateway: the OpenAI bodies as JSON over NATS request/reply.

- `disagg.v1.completions`, `disagg.v1.chat.completions`: the request body as JSON with a reply
  inbox. Not streamed: one reply, the response (or an OpenAI error body). Streamed: each chunk
  is published to the inbox, then `{"done": true}` (after an error body too).
- `disagg.v1.abort`: `{"id": "<response id>"}` (the "id" of the chunks) or
  `{"reply": "<inbox>"}` (usable before the first chunk). The gateway holding the request cancels
  it, which frees its KV blocks on the workers, sends an error body with code "aborted" and
  `{"done": true}` to the inbox, and replies `{"aborted": true}` to the abort if it has an inbox.
  A gateway that does not hold the request stays silent (several gateways may share NATS).
- A streamed request's inbox is probed every `--nats-probe-s` (5 s): `{"keepalive": true}` is
  sent to it as a NATS request that nobody needs to answer (clients skip it, as SSE clients skip
  comments). When no subscriber is left (NATS answers "no responders": the client closed its
  connection or unsubscribed without an abort) the request is aborted and its KV freed, within
  `--nats-probe-s` plus a second. A non-streamed request's single reply cannot be probed: it
  runs to its end (bounded by `max_tokens` and the gateway's timeouts).

Each request runs in a task of its own (one subscription's callback sees one message at a
time), and admission (429, 503) happens before that task exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS

from disagg.services.gateway.openai.errors import APIError, internal_error, invalid_request
from disagg.services.gateway.openai.request import GenerationRequest
from disagg.shared.log import get_logger
from disagg.shared.protocol.subjects import Subjects
from disagg.shared.service import publish, request

log = get_logger("disagg.gateway")
DONE = b'{"done": true}'
KEEPALIVE = b'{"keepalive": true}'
PROBE_TIMEOUT_S = 1.0  # a client that is there does not answer: the probe times out


def aborted() -> APIError:
    """The error a client that aborted its NATS request receives last."""
    return APIError(499, "The request was aborted by the client.", "aborted_error", None,
                        "aborted")  # fmt: skip


def parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise invalid_request(f"the body is not valid JSON: {err}") from None


def encode_json(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class NatsApi:
    def __init__(self, nc: NATS, gateway, subjects: Subjects, probe_s: float = 5.0) -> None:
        self.nc, self.gateway, self.subjects, self.probe_s = nc, gateway, subjects, probe_s
        self._gone: set[str] = set()  # inboxes whose client vanished (found by a probe)
        self._tasks: asyncio.TaskGroup | None = None
        self._by_inbox: dict[str, asyncio.Task] = {}
        self._inbox_of: dict[str, str] = {}  # response id -> inbox
        self._aborted: set[str] = set()  # inboxes whose task was cancelled by an abort

    async def serve(self, until: asyncio.Event, drain_s: float) -> None:
        """Take requests until `until`; then wait up to `drain_s` for those in flight and
        cancel the rest."""
        async with asyncio.TaskGroup() as self._tasks:
            subs = await self._subscribe()
            await until.wait()
            for sub in subs:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
            await self._drain(drain_s)
        self._tasks = None

    async def _subscribe(self) -> list:
        async def completion(msg) -> None:
            await self._on_request(msg, "completion")

        async def chat(msg) -> None:
            await self._on_request(msg, "chat")

        s = self.subjects
        return [
            await self.nc.subscribe(s.completions, cb=completion),
            await self.nc.subscribe(s.chat_completions, cb=chat),
            await self.nc.subscribe(s.api_abort, cb=self._on_abort),
        ]

    async def _drain(self, drain_s: float) -> None:
        running = list(self._by_inbox.values())
        if running:
            await asyncio.wait(running, timeout=drain_s)
        for task in self._by_inbox.values():
            task.cancel()

    async def _on_request(self, msg, kind: str) -> None:
        inbox = msg.reply
        if not inbox or inbox in self._by_inbox or self._tasks is None:
            return
        try:
            req = self.gateway.parse(kind, parse_json(msg.data))
            slot = self.gateway.admit(req)
        except APIError as err:
            await self._send(inbox, err.body(), done=_wants_stream(msg.data))
            return
        task = self._tasks.create_task(self._run(inbox, req, slot))
        task.add_done_callback(lambda _: self._forget(inbox, req.request_id, slot))
        self._by_inbox[inbox], self._inbox_of[req.request_id] = task, inbox
        if req.stream:
            probe = self._tasks.create_task(self._probe(inbox, task))
            task.add_done_callback(lambda _: probe.cancel())

    def _forget(self, inbox: str, request_id: str, slot) -> None:
        slot.release()  # also when the task was cancelled before it ever ran
        self._by_inbox.pop(inbox, None)
        self._inbox_of.pop(request_id, None)
        self._aborted.discard(inbox)
        self._gone.discard(inbox)

    async def _probe(self, inbox: str, task: asyncio.Task) -> None:
        """Cancel ``task`` once nobody listens on ``inbox`` any more."""
        while not task.done():
            await asyncio.sleep(self.probe_s)
            try:
                await request(self.nc, inbox, KEEPALIVE, PROBE_TIMEOUT_S)
            except nats.errors.NoRespondersError:
                log.info("nats_client_gone", inbox=inbox)
                self._gone.add(inbox)
                task.cancel()
                return
            except (nats.errors.Error, TimeoutError):
                continue  # there (it does not answer), or NATS is down: no verdict

    async def _run(self, inbox: str, req: GenerationRequest, slot) -> None:
        try:
            if req.stream:
                async for chunk in self.gateway.chunks(req, slot):
                    await self._send(inbox, chunk)
                await self._send(inbox, None, done=True)
            else:
                await self._send(inbox, await self.gateway.complete(req, slot))
        except APIError as err:
            await self._send(inbox, err.body(), done=req.stream)
        except asyncio.CancelledError:
            if inbox in self._gone:  # nobody to tell; leaving aborted it on the workers
                asyncio.current_task().uncancel()
                return
            if inbox not in self._aborted:
                raise  # shutdown: the group cancels us
            asyncio.current_task().uncancel()
            await self._send(inbox, aborted().body(), done=req.stream)
        except Exception:  # a bug here must not take the other requests down with it
            log.exception("nats_request_failed", request_id=req.request_id)
            await self._send(inbox, internal_error().body(), done=req.stream)

    async def _on_abort(self, msg) -> None:
        try:
            body = json.loads(msg.data)
            key = body.get("reply") or self._inbox_of.get(body.get("id"))
        except (ValueError, AttributeError, TypeError):
            return  # not ours to judge: another gateway may understand it no better
        task = self._by_inbox.get(key) if isinstance(key, str) else None
        if task is None:
            return
        self._aborted.add(key)
        task.cancel()
        log.info("nats_abort", inbox=key)
        if msg.reply:
            await publish(self.nc, msg.reply, b'{"aborted": true}')

    async def _send(self, inbox: str, body: Any, *, done: bool = False) -> None:
        if body is not None:
            await publish(self.nc, inbox, encode_json(body))
        if done:
            await publish(self.nc, inbox, DONE)


def _wants_stream(data: bytes) -> bool:
    """Whether a body that failed validation asked for a stream (then `done` follows)."""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return json.loads(data).get("stream") is True
    return False
