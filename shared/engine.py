"""The engine core: continuous batching with chunked prefill over a paged KV cache. No I/O.

Each `step()` schedules work under a token budget, runs one forward pass, samples, and returns what
changed. Running requests go first (a decode is one token), then partial prefills, then waiting
requests in arrival order. A request that cannot get a block for its next token preempts the
latest-arrived running request, which frees its blocks and is recomputed later (greedy output is
unchanged by this).

Block ownership: the engine owns the blocks in `Request.block_table` from `add_request` (or from
`add_prefilled`, where the caller hands over blocks it reserved) until the request finishes, is
aborted or is preempted; then the engine returns them to the pool itself.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from disagg.shared.kv import BlockPool, KVCache, hash_block_tokens, prefix_block_hashes
from disagg.shared.model.batch import ForwardBatch
from disagg.shared.model.llama import Transformer
from disagg.shared.sampling import SamplingParams, sample


class RequestError(ValueError):
    """A request the engine cannot take (bad prompt, too long, duplicate id)."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival: int
    output: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks committed
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_pending(self) -> int:
        """Tokens still to be run through the model before the next one can be sampled."""
        return self.num_tokens - self.num_computed

    def token_at(self, position: int) -> int:
        n = len(self.prompt)
        return self.prompt[position] if position < n else self.output[position - n]


