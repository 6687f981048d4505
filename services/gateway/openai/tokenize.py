"""vLLM's `/tokenize` and `/detokenize` bodies: validated like the generation routes, answered
from the gateway's tokenizer (no worker involved)."""

from __future__ import annotations

from typing import Any

from disagg.services.gateway.openai.errors import invalid_request
from disagg.services.gateway.openai.fields import missing
from disagg.services.gateway.openai.models import DetokenizeRequest, TokenizeRequest, validate
from disagg.services.gateway.openai.parse import check_model, render_messages
from disagg.services.gateway.openai.request import ParseContext
from disagg.services.gateway.openai.sampling import token_ids
from disagg.services.gateway.openai.tools import template_tools


def tokenize(body: Any, ctx: ParseContext) -> dict[str, Any]:
    """{"prompt": str} or {"messages": [...]} -> {"count", "max_model_len", "tokens"}."""
    req = validate(TokenizeRequest, body)
    check_model(req.model, ctx)
    if req.messages is not None:
        ids = render_messages(
            req.messages, ctx, req.add_generation_prompt is not False,
            tools=template_tools(req), kwargs=req.chat_template_kwargs,
        )  # fmt: skip
    elif req.prompt is None:
        raise missing("prompt")
    else:
        special = req.add_special_tokens is not False
        ids = ctx.tokenizer.encode(req.prompt, add_special_tokens=special) if req.prompt else []
    return {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids,
            "token_strs": None}  # fmt: skip


def detokenize(body: Any, ctx: ParseContext) -> dict[str, Any]:
    """{"tokens": [ids]} -> {"prompt": text}."""
    req = validate(DetokenizeRequest, body)
    check_model(req.model, ctx)
    if len(req.tokens) > ctx.max_model_len:
        raise invalid_request(f"At most {ctx.max_model_len} tokens.", "tokens", "invalid_value")
    return {"prompt": ctx.tokenizer.decode(token_ids(req.tokens, "tokens", ctx))}
