"""`disagg decode` and `disagg worker` (both roles): admits requests, receives their KV over
ZeroMQ (or prefills them here: aggregated mode and conditional disaggregation), decodes them
in the continuous batch and streams the tokens.

It watches the prefill workers' heartbeats: when one goes silent, the transfers it was pushing
are failed at once and their blocks freed (rather than at their deadline).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Coroutine
from typing import Any

from nats.aio.msg import Msg

from disagg.services.workers.decode import AdmitError, DecodeWorker, FailedTransfer
from disagg.services.workers.service import WorkerService, log
from disagg.shared.cluster import PeerWatch
from disagg.shared.engine.request import RequestOutput
from disagg.shared.protocol.codec import ErrorBody, Message, decode, encode, error_reply
from disagg.shared.protocol.descriptor import TransferDescriptor
from disagg.shared.protocol.messages import (
    AdmitReply,
    AdmitRequest,
    Heartbeat,
    StreamChunk,
    prompt_logprob_chunks,
)
from disagg.shared.protocol.types import MessageError, Role
from disagg.shared.service import guarded, sleep_unless
from disagg.shared.transfer.sockets import KVReceiver

PEER_WATCH_S = 0.5


class DecodeService(WorkerService):
    def build_core(self) -> DecodeWorker:
        cfg = self.cfg
        advertise = cfg.advertise_host or (
            socket.gethostname() if cfg.zmq_host == "0.0.0.0" else cfg.zmq_host
        )
        self.receiver = KVReceiver(cfg.zmq_host, cfg.zmq_port, advertise_host=advertise)
        self.zmq_address = self.receiver.address
        return DecodeWorker(
            self.runtime.engine,
            self.receiver.core,
            fingerprint=self.runtime.fingerprint,
            transfer_deadline_s=cfg.transfer_deadline_s,
            wire_dtype=cfg.kv_transfer_dtype,
        )

    async def subscribe(self) -> None:
        self.peers = PeerWatch(lambda: self.nc.is_connected, self.cfg.service.missed_heartbeats)
        on_admit = guarded(self._on_admit, "admit")
        await self.nc.subscribe(self.subjects.admit(self.worker_id), cb=on_admit)
        await self.nc.subscribe(self.subjects.heartbeat, cb=self._on_heartbeat)

    def background(self, stop: asyncio.Event) -> list[Coroutine[Any, Any, None]]:
        return [self._watch_prefill_peers(stop)]

    def close_endpoints(self) -> None:
        self.receiver.close()

    async def _on_admit(self, msg: Msg) -> bytes:
        req = decode(AdmitRequest, msg.data)
        if (refused := self.refusal()) is not None:
            return refused
        forks = {f.request_id: f.sampling for f in req.forks}
        self.track([req.request_id, *forks], req.gateway_id)
        if req.num_generated:
            log.info("migrated_in", request_id=req.request_id, num_generated=req.num_generated)
        try:
            transfer = await self._admit(req, forks)
        except AdmitError as err:
            for request_id in (req.request_id, *forks):
                self.gateways.pop(request_id, None)
            kind = "rate_limit_error" if err.status == 429 else None
            return error_reply(str(err), err.status, kind=kind)
        log.info("admitted", request_id=req.request_id, prefill_id=req.prefill_id, forks=len(forks))
        return encode(AdmitReply(request_id=req.request_id, transfer=transfer))

    async def _admit(self, req: AdmitRequest, forks: dict) -> TransferDescriptor | None:
        """Reserve blocks for a transfer, or (no prefill worker) queue the prompt here."""
        if req.prefill_id is None:  # aggregated, or conditional disaggregation
            await self.loop.call(
                self.core.admit_local, req.request_id, req.prompt, req.sampling, forks
            )
            return None
        return await self.loop.call(
            self.core.admit, req.request_id, req.prompt, req.sampling, req.prefill_id, forks
        )

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            report = decode(Heartbeat, msg.data)
        except MessageError:
            return  # the scheduler logs bad heartbeats; a worker only needs the good ones
        if report.role != Role.DECODE:
            self.peers.beat(report, time.monotonic())

    async def _watch_prefill_peers(self, stop: asyncio.Event) -> None:
        """Fail the transfers of prefill workers whose heartbeats stopped."""
        while not stop.is_set():
            for worker_id in self.peers.expire(time.monotonic()):
                failed = await self.loop.call(self.core.fail_transfers_from, worker_id)
                log.warning("prefill_peer_dead", worker_id=worker_id, failed_transfers=failed)
            await sleep_unless(stop, PEER_WATCH_S)

    def messages_of(self, output: RequestOutput) -> list[tuple[str, Message]]:
        subject = self.stream_subject(output.request_id, done=output.finished)
        if subject is None:
            return []
        chunks = prompt_logprob_chunks(
            output.request_id, self.worker_id, output.prompt_logprobs or ()
        )  # this worker prefilled the prompt itself (agg, or a short prompt)
        return [(subject, c) for c in [*chunks, self._chunk(output)]]

    def _chunk(self, out: RequestOutput) -> StreamChunk:
        error = None
        if isinstance(out, FailedTransfer):  # the KV never came: another pair may serve it
            error = ErrorBody(message=out.error[:8192], type="service_unavailable", code=503)
        elif out.error is not None:
            error = ErrorBody(message=out.error[:8192], type="server_error", code=500)
        return StreamChunk(
            request_id=out.request_id,
            worker_id=self.worker_id,
            index=out.index,
            token_ids=list(out.new_token_ids),
            finish_reason=out.finish_reason if out.finished else None,
            num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens,
            error=error,
            logprobs=out.logprobs,
        )
