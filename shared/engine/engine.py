"""The engine: the scheduler and the model runner stepping together over one KV cache.

``step()`` = ``scheduler.schedule()`` -> ``runner.execute()`` -> ``scheduler.update()``. Scheduling
state lives in ``engine.scheduler`` (requests, queues, blocks); tensors in ``engine.runner``.
"""

from __future__ import annotations

from collections.abc import Iterable

from disagg.shared.engine.block_pool import BlockPool
from disagg.shared.engine.grammar import GrammarError, Grammars
from disagg.shared.engine.kv_cache import KVCache
from disagg.shared.engine.request import RequestError, RequestOutput
from disagg.shared.engine.runner import LayerCallback, ModelRunner
from disagg.shared.engine.scheduler import EngineConfig, Scheduler
from disagg.shared.model.llama import Transformer
from disagg.shared.protocol.sampling import SamplingParams


class Engine:
    """Aggregated engine: prefill and decode in one loop over one KV cache."""

    def __init__(
        self,
        model: Transformer,
        kv_cache: KVCache,
        pool: BlockPool,
        config: EngineConfig = EngineConfig(),
        on_layer: LayerCallback | None = None,
        grammars: Grammars | None = None,
    ) -> None:
        """``grammars``: how structured-output requests are compiled (None: refused)."""
        args = model.args
        self.scheduler = Scheduler(
            pool,
            config,
            vocab_size=args.vocab_size,
            eos_token_ids=args.eos_token_ids,
            model_max_len=args.max_model_len,
        )
        self.runner = ModelRunner(model, kv_cache, grammars)
        self.on_layer = on_layer
        self._generate_calls = 0

    @property
    def pool(self) -> BlockPool:
        return self.scheduler.pool

    @property
    def kv_cache(self) -> KVCache:
        return self.runner.kv_cache

    def add_request(
        self, request_id: str, prompt: list[int], params: SamplingParams, after: str | None = None
    ) -> None:
        """Queue a request (a fork of request ``after``, when given: see ``Scheduler``); raises
        RequestError if it can never be served."""
        self.prepare(params)
        self.scheduler.add_request(request_id, prompt, params, after)

    def prepare(self, params: SamplingParams) -> None:
        """Compile a structured request's grammar now (cached), so a bad one is the request's
        RequestError on admission, never a failed step."""
        if params.structured is None:
            return
        if params.ignore_eos:  # the grammar ends at EOS: nothing could follow it
            raise RequestError("structured output cannot ignore EOS")
        if self.runner.grammars is None:
            raise RequestError("this engine has no tokenizer for structured output")
        try:
            self.runner.grammars.compile(params.structured)
        except GrammarError as err:
            raise RequestError(f"the grammar does not compile: {err}") from None

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if unknown or already finished."""
        self.runner.forget([request_id])
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns an output for every request that got a token or ended."""
        outputs = self.scheduler.take_outputs()
        plan = self.scheduler.schedule()
        if plan:
            tokens = self.runner.execute(plan, self.on_layer)
            outputs += self.scheduler.update(
                plan, tokens, self.runner.last_logprobs, self.runner.last_prompt_logprobs
            )
        self.runner.forget(o.request_id for o in outputs if o.finished)
        return outputs

    def generate(
        self, prompts: Iterable[list[int]], params: SamplingParams, max_steps: int = 100_000
    ) -> list[list[int]]:
        """Run prompts to completion (offline use and tests); returns output ids per prompt."""
        self._generate_calls += 1
        ids = []
        for i, prompt in enumerate(prompts):
            ids.append(f"gen-{self._generate_calls}-{i}")
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
