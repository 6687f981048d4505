"""The engine's scheduler: continuous batching with chunked prefill over a block pool. No torch.

Each step ``schedule()`` plans work under a token budget; the model runner computes it and
``update()`` takes the sampled tokens back. Running requests go first (a decode is one token),
then partial prefills, then waiting requests in arrival order. A request that cannot get a block
for its next token preempts the latest-arrived running request, which frees its blocks and is
recomputed later (greedy output is unchanged by this).

A *fork* (``add_request(..., after=parent)``: one of n sequences of one prompt) is held until
its parent's prompt is computed, then queued like any request: the prefix cache gives it the
parent's full blocks (shared, refcounted), and it computes only the prompt's last partial block
(at most ``block_size`` tokens) itself, so n sequences cost one prompt's prefill and its blocks.

Block ownership: the scheduler owns the blocks in ``Request.block_table`` from ``add_request``
(or from ``add_prefilled``, where the caller hands over blocks it reserved) until the request
finishes, is aborted or is preempted; then it returns them to the pool itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from disagg.shared.config import option
from disagg.shared.engine.block_pool import BlockPool, hash_block_tokens, prefix_block_hashes
from disagg.shared.engine.request import Request, RequestError, RequestOutput, Status, output_of
from disagg.shared.protocol.sampling import Logprob, SamplingParams


@dataclass(frozen=True)
class EngineConfig:
    """The engine's scheduling limits."""

    max_num_seqs: int = option(64, help="requests in one batch (decode: also held at once)")
    max_num_batched_tokens: int = option(
        512, help="token budget of one step; longer prompts are prefilled in chunks"
    )
    max_model_len: int | None = option(
        None, help="longest sequence (default: the model's, capped by what the KV cache holds)"
    )
    enable_prefix_caching: bool = option(
        True, help="do not reuse cached KV blocks of shared prefixes", flag="--prefix-caching"
    )

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be >= 2, got {self.max_model_len}")


@dataclass
class StepPlan:
    """One step's work: prefill chunks (request, tokens to run) first, then decodes.
    ``completing`` are the chunked requests whose prompt this step completes: they, then the
    decodes, get a token sampled (``sampled``)."""

    chunks: list[tuple[Request, int]] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    completing: list[Request] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.chunks or self.decodes)

    @property
    def sampled(self) -> list[Request]:
        return self.completing + self.decodes


