"""vLLM's `/tokenize` and `/detokenize` bodies: validated like the generation routes, answered
from the gateway's tokenizer (no worker involved)."""

from __future__ import annotations

from typing import Any

from disagg.services.gateway.openai.errors import invalid_request
from disagg.services.gateway.openai.fields import Fields, missing, type_error
from disagg.services.gateway.openai.parse import check_model, render_messages
from disagg.services.gateway.openai.request import ParseContext
from disagg.services.gateway.openai.sampling import token_ids


def tokenize(body: Any, ctx: ParseContext) -> dict[str, Any]:
    """{"prompt": str} or {"messages": [...]} -> {"count", "max_model_len", "tokens"}."""
    fields = Fields(body)
    check_model(fields.get("model"), ctx)
    if fields.get("messages") is not None:
        add_generation_prompt = fields.boolean("add_generation_prompt", True)
        ids = render_messages(fields.get("messages"), ctx, add_generation_prompt)
    else:
        prompt = fields.get("prompt")
        if prompt is None:
            raise missing("prompt")
        if not isinstance(prompt, str):
            raise type_error("prompt", "a string", prompt)
        special = fields.boolean("add_special_tokens", True)
        ids = ctx.tokenizer.encode(prompt, add_special_tokens=special) if prompt else []
    return {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids,
            "token_strs": None}  # fmt: skip


def detokenize(body: Any, ctx: ParseContext) -> dict[str, Any]:
    """{"tokens": [ids]} -> {"prompt": text}."""
    fields = Fields(body)
    check_model(fields.get("model"), ctx)
    tokens = fields.get("tokens")
    if tokens is None:
        raise missing("tokens")
    if not isinstance(tokens, list):
        raise type_error("tokens", "an array of integers", tokens)
    if len(tokens) > ctx.max_model_len:
        raise invalid_request(f"At most {ctx.max_model_len} tokens.", "tokens", "invalid_value")
    return {"prompt": ctx.tokenizer.decode(token_ids(tokens, "tokens", ctx))}
