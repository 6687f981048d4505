"""A validated OpenAI request (``GenerationRequest``) and what validation knows of the model
(``ParseContext``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.tokenizer import Tokenizer

if TYPE_CHECKING:
    from disagg.services.gateway.openai.tools import ToolPlan

Kind = Literal["completion", "chat"]
ROLES = ("system", "developer", "user", "assistant", "tool")
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a C long, as vLLM accepts
# OpenAI's (and vLLM's) max_tokens when a /v1/completions body has none; chat fills the context.
COMPLETION_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class ParseContext:
    """What validation needs to know about the served model, and the gateway's limits.

    `vocab_size` bounds prompt and stop token ids (default: the tokenizer's, which excludes a
    padded embedding's extra rows). `default_max_tokens` None fills the context window when a
    chat request gives no max_tokens (vLLM's policy); an int caps that. A completion request
    without max_tokens gets OpenAI's 16. `default_temperature` is
    OpenAI's 1.0 unless the model's generation_config says otherwise. `max_stop_strings` bounds
    the stop strings of one request (the gateway's --max-stop-strings; OpenAI allows 4).
    """

    served_models: tuple[str, ...]
    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int | None = None
    default_max_tokens: int | None = None
    default_temperature: float = 1.0
    max_prompt_chars: int = 1_000_000
    max_stop_strings: int = 32
    max_logit_bias: int = 300  # OpenAI's bound on logit_bias entries
    max_bad_words: int = 128
    max_choices: int = 16  # prompts x n in one request
    tool_parser: str | None = None  # how 'auto' tool calls are read (tools.PARSERS)
    max_stop_chars: int = 200
    max_stop_token_ids: int = 64

    def __post_init__(self) -> None:
        if not self.served_models or not all(isinstance(m, str) for m in self.served_models):
            raise ValueError(f"served_models must name at least one model: {self.served_models}")
        object.__setattr__(self, "served_models", tuple(self.served_models))
        limits = ("max_model_len", "max_prompt_chars", "max_stop_chars")
        limits += ("max_stop_strings", "max_stop_token_ids")
        for name in limits:
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if not 0.0 <= self.default_temperature <= 2.0:
            raise ValueError(f"default_temperature must be in [0, 2]: {self.default_temperature}")

    @property
    def token_limit(self) -> int:
        """Token ids must be below this."""
        return self.vocab_size if self.vocab_size is not None else self.tokenizer.vocab_size


@dataclass
class GenerationRequest:
    """One validated request, ready to be placed on workers.

    `stop` strings are applied by the gateway (see `StreamDetokenizer`); `params` carries
    everything the workers need. `echo_prompt_text` is set when a completion asked for echo:
    responses then start with it.
    """

    request_id: str
    kind: Kind
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # usage on every chunk (vLLM's continuous_usage_stats)
    prompt_logprobs: int | None = None  # vLLM's `prompt_logprobs` on the choice (top n)
    include_stop_str: bool = False  # vLLM's include_stop_str_in_output
    skip_special_tokens: bool = True
    # Several choices (a list of prompts, or n > 1): each a request of its own, answered in
    # one body; `index` is a choice's place, `response_id` the id every choice answers under.
    choices: list[GenerationRequest] = field(default_factory=list)
    index: int = 0
    response_id: str | None = None
    return_token_ids: bool = False
    created: int = 0
    echo_prompt_text: str | None = None
    tools: ToolPlan | None = None  # chat with tools: how tool calls are read from the output

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)
