"""The model runner: lays a step's plan out as one forward batch, runs it, samples.

It owns the per-request sampling state (seeds, penalty counts) and reads the plan's requests;
it never changes scheduling state, which is the scheduler's to update from the sampled tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from disagg.shared.engine.grammar import Grammars, MaskFiller
from disagg.shared.engine.kv_cache import KVCache
from disagg.shared.engine.request import Request
from disagg.shared.engine.sampler import Row, SeqState, sample
from disagg.shared.engine.scheduler import StepPlan
from disagg.shared.model.batch import ForwardBatch
from disagg.shared.model.llama import Transformer
from disagg.shared.protocol.sampling import Logprob

# Called for each layer of a step in which `completing` requests get their whole prompt cached.
LayerCallback = Callable[[int, list[Request]], None]


class ModelRunner:
    def __init__(
        self, model: Transformer, kv_cache: KVCache, grammars: Grammars | None = None
    ) -> None:
        self.model, self.kv_cache, self.grammars = model, kv_cache, grammars
        self._masks = MaskFiller() if grammars is not None else None
        self.eos_ids = frozenset(model.args.eos_token_ids)
        self._states: dict[str, SeqState] = {}
        self.last_logprobs: list[Logprob | None] = []
        # request id -> (index of the first prompt token covered, their logprobs), this step
        self.last_prompt_logprobs: dict[str, tuple[int, list[Logprob]]] = {}

    def execute(self, plan: StepPlan, on_layer: LayerCallback | None = None) -> list[int]:
        """Run ``plan``'s forward pass; return one token per ``plan.sampled`` request (their
        logprobs, where asked, in ``last_logprobs``).

        ``on_layer(i, completing)`` runs once layer i's K/V of every token is in the cache.
        """
        batch = self._batch(plan)
        hook = None
        if on_layer is not None and plan.completing:
            hook = lambda layer: on_layer(layer, plan.completing)  # noqa: E731
        rows = [Row(self._state(r), r.output) for r in plan.sampled]
        masks = None  # the grammar masks, filled while the forward pass runs
        if self._masks is not None:
            matchers = [row.state.matcher for row in rows]
            masks = self._masks.start(matchers, self.model.args.vocab_size)
        logits = self.model(batch, self.kv_cache, layer_hook=hook)
        sample_rows, prompt_rows = self._rows(plan)
        self.last_prompt_logprobs = {
            req.request_id: (req.num_computed + 1, prompt_logprobs(logits[lo:hi], req, n))
            for req, n, lo, hi in prompt_rows
        }
        if prompt_rows:
            logits = logits[torch.tensor(sample_rows, dtype=torch.long)]
        masks = MaskFiller.result(masks)
        tokens, self.last_logprobs = sample(logits, rows, self.eos_ids, masks)
        return tokens

    @staticmethod
    def _rows(plan: StepPlan) -> tuple[list[int], list[tuple[Request, int, int, int]]]:
        """Which logits rows are sampled (in ``plan.sampled`` order), and which rows hold the
        prompt logprobs of each chunk that wants them: (request, chunk length, first, end)."""
        completing = {id(r) for r in plan.completing}
        sampled, prompt, row = [], [], 0
        for req, n in plan.chunks:
            if _wants_prompt_logprobs(req):
                prompt.append((req, n, row, row + n))
                row += n
                if id(req) in completing:
                    sampled.append(row - 1)
            elif id(req) in completing:
                sampled.append(row)
                row += 1
        return sampled + list(range(row, row + len(plan.decodes))), prompt

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop the sampling state of requests that ended."""
        for request_id in request_ids:
            self._states.pop(request_id, None)

    def _state(self, req: Request) -> SeqState:
        state = self._states.get(req.request_id)
        if state is None:
            state = SeqState.new(req.params, req.prompt, self.grammars)
            for token in req.output:  # a prefilled request joins with its first token
                state.observe(token)
            self._states[req.request_id] = state
        return state

    def _batch(self, plan: StepPlan) -> ForwardBatch:
        prefills = [
            (req.tokens(req.num_computed, req.num_computed + n), req.num_computed, req.block_table)
            for req, n in plan.chunks
        ]
        completing = {id(r) for r in plan.completing}
        decodes = [
            (r.token_at(r.num_computed), r.num_computed, r.block_table) for r in plan.decodes
        ]
        wants_logits = [id(req) in completing for req, _ in plan.chunks]
        wants_all = [_wants_prompt_logprobs(req) for req, _ in plan.chunks]
        return ForwardBatch.build(
            prefills, decodes, self.kv_cache.block_size, wants_logits,
            device=self.kv_cache.device, all_logits=wants_all,
        )  # fmt: skip


def _wants_prompt_logprobs(req: Request) -> bool:
    """A request computing its prompt here that asked for the prompt's logprobs."""
    return (
        req.params.prompt_logprobs is not None
        and req.prompt_logprobs is not None
        and not req.output
    )


def prompt_logprobs(logits: torch.Tensor, req: Request, n: int) -> list[Logprob]:
    """Logprobs of the prompt tokens a chunk's logits predict: the chunk starts at position
    ``req.num_computed`` and its row i predicts prompt token num_computed + 1 + i."""
    start = req.num_computed
    count = min(start + n, len(req.prompt) - 1) - start
    if count <= 0:
        return []
    logp = torch.log_softmax(logits[:count].float(), dim=-1)
    targets = torch.tensor(req.prompt[start + 1 : start + 1 + count], dtype=torch.long)
    own = logp.gather(1, targets[:, None])
    ranks = (logp > own).sum(dim=1).add_(1).tolist()
    k = req.params.prompt_logprobs or 0
    top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    top_v, top_i, own = top_v.tolist(), top_i.tolist(), own.squeeze(1).tolist()
    return [Logprob(own[j], tuple(zip(top_i[j], top_v[j])), rank=ranks[j]) for j in range(count)]
