"""`disagg prefill`: takes prefill jobs, ships each layer's KV over ZeroMQ, streams the first
token straight to the gateway, and reports every transfer for the gateways' metrics."""

from __future__ import annotations

from typing import Any

from nats.aio.msg import Msg

from disagg.services.workers.prefill import (
    PrefillJob,
    PrefillResult,
    PrefillWorker,
    QueueFullError,
    SentTransfer,
)
from disagg.services.workers.service import WorkerService
from disagg.shared.engine.request import RequestError
from disagg.shared.protocol.codec import ErrorBody, Message, decode, encode, error_reply
from disagg.shared.protocol.messages import (
    JobReply,
    StreamChunk,
    TransferReport,
    prompt_logprob_chunks,
)
from disagg.shared.protocol.messages import PrefillJob as PrefillJobMsg
from disagg.shared.service import guarded
from disagg.shared.transfer.sockets import KVSender


class PrefillService(WorkerService):
    def build_core(self) -> PrefillWorker:
        self.sender = KVSender(self.runtime.fingerprint)
        limit = self.cfg.max_queued_prefill_tokens
        return PrefillWorker(self.runtime.engine, self.sender.core, max_queued_tokens=limit)

    async def subscribe(self) -> None:
        on_job = guarded(self._on_job, "prefill job")
        await self.nc.subscribe(self.subjects.job(self.worker_id), cb=on_job)

    def collect(self) -> list:
        return self.core.step() + self.core.poll_sent()

    def close_endpoints(self) -> None:
        self.sender.close()

    async def _on_job(self, msg: Msg) -> bytes:
        req = decode(PrefillJobMsg, msg.data)
        if (refused := self.refusal()) is not None:
            return refused
        self.track([req.request_id], req.gateway_id)
        job = PrefillJob(req.request_id, req.prompt, req.sampling, req.transfer)
        try:
            await self.loop.call(self.core.submit, job)
        except QueueFullError as err:
            self.gateways.pop(req.request_id, None)
            return error_reply(str(err), 429, kind="rate_limit_error")
        except RequestError as err:
            self.gateways.pop(req.request_id, None)
            return error_reply(str(err), 400)
        return encode(JobReply(request_id=req.request_id, accepted=True))

    def messages_of(self, output: Any) -> list[tuple[str, Message]]:
        if isinstance(output, SentTransfer):
            return [(self.subjects.transfer_stats, self._transfer_report(output))]
        subject = self.stream_subject(output.request_id, done=True)
        if subject is None:
            return []
        chunks = prompt_logprob_chunks(
            output.request_id, self.worker_id, output.prompt_logprobs or ()
        )
        return [(subject, c) for c in [*chunks, self._first_token(output)]]

    def _transfer_report(self, sent: SentTransfer) -> TransferReport:
        st = sent.stats
        ok = sent.error is None and st.done_sent_at == st.done_sent_at  # NaN: never sent
        return TransferReport(
            request_id=sent.request_id,
            worker_id=self.worker_id,
            payload_bytes=st.payload_bytes,
            seconds=max(0.0, st.done_sent_at - st.begun_at) if ok else 0.0,
            exposed_seconds=max(0.0, st.exposed_s) if ok else 0.0,
            ok=ok,
        )

    def _first_token(self, result: PrefillResult) -> StreamChunk:
        """The first token, straight to the gateway (or why there is none)."""
        error, tokens, reason = None, [result.first_token], None
        if result.first_token is None:
            # Nearly always the transfer (decode unreachable or gone): another pair may serve it.
            message = result.error or "prefill failed"
            error = ErrorBody(message=message[:8192], type="service_unavailable", code=503)
            tokens, reason = [], "error"
        return StreamChunk(
            request_id=result.request_id,
            worker_id=self.worker_id,
            index=0,
            token_ids=tokens,
            finish_reason=reason,
            num_prompt_tokens=0,
            num_cached_tokens=result.num_cached_tokens,
            error=error,
            logprobs=None if result.logprob is None else (result.logprob,),
        )
