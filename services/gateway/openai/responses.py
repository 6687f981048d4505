"""Response bodies of the OpenAI API: completions, chat, stream chunks, usage, models, SSE."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from disagg.services.gateway.openai.logprobs import merge
from disagg.services.gateway.openai.request import GenerationRequest
from disagg.services.gateway.openai.toolcalls import ToolCallReader, read_all

SSE_DONE = b"data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens` are prompt tokens served from a prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _head(req: GenerationRequest, object_name: str) -> dict[str, Any]:
    rid = req.response_id or req.request_id
    return {"id": rid, "object": object_name, "created": req.created, "model": req.model}


def _chunk_object(req: GenerationRequest) -> str:
    return "text_completion" if req.kind == "completion" else "chat.completion.chunk"


def completion_response(
    req: GenerationRequest,
    text: str,
    finish_reason: str,
    usage: dict[str, Any],
    token_ids: Sequence[int] = (),
    logprobs: dict[str, Any] | None = None,
    prompt_logprobs: list | None = None,
) -> dict[str, Any]:
    """The non-streamed /v1/completions body (echoed prompt first when asked)."""
    choice = {
        "index": req.index,
        "text": (req.echo_prompt_text or "") + text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }
    if req.return_token_ids:  # vLLM puts both lists on the choice for completions
        choice |= {"prompt_token_ids": list(req.prompt_token_ids), "token_ids": list(token_ids)}
    if prompt_logprobs is not None:
        choice["prompt_logprobs"] = prompt_logprobs
    return _head(req, "text_completion") | {"choices": [choice], "usage": usage}


def chat_response(
    req: GenerationRequest,
    text: str,
    finish_reason: str,
    usage: dict[str, Any],
    token_ids: Sequence[int] = (),
    logprobs: dict[str, Any] | None = None,
    prompt_logprobs: list | None = None,
) -> dict[str, Any]:
    """The non-streamed /v1/chat/completions body (with the tool calls read from the text)."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if req.tools is not None:
        message["content"], calls = read_all(req.tools, text)
        if calls:
            message["tool_calls"] = calls
            finish_reason = tool_finish(finish_reason)
    choice: dict[str, Any] = {
        "index": req.index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }
    body = _head(req, "chat.completion") | {"choices": [choice], "usage": usage}
    if prompt_logprobs is not None:  # vLLM: at the top for chat
        body["prompt_logprobs"] = prompt_logprobs
    if req.return_token_ids:  # vLLM: prompt ids at the top, generated ids on the choice
        choice["token_ids"] = list(token_ids)
        body["prompt_token_ids"] = list(req.prompt_token_ids)
    return body


def tool_finish(finish_reason: str) -> str:
    """A reply that called tools and ended by itself ends with "tool_calls" (OpenAI); one cut
    by max_tokens stays "length" (a named call's arguments incomplete; of `required` and
    `auto`, the calls that closed)."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


def completion_chunk(
    req: GenerationRequest,
    text: str,
    finish_reason: str | None = None,
    token_ids: Sequence[int] = (),
    *,
    first: bool = False,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed /v1/completions chunk; the `first` one carries the echoed prompt and, with
    return_token_ids, the prompt ids."""
    echo = (req.echo_prompt_text or "") if first else ""
    choice = {"index": req.index, "text": echo + text, "logprobs": logprobs,
              "finish_reason": finish_reason}  # fmt: skip
    if req.return_token_ids:
        if first:
            choice["prompt_token_ids"] = list(req.prompt_token_ids)
        choice["token_ids"] = list(token_ids)
    return _chunk(req, choice)