class Scheduler:
    """Requests, their blocks, and what each step computes."""

    def __init__(
        self,
        pool: BlockPool,
        config: EngineConfig,
        *,
        vocab_size: int,
        eos_token_ids: Collection[int],
        model_max_len: int,
    ) -> None:
        self.pool, self.config = pool, config
        self.vocab_size, self.eos_ids = vocab_size, frozenset(eos_token_ids)
        capacity = pool.num_blocks * pool.block_size
        self.max_model_len = min(config.max_model_len or capacity, model_max_len, capacity)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._held: dict[str, list[Request]] = {}  # parent id -> forks waiting for its prompt
        self._arrivals = 0
        self._pending_outputs: list[RequestOutput] = []
        # Cumulative work done, for rate estimates: prompt tokens run through the model (cache
        # hits excluded) and tokens sampled.
        self.num_prefill_tokens_computed = 0
        self.num_tokens_sampled = 0

    # -- intake -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        after: str | None = None,
    ) -> None:
        """Queue a request; raises RequestError if it can never be served. With ``after`` (a
        request with the same prompt) it is a fork: held until that prompt is computed."""
        parent = self.requests.get(after) if after is not None else None
        if parent is not None and parent.prompt != list(prompt):
            raise RequestError(f"fork {request_id!r} has another prompt than {after!r}")
        req = self._new_request(request_id, prompt, params)
        if parent is None or parent.num_computed >= len(parent.prompt):
            self.waiting.append(req)
            return
        req.status, req.parent = Status.HELD, after
        self._held.setdefault(after, []).append(req)

    def add_prefilled(
        self,
        request_id: str,
        prompt: list[int],
        first_token: int,
        block_ids: list[int],
        params: SamplingParams,
        num_cached_tokens: int = 0,
        first_logprob: Logprob | None = None,
    ) -> None:
        """Join the batch with the prompt's K/V already in ``block_ids`` (from a prefill worker).

        On success the scheduler owns ``block_ids`` (references the caller took from this
        pool: allocated, or shared prefix-cache hits) and frees them when the request ends; on
        RequestError the caller still owns them. ``num_cached_tokens``: how many of the
        prompt's tokens the caller found in this pool's prefix cache (reported, not recomputed).
        """
        needed = self._blocks_for(len(prompt))
        if len(block_ids) != needed:
            raise RequestError(f"{needed} blocks hold {len(prompt)} tokens, got {len(block_ids)}")
        if not 0 <= first_token < self.vocab_size:
            raise RequestError(f"first token {first_token} is outside the vocabulary")
        req = self._new_request(request_id, prompt, params)
        req.block_table = list(block_ids)
        req.num_computed = len(prompt)
        req.num_cached_tokens = num_cached_tokens
        req.prompt_logprobs = None  # the prefill worker computed (and reported) them
        self._commit_full_blocks(req)
        req.status = Status.RUNNING
        self.running.append(req)
        self._append_token(req, first_token)
        self._pending_outputs.append(output_of(req, [first_token], first_logprob))

    def _new_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> Request:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        self.check_prompt(prompt)
        req = Request(request_id, list(prompt), params, self._arrivals)
        self._arrivals += 1
        self.requests[request_id] = req
        return req

    def check_prompt(self, prompt: list[int]) -> None:
        """Raise RequestError unless this engine could ever serve ``prompt``."""
        if not prompt:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; "
                f"the prompt has {len(prompt)} tokens and at least one must be generated"
            )

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if it is unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None or req.status is Status.FINISHED:
            return False
        self._finish(req, "abort")
        self._pending_outputs.append(output_of(req, []))
        return True

    # -- stepping ---------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._pending_outputs or self._held)

    @property
    def num_queued_prefill_tokens(self) -> int:
        return sum(r.num_pending for r in self.waiting) + sum(
            r.num_pending for r in self.running if r.num_pending > 1
        )

    def take_outputs(self) -> list[RequestOutput]:
        """Outputs produced outside a step (a prefilled request's first token, an abort)."""
        outputs, self._pending_outputs = self._pending_outputs, []
        return outputs

    def schedule(self) -> StepPlan:
        """Plan the next step under the token budget, reserving (or preempting for) blocks."""
        budget = self.config.max_num_batched_tokens
        plan = StepPlan()
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_pending, budget)
            if not self._reserve(req, n, allow_preempt=req.num_pending == 1):
                continue
            self._plan(plan, req, n)
            budget -= n
        while self.waiting and budget and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not req.block_table:
                self._reuse_cached_prefix(req)
            n = min(req.num_pending, budget)
            if not self._reserve(req, n, allow_preempt=False):
                self._release_blocks(req)  # a waiting request holds nothing
                req.num_computed = 0
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            self._plan(plan, req, n)
            budget -= n
        return plan

    @staticmethod
    def _plan(plan: StepPlan, req: Request, n: int) -> None:
        # A decode is one token of a request that is generating. A prompt whose last chunk
        # happens to be one token stays a prefill chunk: it completes the prompt, and the
        # per-layer callback (the prefill worker's KV hand-off) must see it.
        if n == 1 and req.num_computed > 0 and req.output:
            plan.decodes.append(req)
            return
        plan.chunks.append((req, n))
        if n == req.num_pending:
            plan.completing.append(req)

    def update(
        self,
        plan: StepPlan,
        tokens: list[int],
        logprobs: list[Logprob | None] | None = None,
        prompt_logprobs: dict[str, tuple[int, list[Logprob]]] | None = None,
    ) -> list[RequestOutput]:
        """The step ran: its tokens' K/V are cached, ``tokens`` (and their ``logprobs``, where
        asked) were sampled for ``plan.sampled`` (in that order); ``prompt_logprobs`` maps a
        request to (index of its first prompt token covered, their logprobs). Returns an output
        per request that got a token."""
        prompt_logprobs = prompt_logprobs or {}
        for req, n in plan.chunks:
            if req.request_id in self._held and req.num_computed + n >= len(req.prompt):
                self._release_forks(req.request_id)  # its blocks are committed just below
            if req.request_id in prompt_logprobs:  # the runner computes them only when wanted
                first, values = prompt_logprobs[req.request_id]
                have = len(req.prompt_logprobs)  # a recompute after preemption adds nothing
                req.prompt_logprobs += values[max(0, have + 1 - first) :]
            req.num_computed += n
            self._commit_full_blocks(req)
        self.num_prefill_tokens_computed += sum(n for _, n in plan.chunks)
        for req in plan.decodes:
            req.num_computed += 1
            self._commit_full_blocks(req)
        self.num_tokens_sampled += len(tokens)
        outputs = []
        logprobs = logprobs or [None] * len(tokens)
        for req, token, logprob in zip(plan.sampled, tokens, logprobs, strict=True):
            self._append_token(req, token)
            outputs.append(output_of(req, [token], logprob))
        return outputs

    # -- blocks -----------------------------------------------------------------------------

    def _reserve(self, req: Request, n: int, *, allow_preempt: bool) -> bool:
        """Make sure ``req`` has blocks for its next ``n`` tokens, preempting if allowed."""
        missing = self._blocks_for(req.num_computed + n) - len(req.block_table)
        while missing > 0 and not self.pool.can_allocate(missing):
            victim = self._preemption_victim(req) if allow_preempt else None
            if victim is None:
                return False
            self._preempt(victim)
        if missing > 0:
            req.block_table.extend(self.pool.allocate(missing))
        return True

    def _reuse_cached_prefix(self, req: Request) -> None:
        """Start ``req`` on the cached blocks of its longest cached prefix (they are shared);
        a request that wants prompt logprobs computes its whole prompt (their logits)."""
        if req.params.prompt_logprobs is not None and not req.output:
            return
        hit = self.cached_prefix(req.tokens(0, req.num_tokens))
        if hit:
            self.pool.incref(hit)
            req.block_table = list(hit)
            req.block_hashes = [self.pool.block_hash(b) for b in hit]
            req.num_computed = len(hit) * self.pool.block_size
            if not req.output:
                req.num_cached_tokens = req.num_computed

    def cached_prefix(self, tokens: list[int]) -> list[int]:
        """Block ids of the longest cached prefix of ``tokens`` worth reusing; no reference
        taken (incref them before the next allocation).

        The last token is always recomputed (its logits are needed), so the block holding it is
        never a shared one: at most (len(tokens) - 1) // block_size full blocks are reused.
        """
        if not self.config.enable_prefix_caching:
            return []
        bs = self.pool.block_size
        usable = (len(tokens) - 1) // bs
        return self.pool.lookup_prefix(prefix_block_hashes(tokens[: usable * bs], bs))

    def _commit_full_blocks(self, req: Request) -> None:
        """Give every newly full block its chained content hash, so later requests share it."""
        if not self.config.enable_prefix_caching:
            return
        bs = self.pool.block_size
        for i in range(len(req.block_hashes), req.num_computed // bs):
            parent = req.block_hashes[-1] if req.block_hashes else None
            block_hash = hash_block_tokens(parent, req.tokens(i * bs, (i + 1) * bs))
            self.pool.commit_full_block(req.block_table[i], block_hash)
            req.block_hashes.append(block_hash)

    def _preemption_victim(self, req: Request) -> Request | None:
        # `running` is scanned front to back, so everything after `req` is not yet planned this
        # step: the last one is the lowest-priority request that can give its blocks back.
        last = self.running[-1]
        return None if last is req else last

    def _preempt(self, req: Request) -> None:
        self._release_blocks(req)
        req.num_computed = 0
        req.status = Status.WAITING
        self.running.remove(req)
        self.waiting.appendleft(req)

    def _release_blocks(self, req: Request) -> None:
        # Reversed: the tail goes to the eviction queue first, keeping shareable prefixes longer.
        self.pool.free(reversed(req.block_table))
        req.block_table, req.block_hashes = [], []

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.pool.block_size)

    # -- finishing --------------------------------------------------------------------------

    def _append_token(self, req: Request, token: int) -> None:
        req.output.append(token)
        reason = self._stop_reason(req, token)
        if reason is not None:
            self._finish(req, reason)

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return "stop"
        if len(req.output) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _release_forks(self, parent_id: str) -> None:
        """Queue the forks held for ``parent_id`` at the front (they arrived with it)."""
        for fork in reversed(self._held.pop(parent_id, [])):
            fork.status = Status.WAITING
            self.waiting.appendleft(fork)

    def _finish(self, req: Request, reason: str) -> None:
        self._release_blocks(req)
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        elif req.status is Status.HELD:
            forks = self._held[req.parent]
            forks.remove(req)
            if not forks:
                del self._held[req.parent]
        self._release_forks(req.request_id)  # ended before its prompt did: forks go alone
        req.status, req.finish_reason = Status.FINISHED, reason
        self.requests.pop(req.request_id, None)
