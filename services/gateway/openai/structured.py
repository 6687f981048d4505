"""Structured output as clients ask for it, as the one ``Structured`` grammar the workers take.

Sources (at most one per request): OpenAI's ``response_format`` (``json_object``: any JSON
object; ``json_schema``: ``{"name", "schema", "strict"}``), vLLM's ``structured_outputs``
(``json``, ``regex``, ``choice``, ``grammar``, ``json_object``) and its older ``guided_json``,
``guided_regex``, ``guided_choice``, ``guided_grammar``. Each grammar is parsed here
(``grammar.check``): one that does not parse is a 400 naming its field, before anything is
placed or generated.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from disagg.services.gateway.openai.errors import invalid_request
from disagg.shared.engine.grammar import GrammarError, check, choice_grammar
from disagg.shared.protocol.sampling import MAX_GRAMMAR_CHARS, Structured

if TYPE_CHECKING:
    from disagg.services.gateway.openai.models import ChatCompletionRequest, CompletionRequest

JSON_OBJECT = '{"type": "object"}'
Choices = Annotated[list[str], Field(min_length=1, max_length=1024)]
Schema = dict[str, Any] | bool


class _Strict(BaseModel):
    # Nested structured-output objects: an unknown key would change what is generated, so it is
    # refused rather than ignored.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class JsonSchemaFormat(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: Schema | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs``: exactly one of these."""

    json_: Schema | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Choices | None = None
    grammar: str | None = None
    json_object: bool | None = None


def structured_of(req: CompletionRequest | ChatCompletionRequest) -> Structured | None:
    """The request's grammar (None: free text); a 400 for two sources or a bad grammar."""
    found = [(param, s) for param, s in _sources(req) if s is not None]
    if len(found) > 1:
        names = ", ".join(f"'{p}'" for p, _ in found)
        raise invalid_request(f"Give one structured output, not {names}.", found[1][0])
    if not found:
        return None
    return checked(*found[0], ignore_eos=bool(req.ignore_eos))


def checked(param: str, structured: Structured, *, ignore_eos: bool) -> Structured:
    """``structured`` once it compiles (a 400 naming ``param`` otherwise)."""
    if not structured.spec:
        raise invalid_request("The grammar is empty.", param, "invalid_value")
    if len(structured.spec) > MAX_GRAMMAR_CHARS:
        message = f"The grammar is longer than {MAX_GRAMMAR_CHARS} characters."
        raise invalid_request(message, param, "invalid_value")
    try:
        check(structured)
    except GrammarError as err:
        raise invalid_request(f"Invalid {structured.kind}: {err}", param, "invalid_value") from None
    if ignore_eos:
        message = "'ignore_eos' cannot be combined with structured output: it ends at EOS."
        raise invalid_request(message, "ignore_eos", "invalid_value")
    return structured


def _sources(req) -> list[tuple[str, Structured | None]]:
    fmt = req.response_format
    param = "response_format.json_schema.schema" if fmt and fmt.json_schema else "response_format"
    out = [(param, _response_format(fmt))]
    if (so := req.structured_outputs) is not None:
        given = [
            (f"structured_outputs.{k}", v)
            for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                         ("grammar", so.grammar), ("json_object", so.json_object or None))
            if v is not None
        ]  # fmt: skip
        if len(given) != 1:
            message = "'structured_outputs' takes exactly one of json, regex, choice, grammar."
            raise invalid_request(message, "structured_outputs", "invalid_value")
        (param, value) = given[0]
        out.append((param, _grammar(param.split(".")[1], value)))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{kind}")
        out.append((f"guided_{kind}", None if value is None else _grammar(kind, value)))
    return out


def _response_format(fmt: ResponseFormat | None) -> Structured | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Structured("json", JSON_OBJECT)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        message = "'response_format' of type json_schema needs 'json_schema.schema'."
        raise invalid_request(message, "response_format.json_schema", "invalid_value")
    return Structured("json", json.dumps(fmt.json_schema.schema_))


def _grammar(kind: str, value: Any) -> Structured:
    if kind == "json_object":
        return Structured("json", JSON_OBJECT)
    if kind == "json":
        return Structured("json", value if isinstance(value, str) else json.dumps(value))
    if kind == "choice":
        return Structured("grammar", choice_grammar(value))
    return Structured(kind, value)
