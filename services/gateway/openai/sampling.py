"""The sampling fields of a request body, read into ``SamplingParams`` keyword arguments:
vLLM's names and bounds; token-valued fields (logit_bias, allowed_token_ids, bad_words) as the
token ids the workers take."""

from __future__ import annotations

from typing import Any

from disagg.services.gateway.openai.errors import invalid_request
from disagg.services.gateway.openai.fields import Fields, is_int, type_error, value_error
from disagg.services.gateway.openai.request import SEED_MAX, SEED_MIN, ParseContext
from disagg.shared.protocol.sampling import MAX_LOGPROBS


def chat_logprobs(fields: Fields) -> int | None:
    """Chat's `logprobs: true` with `top_logprobs: 0..20` as the workers' top-n count."""
    top = fields.integer("top_logprobs", 0, MAX_LOGPROBS)
    if not fields.boolean("logprobs", False):
        if top:
            message = "'top_logprobs' needs 'logprobs' set to true."
            raise invalid_request(message, "top_logprobs", "invalid_value")
        return None
    return top or 0


def sampling_fields(fields: Fields, ctx: ParseContext) -> dict[str, Any]:
    temperature = fields.number("temperature", 0.0, 2.0)
    top_p = fields.number("top_p", 0.0, 1.0, open_lo=True)
    top_k = fields.integer("top_k", -1)
    return {
        "temperature": ctx.default_temperature if temperature is None else temperature,
        "top_p": 1.0 if top_p is None else top_p,
        "top_k": 0 if top_k in (None, -1) else top_k,  # -1 and 0 both mean off
        "seed": fields.integer("seed", SEED_MIN, SEED_MAX),
        "stop_token_ids": _stop_token_ids(fields.get("stop_token_ids"), ctx),
        "ignore_eos": fields.boolean("ignore_eos", False),
        "min_p": fields.number("min_p", 0.0, 1.0) or 0.0,
        "presence_penalty": fields.number("presence_penalty", -2.0, 2.0) or 0.0,
        "frequency_penalty": fields.number("frequency_penalty", -2.0, 2.0) or 0.0,
        "repetition_penalty": _or(fields.number("repetition_penalty", 0.0, 1e6, open_lo=True), 1.0),
        "min_tokens": fields.integer("min_tokens", 0) or 0,
    }


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def processor_fields(fields: Fields, ctx: ParseContext) -> dict[str, Any]:
    """logit_bias, allowed_token_ids and bad_words as the workers take them (token ids)."""
    out: dict[str, Any] = {}
    if (bias := fields.get("logit_bias")) is not None:
        out["logit_bias"] = _logit_bias(bias, ctx)
    if (allowed := fields.get("allowed_token_ids")) is not None:
        if not isinstance(allowed, list) or not allowed:
            raise type_error("allowed_token_ids", "a non-empty array of integers", allowed)
        out["allowed_token_ids"] = tuple(token_ids(allowed, "allowed_token_ids", ctx))
    if (words := fields.get("bad_words")) is not None:
        out["bad_words_token_ids"] = _bad_words(words, ctx)
    return out


def _logit_bias(value: Any, ctx: ParseContext) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token id (a JSON string key) to a bias in [-100, 100]."""
    if not isinstance(value, dict):
        raise type_error("logit_bias", "an object", value)
    if len(value) > ctx.max_logit_bias:
        raise value_error("logit_bias", f"at most {ctx.max_logit_bias} entries", len(value))
    bias = Fields(value, "logit_bias.", "logit_bias")
    out = []
    for key in value:
        token = int(key) if isinstance(key, str) and key.lstrip("-").isdigit() else None
        if token is None:
            raise value_error("logit_bias", "token ids as keys", repr(key))
        token_ids([token], "logit_bias", ctx)
        out.append((token, bias.number(key, -100.0, 100.0)))
    return tuple(out)


def _bad_words(value: Any, ctx: ParseContext) -> tuple[tuple[int, ...], ...]:
    """Each word's token ids, stripped and after one space (as vLLM: either form is banned)."""
    if not isinstance(value, list) or not all(isinstance(w, str) and w for w in value):
        raise type_error("bad_words", "an array of non-empty strings", value)
    if len(value) > ctx.max_bad_words:
        raise value_error("bad_words", f"at most {ctx.max_bad_words} words", len(value))
    forms = {
        tuple(ctx.tokenizer.encode(text, add_special_tokens=False))
        for word in value
        for text in (word.lstrip(), " " + word.lstrip())
    }
    return tuple(sorted(f for f in forms if f))


def _stop_token_ids(value: Any, ctx: ParseContext) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise type_error("stop_token_ids", "an array of integers", value)
    if len(value) > ctx.max_stop_token_ids:
        expected = f"at most {ctx.max_stop_token_ids} token ids"
        raise value_error("stop_token_ids", expected, f"{len(value)} ids")
    return tuple(token_ids(value, "stop_token_ids", ctx))


def token_ids(values: list[Any], param: str, ctx: ParseContext) -> list[int]:
    limit = ctx.token_limit
    for value in values:
        if not is_int(value):
            raise type_error(param, "an array of integers", value)
        if not 0 <= value < limit:
            raise invalid_request(
                f"Token id {value} is out of vocabulary (ids are 0 to {limit - 1}).",
                param,
                "invalid_value",
            )
    return list(values)
