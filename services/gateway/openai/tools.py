"""Tool calling as chat clients ask for it: ``tools``, ``tool_choice``, ``parallel_tool_calls``.

``tool_plan`` turns a request into a ``ToolPlan`` (how the output is read back, see
``toolcalls``) and, for ``required`` and a named function, the grammar that makes the output a
valid call: a named function's output is its arguments (valid against its ``parameters``
schema); ``required`` writes a JSON array of ``{"name", "parameters"}`` objects, one of the
tools each (at most one without ``parallel_tool_calls``). ``auto`` adds no grammar: the model
writes calls in its own format, which a parser of its family reads (``hermes``: Hermes/Qwen
``<tool_call>{"name", "arguments"}</tool_call>``), chosen by ``--tool-call-parser`` or by the
chat template. ``none`` reads nothing back. The tools and, in the conversation, assistant
``tool_calls`` and ``tool`` messages reach the chat template (``chat_messages``).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from disagg.services.gateway.openai.errors import invalid_request
from disagg.shared.protocol.sampling import Structured

if TYPE_CHECKING:
    from disagg.services.gateway.openai.models import ChatCompletionRequest

PARSERS = ("hermes",)
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class FunctionDef(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionRef(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionRef


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    arguments: str


class ToolCallIn(BaseModel):
    """An assistant message's earlier tool call, as the conversation sends it back."""

    model_config = ConfigDict(extra="allow", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


@dataclass(frozen=True)
class ToolPlan:
    """How a chat request's output is read: ``mode`` auto (``parser`` reads the model's own
    format), required (a JSON array of calls) or named (``name``'s arguments)."""

    mode: Literal["auto", "required", "named"]
    parser: str | None = None
    name: str | None = None
    parallel: bool = True


def tool_plan(
    req: ChatCompletionRequest, parser: str | None
) -> tuple[ToolPlan | None, Structured | None]:
    """(how to read the output, the grammar it needs); (None, None) without tools."""
    tools, choice = req.tools or [], req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise invalid_request("'tool_choice' needs 'tools'.", "tool_choice", "invalid_value")
        return None, None
    choice = choice or "auto"
    parallel = req.parallel_tool_calls is not False
    if choice == "none":
        return None, None
    if choice == "auto":
        if parser is None:
            message = (
                "'auto' tool choice needs a tool call parser for this model "
                "(gateway --tool-call-parser); use 'required' or a named function."
            )
            raise invalid_request(message, "tool_choice", "invalid_value")
        return ToolPlan("auto", parser=parser, parallel=parallel), None
    if choice == "required":
        grammar = Structured("json", json.dumps(_calls_schema(tools, parallel)))
        return ToolPlan("required", parallel=parallel), grammar
    named = next((t for t in tools if t.function.name == choice.function.name), None)
    if named is None:
        message = f"Tool choice names '{choice.function.name}', which is not in 'tools'."
        raise invalid_request(message, "tool_choice.function.name", "invalid_value")
    grammar = Structured("json", json.dumps(_parameters(named)))
    return ToolPlan("named", name=named.function.name, parallel=parallel), grammar


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object"}


def _calls_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """The array of calls; each tool's ``$defs`` move to its root, where their ``$ref``s
    (``#/$defs/...``, as pydantic writes them) point once the parameters are nested."""
    defs: dict[str, Any] = {}
    one_of_them = []
    for t in tools:
        parameters = dict(_parameters(t))
        for name, definition in (parameters.pop("$defs", None) or {}).items():
            if defs.setdefault(name, definition) != definition:
                message = f"Two tools define '$defs.{name}' differently; rename one."
                raise invalid_request(message, "tools", "invalid_value")
        one_of_them.append(
            {"type": "object",
             "properties": {"name": {"const": t.function.name}, "parameters": parameters},
             "required": ["name", "parameters"], "additionalProperties": False}
        )  # fmt: skip
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": one_of_them}}
    return schema | ({} if parallel else {"maxItems": 1}) | ({"$defs": defs} if defs else {})


def template_tools(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools as the chat template sees them (OpenAI's shape, as transformers passes them)."""
    if not req.tools:
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools]


def template_tool_calls(calls: list[ToolCallIn]) -> list[dict[str, Any]]:
    """An assistant message's tool calls for the template: arguments as an object where they
    are JSON (templates write them with ``tojson``), as vLLM hands them over."""
    out = []
    for call in calls:
        function = call.function.model_dump()
        with contextlib.suppress(ValueError):
            function["arguments"] = json.loads(call.function.arguments)
        out.append({"id": call.id, "type": "function", "function": function})
    return out


def parser_for(flag: str | None, chat_template: str | None) -> str | None:
    """The tool call parser: the gateway's flag ("none" for none), else the family the chat
    template writes (``<tool_call>``: hermes), else none."""
    if flag is not None:
        return None if flag == "none" else flag
    if chat_template and "<tool_call>" in chat_template:
        return "hermes"
    return None