def chat_chunk(
    req: GenerationRequest,
    delta: str,
    finish_reason: str | None = None,
    token_ids: Sequence[int] = (),
    *,
    first: bool = False,
    logprobs: dict[str, Any] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One streamed chat chunk. The `first` one carries the role with the first content (and,
    with return_token_ids, the prompt ids); a closing chunk with no text has an empty delta;
    `tool_calls` are OpenAI's tool call deltas."""
    message: dict[str, Any] = {"role": "assistant", "content": delta} if first else {}
    if delta and not first:
        message["content"] = delta
    if tool_calls:
        message["content"] = message.get("content") or None
        message["tool_calls"] = tool_calls
    choice = {"index": req.index, "delta": message, "logprobs": logprobs,
              "finish_reason": finish_reason}  # fmt: skip
    if req.return_token_ids:
        choice["token_ids"] = list(token_ids)
    chunk = _chunk(req, choice)
    if req.return_token_ids and first:
        chunk["prompt_token_ids"] = list(req.prompt_token_ids)
    return chunk


def _chunk(req: GenerationRequest, choice: dict[str, Any]) -> dict[str, Any]:
    chunk = _head(req, _chunk_object(req)) | {"choices": [choice]}
    if req.include_usage:  # OpenAI: every chunk has "usage": null except the last one
        chunk["usage"] = None
    return chunk


def with_running_usage(
    req: GenerationRequest, chunk: dict[str, Any], completion_tokens: int
) -> dict[str, Any]:
    """vLLM's ``continuous_usage_stats`` (with ``include_usage``): usage so far on every chunk."""
    if req.include_usage and req.continuous_usage:
        chunk["usage"] = {
            "prompt_tokens": req.prompt_len,
            "completion_tokens": completion_tokens,
            "total_tokens": req.prompt_len + completion_tokens,
        }
    return chunk


def usage_chunk(req: GenerationRequest, usage: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with include_usage: no choices, the usage."""
    return _head(req, _chunk_object(req)) | {"choices": [], "usage": usage}


def models_response(
    names: Iterable[str], created: int, owned_by: str = "disagg", max_model_len: int | None = None
) -> dict[str, Any]:
    """The /v1/models body, each entry as vLLM's: `root` (the model every name serves),
    `parent`, `max_model_len` and one permission record."""
    names = list(names)
    extra = {} if max_model_len is None else {"max_model_len": max_model_len}
    permission = {
        "id": f"modelperm-{created}", "object": "model_permission", "created": created,
        "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
        "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
        "organization": "*", "group": None, "is_blocking": False,
    }  # fmt: skip
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": owned_by,
         "root": names[0], "parent": None, "permission": [permission]} | extra
        for name in names
    ]  # fmt: skip
    return {"object": "list", "data": data}


def sse(obj: Any) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (JSON never holds a raw newline)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return b"data: " + text.encode() + b"\n\n"


class StreamAssembler:
    """Turns one request's text deltas into its stream chunks, in order.

    It holds back content-less chunks (a delta whose text the detokenizer held back) and carries
    their token ids into the next chunk, puts the role / prompt ids / echo on the first chunk
    that goes out, and ends with the finish chunk and (include_usage) the usage chunk. The
    caller frames each dict (`sse`, or JSON on NATS) and, over HTTP, sends `SSE_DONE` last.
    """

    def __init__(self, req: GenerationRequest) -> None:
        self.req = req
        self._first = True
        self._pending_ids: list[int] = []
        self._pending_logprobs: list[dict[str, Any]] = []
        self._prompt_logprobs: list | None = None
        self._num_tokens = 0
        self._build = completion_chunk if req.kind == "completion" else chat_chunk
        self._tools = ToolCallReader(req.tools) if req.tools is not None else None

    def delta(
        self,
        text: str,
        token_ids: Sequence[int] = (),
        logprobs: dict[str, Any] | None = None,
        *,
        prompt_logprobs: list | None = None,
    ) -> list[dict[str, Any]]:
        """Chunks for newly generated text (none when `text` is empty)."""
        self._pending_ids.extend(token_ids)
        self._pending_logprobs += [logprobs] if logprobs else []
        self._prompt_logprobs = self._prompt_logprobs or prompt_logprobs
        self._num_tokens += len(token_ids)
        calls = None
        if self._tools is not None:
            text, calls = self._tools.push(text)
        if not text and not calls:
            return []
        return [self._emit(text, None, calls)]

    def finish(
        self,
        finish_reason: str,
        usage: dict[str, Any],
        text: str = "",
        token_ids: Sequence[int] = (),
        logprobs: dict[str, Any] | None = None,
        *,
        prompt_logprobs: list | None = None,
    ) -> list[dict[str, Any]]:
        """The closing chunk (last text, if any, with the finish reason), then usage."""
        self._pending_ids.extend(token_ids)
        self._pending_logprobs += [logprobs] if logprobs else []
        self._prompt_logprobs = self._prompt_logprobs or prompt_logprobs
        self._num_tokens = usage["completion_tokens"]
        calls = None
        if self._tools is not None:
            text, calls = self._tools.push(text, final=True)
            finish_reason = tool_finish(finish_reason) if self._tools.calls else finish_reason
        chunks = [self._emit(text, finish_reason, calls)]
        if self.req.include_usage:
            chunks.append(usage_chunk(self.req, usage))
        return chunks

    def _emit(
        self, text: str, finish_reason: str | None, tool_calls: list | None = None
    ) -> dict[str, Any]:
        extra = {"tool_calls": tool_calls} if tool_calls else {}
        chunk = self._build(
            self.req, text, finish_reason, self._pending_ids, first=self._first,
            logprobs=merge(self._pending_logprobs), **extra,
        )  # fmt: skip
        if self._prompt_logprobs is not None:  # on the first chunk that goes out
            chunk["choices"][0]["prompt_logprobs"] = self._prompt_logprobs
        self._first, self._pending_ids, self._pending_logprobs = False, [], []
        self._prompt_logprobs = None
        return with_running_usage(self.req, chunk, self._num_tokens)