@dataclass(frozen=True)
class RequestOutput:
    """What one step did for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None  # set with finish_reason "error"
    num_cached_tokens: int = 0

    @property
    def index(self) -> int:
        """Position in the output of the first token in `new_token_ids`."""
        return self.num_output_tokens - len(self.new_token_ids)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # token budget of one step; prompts longer are chunked
    max_model_len: int | None = None  # None: the model's (capped by what the cache holds)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


# Called for each layer of a step in which `completing` requests get their whole prompt cached.
LayerCallback = Callable[[int, list[Request]], None]


@dataclass
class _Plan:
    chunks: list[tuple[Request, int]]  # (request, tokens to run), prefill chunks first
    decodes: list[Request]


class Engine:
    """Aggregated engine: prefill and decode in one loop over one KV cache."""

    def __init__(
        self,
        model: Transformer,
        kv_cache: KVCache,
        pool: BlockPool,
        config: EngineConfig = EngineConfig(),
        on_layer: LayerCallback | None = None,
    ) -> None:
        self.model, self.kv_cache, self.pool, self.config = model, kv_cache, pool, config
        self.on_layer = on_layer
        self.eos_ids = frozenset(model.args.eos_token_ids)
        capacity = pool.num_blocks * pool.block_size
        self.max_model_len = min(
            config.max_model_len or capacity, model.args.max_model_len, capacity
        )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._arrivals = 0
        self._pending_outputs: list[RequestOutput] = []
        # Cumulative work done, for rate estimates: prompt tokens run through the model (cache
        # hits excluded) and tokens sampled.
        self.num_prefill_tokens_computed = 0
        self.num_tokens_sampled = 0

    # -- intake -----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        """Queue a request; raises RequestError if it can never be served."""
        req = self._new_request(request_id, prompt, params)
        self.waiting.append(req)

    def add_prefilled(
        self,
        request_id: str,
        prompt: list[int],
        first_token: int,
        block_ids: list[int],
        params: SamplingParams,
        num_cached_tokens: int = 0,
    ) -> None:
        """Join the batch with the prompt's K/V already in `block_ids` (from a prefill worker).

        On success the engine owns `block_ids` (references the caller took from this pool:
        allocated, or shared prefix-cache hits) and frees them when the request ends; on
        RequestError the caller still owns them. `num_cached_tokens`: how many of the prompt's
        tokens the caller found in this pool's prefix cache (reported, not recomputed).
        """
        needed = self._blocks_for(len(prompt))
        if len(block_ids) != needed:
            raise RequestError(f"{needed} blocks hold {len(prompt)} tokens, got {len(block_ids)}")
        if not 0 <= first_token < self.model.args.vocab_size:
            raise RequestError(f"first token {first_token} is outside the vocabulary")
        req = self._new_request(request_id, prompt, params)
        req.block_table = list(block_ids)
        req.num_computed = len(prompt)
        req.num_cached_tokens = num_cached_tokens
        self._commit_full_blocks(req)
        req.status = Status.RUNNING
        self.running.append(req)
        self._append_token(req, first_token)
        self._pending_outputs.append(self._output(req, [first_token]))

    def _new_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> Request:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        self.check_prompt(prompt)
        req = Request(
            request_id, list(prompt), params, self._arrivals, generator=params.make_generator()
        )
        self._arrivals += 1
        self.requests[request_id] = req
        return req

    def check_prompt(self, prompt: list[int]) -> None:
        """Raise RequestError unless this engine could ever serve `prompt`."""
        if not prompt:
            raise RequestError("the prompt is empty")
        vocab = self.model.args.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
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
        self._pending_outputs.append(self._output(req, []))
        return True

    # -- stepping ---------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._pending_outputs)

    @property
    def num_queued_prefill_tokens(self) -> int:
        return sum(r.num_pending for r in self.waiting) + sum(
            r.num_pending for r in self.running if r.num_pending > 1
        )

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns an output for every request that got a token or ended."""
        outputs, self._pending_outputs = self._pending_outputs, []
        plan = self._schedule()
        if not plan.chunks and not plan.decodes:
            return outputs
        sampled = self._run(plan)
        for req, token in sampled:
            self._append_token(req, token)
            outputs.append(self._output(req, [token]))
        return outputs

    def _schedule(self) -> _Plan:
        budget = self.config.max_num_batched_tokens
        plan = _Plan(chunks=[], decodes=[])
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
    def _plan(plan: _Plan, req: Request, n: int) -> None:
        # A decode is one token of a request that is generating. A prompt whose last chunk
        # happens to be one token stays a prefill chunk: it completes the prompt, and the
        # per-layer callback (the prefill worker's KV hand-off) must see it.
        if n == 1 and req.num_computed > 0 and req.output:
            plan.decodes.append(req)
        else:
            plan.chunks.append((req, n))

    def _reserve(self, req: Request, n: int, *, allow_preempt: bool) -> bool:
        """Make sure `req` has blocks for its next `n` tokens, preempting others if allowed."""
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
        """Start `req` on the cached blocks of its longest cached prefix (they are shared)."""
        hit = self.cached_prefix([req.token_at(p) for p in range(req.num_tokens)])
        if hit:
            self.pool.incref(hit)
            req.block_table = list(hit)
            req.block_hashes = [self.pool.block_hash(b) for b in hit]
            req.num_computed = len(hit) * self.pool.block_size
            if not req.output:
                req.num_cached_tokens = req.num_computed

    def cached_prefix(self, tokens: list[int]) -> list[int]:
        """Block ids of the longest cached prefix of `tokens` worth reusing; no reference taken
        (incref them before the next allocation).

        The last token is always recomputed (its logits are needed), so the block holding it is
        never a shared one: at most (len(tokens) - 1) // block_size full blocks are reused.
        """
        if not self.config.enable_prefix_caching:
            return []
        bs = self.pool.block_size
        usable = (len(tokens) - 1) // bs
        return self.pool.lookup_prefix(prefix_block_hashes(tokens[: usable * bs], bs))

    def _commit_full_blocks(self, req: Request) -> None:
        """Give every newly full block its chained content hash, so later requests can share it."""
        if not self.config.enable_prefix_caching:
            return
        bs = self.pool.block_size
        for i in range(len(req.block_hashes), req.num_computed // bs):
            parent = req.block_hashes[-1] if req.block_hashes else None
            block_hash = hash_block_tokens(
                parent, [req.token_at(p) for p in range(i * bs, (i + 1) * bs)]
            )
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

    def _run(self, plan: _Plan) -> list[tuple[Request, int]]:
        bs = self.pool.block_size
        prefills, completing = [], []
        for req, n in plan.chunks:
            start = req.num_computed
            chunk = [req.token_at(p) for p in range(start, start + n)]
            prefills.append((chunk, start, req.block_table))
            completing.append(n == req.num_pending)
        decodes = [
            (r.token_at(r.num_computed), r.num_computed, r.block_table) for r in plan.decodes
        ]
        batch = ForwardBatch.build(prefills, decodes, bs, completing, device=self.kv_cache.device)
        done = [req for (req, _), c in zip(plan.chunks, completing) if c]
        hook = None
        if self.on_layer is not None and done:
            hook = lambda layer: self.on_layer(layer, done)  # noqa: E731
        logits = self.model(batch, self.kv_cache, layer_hook=hook)
        for req, n in plan.chunks:
            req.num_computed += n
            self._commit_full_blocks(req)
        self.num_prefill_tokens_computed += sum(n for _, n in plan.chunks)
        for req in plan.decodes:
            req.num_computed += 1
            self._commit_full_blocks(req)
        sampled_reqs = done + plan.decodes
        tokens = sample(
            logits, [r.params for r in sampled_reqs], [r.generator for r in sampled_reqs]
        )
        self.num_tokens_sampled += len(tokens)
        return list(zip(sampled_reqs, tokens))

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

    def _finish(self, req: Request, reason: str) -> None:
        self._release_blocks(req)
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status, req.finish_reason = Status.FINISHED, reason
        self._forget(req)

    def _forget(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)

    def _release_blocks(self, req: Request) -> None:
        # Reversed: the tail goes to the eviction queue first, keeping shareable prefixes longer.
        self.pool.free(reversed(req.block_table))
        req.block_table, req.block_hashes = [], []

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.pool.block_size)

    @staticmethod
    def _output(req: Request, tokens: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=tokens,
            finished=req.status is Status.FINISHED,
            finish_reason=req.finish_reason,
            num_prompt_tokens=len(req.prompt),
            num_output_tokens=len(req.output),
            num_cached_tokens=req.num_cached_tokens,
        )

    # -- convenience ------------------------------------------------------------------------

    def generate(
        self, prompts: Iterable[list[int]], params: SamplingParams, max_steps: int = 100_000
    ) -> list[list[int]]:
        """Run prompts to completion (offline use and tests); returns output ids per prompt."""
        ids = []
        for i, prompt in enumerate(prompts):
            ids.append(f"gen-{self._arrivals}-{i}")
            self.add_request(ids[-1], prompt, params)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        for _ in range(max_steps):
            if not self.has_unfinished():
                break
            for out in self.step():
                results[out.request_id].extend(out.new_token_ids)
        else:
            raise RuntimeError(f"generation did not finish within {max_steps} steps")
        return [results[rid] for rid in ids]
