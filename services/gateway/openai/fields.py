"""Typed, range-checked reads of JSON request fields, with OpenAI's error wording, and the
table of parameters accepted only at their neutral value."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from disagg.services.gateway.openai.errors import APIError, invalid_request


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {int: "an integer", float: "a decimal", str: "a string", list: "an array"}
    return names.get(type(value), "an object" if isinstance(value, dict) else "a value")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return is_int(value)


def type_error(param: str, expected: str, value: Any) -> APIError:
    message = f"Invalid type for '{param}': expected {expected}, but got {json_type(value)}"
    return invalid_request(message + " instead.", param, "invalid_type")


def value_error(param: str, expected: str, value: Any) -> APIError:
    shown = json.dumps(value) if is_number(value) else str(value)[:100]
    message = f"Invalid '{param}': expected {expected}, but got {shown} instead."
    return invalid_request(message, param, "invalid_value")


def missing(param: str) -> APIError:
    return invalid_request(f"Missing required parameter: '{param}'.", param, "missing_required")


def unsupported(param: str, why: str = "is not supported by this server") -> APIError:
    return invalid_request(f"Unsupported parameter: '{param}' {why}.", param, "unsupported")


class Fields:
    """Typed, range-checked reads of one JSON object; null counts as absent."""

    def __init__(self, body: Any, prefix: str = "", name: str = "body") -> None:
        if not isinstance(body, dict):
            if not prefix:
                raise invalid_request("The request body must be a JSON object.", None)
            raise type_error(name, "an object", body)
        self.body, self.prefix = body, prefix

    def get(self, name: str) -> Any:
        return self.body.get(name)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise type_error(self.prefix + name, "a boolean", value)
        return value

    def integer(self, name: str, lo: int, hi: int | None = None) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not is_int(value):
            raise type_error(self.prefix + name, "an integer", value)
        if value < lo or (hi is not None and value > hi):
            bounds = f"an integer >= {lo}" + ("" if hi is None else f" and <= {hi}")
            raise value_error(self.prefix + name, bounds, value)
        return value

    def number(self, name: str, lo: float, hi: float, *, open_lo: bool = False) -> float | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not is_number(value):
            raise type_error(self.prefix + name, "a decimal", value)
        if value > hi or value < lo or (open_lo and value == lo):
            bounds = f"a value {'>' if open_lo else '>='} {lo} and <= {hi}"
            raise value_error(self.prefix + name, bounds, value)
        return float(value)


def is_zero(value: Any) -> bool:
    return is_number(value) and value == 0


def is_off(value: Any) -> bool:
    return value is None or value is False


# Parameters that are accepted only at their neutral value (which is also their default).
NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "use_beam_search": is_off,
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": lambda v: v is None or v == [],
    "functions": lambda v: v is None or v == [],
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "guided_json": lambda v: v is None,
    "guided_regex": lambda v: v is None,
    "guided_choice": lambda v: v is None,
    "structured_outputs": lambda v: v is None,
    "guided_grammar": lambda v: v is None,
    "truncate_prompt_tokens": lambda v: v is None,
}
COMPLETION_NEUTRAL = NEUTRAL | {
    "suffix": lambda v: v is None or v == "",
    "add_special_tokens": lambda v: v is None or v is True,
}
CHAT_NEUTRAL = NEUTRAL | {
    "echo": is_off,
    "continue_final_message": is_off,
    "chat_template": lambda v: v is None,
    "chat_template_kwargs": lambda v: v is None or v == {},
    "add_special_tokens": is_off,
}


def check_unsupported(fields: Fields, neutral: dict[str, Callable[[Any], bool]]) -> None:
    for name, is_neutral in neutral.items():
        if name in fields.body and not is_neutral(fields.body[name]):
            raise unsupported(name)
