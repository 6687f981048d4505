"""Tool calls read back from generated text, as it streams: ``ToolCallReader`` takes text
deltas and gives content text and OpenAI's streamed ``tool_calls`` deltas (a call's first delta
has its ``index``, ``id``, ``type``, ``function.name`` and the arguments so far; later ones add
to ``function.arguments``; a call has one delta per chunk). ``read_all`` folds the same into a
message's ``(content, tool_calls)``.

Per ``ToolPlan.mode``: ``named``: the text is the arguments, streamed as they come;
``required``: a JSON array of ``{"name", "parameters"}``, a call going out as each element
closes; ``auto`` with the ``hermes`` parser: ``<tool_call>{"name", "arguments"}</tool_call>``
blocks anywhere in the content (a block that is not such JSON stays content; whitespace
between calls is dropped; without ``parallel_tool_calls`` only the first call is kept).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from disagg.services.gateway.openai.tools import ToolPlan

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_decoder = json.JSONDecoder()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallReader:
    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.calls = 0  # calls started
        self._buf = ""
        self._inside = False  # hermes: within a <tool_call> block
        self._opened = self._closed = False  # required: the array's brackets
        self._held_space = ""  # hermes: whitespace after a call, out only if content follows

    def push(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """(content, tool call deltas) that ``text`` releases; ``final``: nothing follows."""
        if self.plan.mode == "named":
            return "", self._named(text, final)
        self._buf += text
        if self.plan.mode == "required":
            return "", self._required()
        return self._hermes(final)

    def _call(self, name: str, arguments: str) -> list[dict[str, Any]]:
        """A new call's one delta (an index appears once per chunk, as OpenAI sends it)."""
        index, self.calls = self.calls, self.calls + 1
        return [{"index": index, "id": new_call_id(), "type": "function",
                 "function": {"name": name, "arguments": arguments}}]  # fmt: skip

    def _named(self, text: str, final: bool) -> list[dict[str, Any]]:
        if self.calls == 0:
            return self._call(self.plan.name, text) if text or final else []
        return [_arguments(0, text)] if text else []

    def _required(self) -> list[dict[str, Any]]:
        out, buf = [], self._buf
        pos = 0
        while not self._closed:
            pos = _skip_space(buf, pos)
            if pos >= len(buf):
                break
            if not self._opened:
                if buf[pos] != "[":
                    break  # the grammar writes an array; anything else is left unread
                self._opened, pos = True, pos + 1
            elif buf[pos] == ",":
                pos += 1
            elif buf[pos] == "]":
                self._closed, pos = True, pos + 1
            else:
                try:
                    call, pos = _decoder.raw_decode(buf, pos)
                except ValueError:
                    break  # this element has not closed yet
                if isinstance(call, dict) and isinstance(call.get("name"), str):
                    out += self._call(call["name"], _dump(call.get("parameters", {})))
        self._buf = buf[pos:]
        return out

    def _hermes(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        content, calls = [], []
        while True:
            if not self._inside:
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = 0 if final else _partial_suffix(self._buf, OPEN)
                    content.append(self._content(self._buf[: len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                content.append(self._content(self._buf[:at]))
                self._buf, self._inside = self._buf[at + len(OPEN) :], True
                continue
            end = self._buf.find(CLOSE)
            if end < 0 and not final:
                break
            body = self._buf if end < 0 else self._buf[:end]
            raw = OPEN + body + ("" if end < 0 else CLOSE)
            self._buf = "" if end < 0 else self._buf[end + len(CLOSE) :]
            self._inside = False
            call = _hermes_call(body)
            if call is None:
                content.append(self._content(raw))
            else:  # a call (kept, or dropped without parallel_tool_calls): no space around it
                if self.plan.parallel or self.calls == 0:
                    calls += self._call(*call)
                self._held_space = ""
            if end < 0:
                break
        return "".join(content), calls

    def _content(self, text: str) -> str:
        if self.calls and not text.strip():  # whitespace between calls: held
            self._held_space += text
            return ""
        text, self._held_space = self._held_space + text, ""
        return text


def read_all(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole output as a message's content (None when it is only calls) and tool_calls."""
    content, deltas = ToolCallReader(plan).push(text, final=True)
    calls: list[dict[str, Any]] = []
    for delta in deltas:
        if "id" in delta:
            function = {"name": delta["function"]["name"], "arguments": ""}
            calls.append({"id": delta["id"], "type": "function", "function": function})
        calls[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
    return (content or None) if calls else content, calls


def _arguments(index: int, text: str) -> dict[str, Any]:
    return {"index": index, "function": {"arguments": text}}


def _hermes_call(body: str) -> tuple[str, str] | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return call["name"], arguments if isinstance(arguments, str) else _dump(arguments)


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (held back: it may be)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
