"""OpenAI's wording of a bad field (``type_error``, ``value_error``, ``missing``, ``unsupported``),
a pydantic ``ValidationError`` in that wording (``from_validation_error``), and the table of
parameters accepted only at their neutral value."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

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


def is_off(value: Any) -> bool:
    return value is None or value is False


# Parameters that are accepted only at their neutral value (which is also their default).
NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "use_beam_search": is_off,
    "functions": lambda v: v is None or v == [],  # the deprecated forms of tools / tool_choice
    "function_call": lambda v: v in (None, "none", "auto"),
    "truncate_prompt_tokens": lambda v: v is None,
}
COMPLETION_NEUTRAL = NEUTRAL | {
    "tools": lambda v: v is None or v == [],  # chat only
    "tool_choice": lambda v: v in (None, "none"),
    "suffix": lambda v: v is None or v == "",
    "add_special_tokens": lambda v: v is None or v is True,
}
CHAT_NEUTRAL = NEUTRAL | {
    "echo": is_off,
    "continue_final_message": is_off,
    "chat_template": lambda v: v is None,
    "add_special_tokens": is_off,
}


TYPE_NAMES = {
    "int_type": "an integer", "float_type": "a number", "bool_type": "a boolean",
    "string_type": "a string", "list_type": "an array", "dict_type": "an object",
    "model_type": "an object", "model_attributes_type": "an object",
}  # fmt: skip


def from_validation_error(err: ValidationError, body: Any) -> APIError:
    """The first (deepest) error of ``err`` as OpenAI's 400 body; ``param`` is the path of the
    offending value in ``body``, e.g. ``messages[0].content[1].text`` or ``logit_bias.17``."""
    found = [(_path(e["loc"], body, e["type"] == "missing"), e) for e in err.errors()]
    path, first = max(found, key=lambda pe: len(pe[0]))  # the first of the deepest
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    kind, ctx, value = first["type"], first.get("ctx") or {}, first.get("input")
    if kind == "missing":
        return missing(param)
    if kind == "unsupported":
        return unsupported(param)
    if kind in TYPE_NAMES or kind.endswith("_type"):
        return type_error(param, TYPE_NAMES.get(kind, "a valid value"), value)
    return value_error(param, _expected(kind, ctx, first["msg"]), value)


def _path(loc: tuple, body: Any, missing: bool) -> list[str | int]:
    """``loc`` without the names pydantic gives union members ("str", "list[int]"): only the
    steps that exist in the body (and, last, the name of a missing field)."""
    path, here = [], body
    for i, step in enumerate(loc):
        if _has(here, step):
            path.append(step)
            here = here[step]
        elif missing and i == len(loc) - 1:
            path.append(step)
    return path


def _has(value: Any, step: str | int) -> bool:
    if isinstance(value, list):
        return isinstance(step, int) and 0 <= step < len(value)
    return isinstance(value, dict) and isinstance(step, str) and step in value


def _expected(kind: str, ctx: dict, fallback: str) -> str:
    bounds = {
        "greater_than_equal": ("ge", ">="), "less_than_equal": ("le", "<="),
        "greater_than": ("gt", ">"), "less_than": ("lt", "<"),
    }  # fmt: skip
    if kind in bounds:
        key, op = bounds[kind]
        return f"a value {op} {ctx[key]}"
    if kind == "too_short":
        return f"at least {ctx['min_length']} item(s)"
    if kind == "too_long":
        return f"at most {ctx['max_length']} items"
    if kind == "literal_error":
        return f"one of {ctx['expected']}"
    if kind == "finite_number":
        return "a finite number"
    return fallback.rstrip(".").lower()
