"""The scheduler's pure core: placement of a request on the workers of a ``WorkerTable``.

No sockets, no asyncio, no clock. The shell's loop is: ``table.update(heartbeat, now)`` on each
heartbeat, ``table.expire(now)`` before each placement (and on a timer), then
``place(table, PlaceInput(...), policy)`` and ``note_placed`` for what it decided.
``NoWorkerError`` maps to HTTP 503, ``NoCapacityError`` to 429 with ``Retry-After``,
``PromptTooLongError`` to 400.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import msgspec

from disagg.shared.cluster import WorkerState, WorkerTable
from disagg.shared.config import option
from disagg.shared.protocol.types import Role

# --- placement -----------------------------------------------------------------------------------


class PlacementError(Exception):
    """Base of the reasons placement can fail."""


class NoWorkerError(PlacementError):
    """No live, non-excluded worker of ``role`` (HTTP 503)."""

    def __init__(self, role: str) -> None:
        super().__init__(f"no {role} worker available")
        self.role = role


class NoCapacityError(PlacementError):
    """Decode workers exist but none has the free blocks for the prompt now (HTTP 429)."""

    def __init__(self, blocks_needed: int, retry_after_s: float) -> None:
        super().__init__(
            f"no decode worker has {blocks_needed} free KV blocks; retry in {retry_after_s:g} s"
        )
        self.blocks_needed = blocks_needed
        self.retry_after_s = retry_after_s


class PromptTooLongError(PlacementError):
    """No decode worker could ever hold the prompt, however idle (HTTP 400)."""

    def __init__(self, prompt_len: int, max_prompt_len: int) -> None:
        super().__init__(
            f"prompt of {prompt_len} tokens exceeds the largest worker limit of {max_prompt_len}"
        )
        self.prompt_len = prompt_len
        self.max_prompt_len = max_prompt_len


@dataclass(frozen=True)
class PlacementPolicy:
    """Weights of the decode cost model (see ``decode_cost``) and the prefill switches.

    With the defaults a full prefix hit is worth 0.5, the load term reaches 0.5 at
    ``load_scale`` requests in flight: a fully cached worker beats an otherwise equal idle one
    until it runs ``load_scale`` requests.
    """

    kv_weight: float = option(1.0, help="weight of KV usage (0 empty, 1 full) in decode cost")
    load_weight: float = option(1.0, help="weight of saturating load (running + waiting)")
    prefix_weight: float = option(0.5, help="weight of cached-prefix overlap in decode cost")
    load_scale: float = option(8.0, help="requests in flight at which the load term is 0.5")
    # benchmarks/prefix_costs.py on a CPU: even 8 prompt tokens in a batch-8 decode step add
    # 24% to it, more than the remote path's round trips cost. Worth it where a decode step is
    # memory-bound and a few prompt tokens ride along nearly free (GPUs).
    local_prefill_threshold_tokens: int = option(
        0,
        help="uncached prompt tokens below which the decode worker prefills itself; 0 = never",
        flag="--local-prefill-threshold",
    )
    prefix_routing: bool = option(
        True, help="place as if no worker had anything cached (for comparisons)"
    )
    retry_after_s: float = 1.0  # one heartbeat: free-block counts are fresh by then

    def __post_init__(self) -> None:
        for name in ("kv_weight", "load_weight", "prefix_weight", "local_prefill_threshold_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.load_scale <= 0:
            raise ValueError(f"load_scale must be positive, got {self.load_scale}")
        if self.retry_after_s <= 0:
            raise ValueError(f"retry_after_s must be positive, got {self.retry_after_s}")


@dataclass(frozen=True)
class PlaceInput:
    """What placement needs to know about one request.

    ``prefix_hashes`` are the chained hashes of the prompt's full blocks (``prefix_block_hashes``)
    at ``hash_block_size`` tokens per block (workers of another block size cannot match them);
    ``exclude`` holds workers that already failed this request; ``model``, when set, restricts
    placement to workers serving that model.
    """

    prompt_len: int
    prefix_hashes: Sequence[int] = ()
    exclude: frozenset[str] = frozenset()
    model: str | None = None
    hash_block_size: int | None = None  # None: every worker's block size

    def __post_init__(self) -> None:
        if self.prompt_len <= 0:
            raise ValueError(f"prompt_len must be positive, got {self.prompt_len}")
        object.__setattr__(self, "exclude", frozenset(self.exclude))


@dataclass(frozen=True)
class PlaceDecision:
    """Where a request runs; ``prefill_id`` None means the decode worker prefills locally."""

    decode_id: str
    prefill_id: str | None


def decode_cost(
    worker: WorkerState, prompt_len: int, overlap_blocks: int, policy: PlacementPolicy
) -> float:
    """Cost of admitting a prompt on ``worker``; lower is better.

    ``kv_weight * usage + load_weight * load - prefix_weight * cached``, each term in [0, 1]:

    - usage: fraction of the worker's blocks in use once this prompt's blocks are taken;
    - load: ``n / (n + load_scale)`` with ``n = running + waiting``, 0 when idle, saturating;
    - cached: fraction of the prompt's tokens already in the worker's prefix cache.
    """
    r = worker.report
    used_after = r.total_blocks - r.free_blocks + worker.blocks_for(prompt_len)
    usage = min(1.0, used_after / r.total_blocks)
    in_flight = r.running + r.waiting
    load = in_flight / (in_flight + policy.load_scale)
    cached = min(1.0, overlap_blocks * r.block_size / prompt_len)
    return policy.kv_weight * usage + policy.load_weight * load - policy.prefix_weight * cached


def place(table: WorkerTable, request: PlaceInput, policy: PlacementPolicy) -> PlaceDecision:
    """Choose a decode worker, then who prefills for it.

    Only pairs that can hand KV over are considered: a remote prefill worker must share the
    decode worker's model fingerprint and block size (the receiver rejects anything else).
    A decode worker with no such partner is still usable when it prefills the prompt itself:
    it is a "both" worker, or the prompt's uncached part is under the local-prefill threshold.
    Raises ``NoWorkerError`` when no usable worker of a needed role is alive,
    ``PromptTooLongError`` when no decode worker could ever hold the prompt, and
    ``NoCapacityError`` when some could but none has the free blocks now.
    """
    if not policy.prefix_routing:
        request = replace(request, prefix_hashes=())
    decodes = _candidates(table, Role.DECODE, request)
    if not decodes:
        raise NoWorkerError("decode")
    prefills = [s for s in _candidates(table, Role.PREFILL, request) if _could_ever_fit(s, request)]
    reachable = [
        d
        for d in decodes
        if d.can_prefill or _prefills_locally(d, request, policy) or _remote_prefills(prefills, d)
    ]
    if not reachable:
        raise NoWorkerError("prefill")
    decode = _choose_decode(reachable, request, policy)
    return PlaceDecision(decode.worker_id, _choose_prefill(prefills, request, decode, policy))


def _candidates(table: WorkerTable, role: Role, request: PlaceInput) -> list[WorkerState]:
    return [
        s
        for s in table.alive(role)
        if s.worker_id not in request.exclude
        and (request.model is None or s.report.model == request.model)
    ]


def _remote_prefills(prefills: list[WorkerState], decode: WorkerState) -> list[WorkerState]:
    """Dedicated prefill workers that can push KV into ``decode``. An aggregated ("both")
    worker never prefills for another worker: it serves admits, not prefill jobs."""
    return [
        p
        for p in prefills
        if p.report.fingerprint == decode.report.fingerprint
        and p.report.block_size == decode.report.block_size
        and not p.can_decode
    ]


def _max_prompt_len(worker: WorkerState) -> int:
    """Longest prompt this worker could ever take: one token of room must remain."""
    r = worker.report
    return min(r.max_model_len, r.total_blocks * r.block_size) - 1


def _could_ever_fit(worker: WorkerState, request: PlaceInput) -> bool:
    return request.prompt_len <= _max_prompt_len(worker)


def _choose_decode(
    decodes: list[WorkerState], request: PlaceInput, policy: PlacementPolicy
) -> WorkerState:
    """The decode worker with room of least ``decode_cost``; ties go to more free blocks, fewer
    running, then the smaller id."""
    feasible = [s for s in decodes if _could_ever_fit(s, request)]
    if not feasible:
        raise PromptTooLongError(request.prompt_len, max(_max_prompt_len(s) for s in decodes))
    fitting = [s for s in feasible if s.blocks_for(request.prompt_len) <= s.report.free_blocks]
    if not fitting:
        needed = min(s.blocks_for(request.prompt_len) for s in feasible)
        raise NoCapacityError(needed, policy.retry_after_s)

    def key(s: WorkerState) -> tuple[float, int, int, str]:
        overlap = _overlap(s, request)
        cost = decode_cost(s, request.prompt_len, overlap, policy)
        return (cost, -s.report.free_blocks, s.report.running, s.worker_id)

    return min(fitting, key=key)


def _choose_prefill(
    prefills: list[WorkerState], request: PlaceInput, decode: WorkerState, policy: PlacementPolicy
) -> str | None:
    """Who prefills for ``decode``: None (the decode worker itself) or the compatible prefill
    worker of least ``prefill_cost`` (ties: fewer running, then smaller id).

    Conditional disaggregation: any decode worker prefills locally when the prompt's part it
    has not cached is under ``policy.local_prefill_threshold_tokens`` (shipping KV would cost
    more than it saves). A "both" worker also does when no dedicated prefill worker is usable,
    or when the best one has more prompt tokens to compute before this one than it has.
    """
    if _prefills_locally(decode, request, policy):
        return None
    remote = _remote_prefills(prefills, decode)
    if not remote:
        assert decode.can_prefill, "place() only passes decode workers a prefill can reach"
        return None
    key = lambda s: (prefill_cost(s, request), s.report.running, s.worker_id)
    best = min(remote, key=key)
    # A "both" worker takes the prompt itself when the best dedicated prefill worker has more
    # to compute before it than the "both" worker does (1 P + 1 aggregated shares prefill).
    if decode.can_prefill and prefill_cost(decode, request) < prefill_cost(best, request):
        return None
    return best.worker_id


def prefill_cost(worker: WorkerState, request: PlaceInput) -> int:
    """Tokens ``worker`` must compute before this prompt's KV is complete: its queue plus the
    part of the prompt not in its own prefix cache (a prefill worker holding the prefix only
    computes the suffix)."""
    return worker.report.queued_prefill_tokens + _uncached_tokens(worker, request)


def _prefills_locally(decode: WorkerState, request: PlaceInput, policy: PlacementPolicy) -> bool:
    return _uncached_tokens(decode, request) < policy.local_prefill_threshold_tokens


def _uncached_tokens(worker: WorkerState, request: PlaceInput) -> int:
    cached = _overlap(worker, request) * worker.report.block_size
    return max(0, request.prompt_len - cached)


def _overlap(worker: WorkerState, request: PlaceInput) -> int:
    """Leading blocks of the request's prompt cached on ``worker``."""
    size = request.hash_block_size
    if size is not None and size != worker.report.block_size:
        return 0
    return worker.prefix_overlap(request.prefix_hashes)


