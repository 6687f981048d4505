"""Every NATS subject name, built in this one place from validated ids."""

from __future__ import annotations

from dataclasses import dataclass

from disagg.shared.protocol.types import MessageError, check_id


@dataclass(frozen=True)
class Subjects:
    """Every NATS subject name. ``prefix`` is one or more dot-separated id tokens ("disagg",
    "staging.disagg"), so two deployments can share a NATS cluster."""

    prefix: str = "disagg"

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or len(self.prefix) > 128:
            raise MessageError("subject prefix must be a string of at most 128 chars")
        for token in self.prefix.split("."):
            check_id("subject prefix token", token)

    @property
    def completions(self) -> str:
        """Public completions API (JSON)."""
        return f"{self.prefix}.v1.completions"

    @property
    def chat_completions(self) -> str:
        """Public chat completions API (JSON)."""
        return f"{self.prefix}.v1.chat.completions"

    @property
    def api_abort(self) -> str:
        """Public abort (JSON ``{"id": ...}`` or ``{"reply": <inbox>}``) of a NATS API request."""
        return f"{self.prefix}.v1.abort"

    @property
    def place(self) -> str:
        """Scheduler placement (request/reply, queue group ``scheduler_queue``)."""
        return f"{self.prefix}.sched.place"

    @property
    def scheduler_queue(self) -> str:
        """Queue group the schedulers share, so each placement is answered once."""
        return f"{self.prefix}.sched"

    @property
    def scheduler_stats(self) -> str:
        """SchedulerStats from every scheduler (publish), for the gateways' metrics."""
        return f"{self.prefix}.sched.stats"

    @property
    def planner_decision(self) -> str:
        """PlannerDecisions (publish): desired prefill and decode worker counts."""
        return f"{self.prefix}.planner.decision"

    @property
    def heartbeat(self) -> str:
        """Worker heartbeats (publish)."""
        return f"{self.prefix}.worker.heartbeat"

    @property
    def gateway_heartbeat(self) -> str:
        """Gateway heartbeats (publish): workers abort the requests of a silent gateway."""
        return f"{self.prefix}.gateway.heartbeat"

    @property
    def transfer_stats(self) -> str:
        """TransferReports from prefill workers (publish), for the gateways' metrics."""
        return f"{self.prefix}.transfer.stats"

    def admit(self, decode_id: str) -> str:
        """A decode worker's admit endpoint."""
        return f"{self.prefix}.decode.{check_id('decode_id', decode_id)}.admit"

    def abort(self, worker_id: str) -> str:
        """A worker's abort endpoint (prefill or decode)."""
        return f"{self.prefix}.worker.{check_id('worker_id', worker_id)}.abort"

    def role(self, worker_id: str) -> str:
        """A worker's role-switch endpoint (RoleRequest)."""
        return f"{self.prefix}.worker.{check_id('worker_id', worker_id)}.role"

    def job(self, prefill_id: str) -> str:
        """A prefill worker's job endpoint."""
        return f"{self.prefix}.prefill.{check_id('prefill_id', prefill_id)}.job"

    def stream(self, gateway_id: str, request_id: str) -> str:
        """Where workers publish a request's StreamChunks."""
        gateway, request = check_id("gateway_id", gateway_id), check_id("request_id", request_id)
        return f"{self.prefix}.stream.{gateway}.{request}"

    def stream_wildcard(self, gateway_id: str) -> str:
        """A gateway's one subscription for the streams of all its requests."""
        return f"{self.prefix}.stream.{check_id('gateway_id', gateway_id)}.*"