# --- rate matching -------------------------------------------------------------------------------


def note_placed(table: WorkerTable, decision: PlaceDecision, prompt_len: int) -> None:
    """Count a placement into the workers' last reports until their next heartbeat.

    Reports are up to a heartbeat old; without this, every request of a burst would see the
    same numbers and land on the same worker. Ids the table does not know are skipped.
    """
    decode = table.get(decision.decode_id)
    if decode is not None:
        r = decode.report
        free = max(0, r.free_blocks - decode.blocks_for(prompt_len))
        table.revise(
            r.worker_id, msgspec.structs.replace(r, free_blocks=free, running=r.running + 1)
        )
    prefill = table.get(decision.prefill_id or "")
    if prefill is not None:
        r = prefill.report
        queued = r.queued_prefill_tokens + prompt_len
        table.revise(r.worker_id, msgspec.structs.replace(r, queued_prefill_tokens=queued))


def decode_pressure(table: WorkerTable) -> float:
    """Fraction of KV blocks in use across live, non-draining decode workers; 1.0 with none
    (no room anywhere)."""
    workers = table.alive(Role.DECODE)
    total = sum(s.report.total_blocks for s in workers)
    if total == 0:
        return 1.0
    return 1.0 - sum(s.report.free_blocks for s in workers) / total


def should_hold_prefill(table: WorkerTable, watermark: float) -> bool:
    """Whether to hold new prefill jobs back: decode KV usage is at or above ``watermark``,
    so prefilled KV would have nowhere to land soon."""
    if not 0.0 < watermark <= 1.0:
        raise ValueError(f"watermark must be in (0, 1], got {watermark}")
    return decode_pressure(table) >= watermark
