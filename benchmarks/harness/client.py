"""The streaming OpenAI client of the load generator: request bodies, SSE parsing, one request.

Every request is greedy (`temperature: 0`) with `ignore_eos: true`, so its output length is
exactly `max_tokens`, and asks for `stream_options.include_usage` (exact token counts at the end)
and `return_token_ids` (how many tokens each chunk carries; servers without it get one token
counted per chunk that has text, as vLLM's benchmark counts).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from disagg.benchmarks.harness.metrics import RequestRecord
from disagg.benchmarks.harness.workload import TraceRequest

DONE = "[DONE]"
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
Detokenize = Callable[[list[int]], str]


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """One line of an SSE stream: the JSON object of a `data:` line, DONE for `data: [DONE]`,
    None for anything else (blank lines, comments, `event:` / `id:` fields)."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == DONE:
        return DONE
    return json.loads(payload) if payload else None


def build_payload(
    req: TraceRequest, model: str, endpoint: str, detokenize: Detokenize | None = None
) -> dict[str, Any]:
    """The JSON body for `req` on `endpoint` ("completions" or "chat")."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    if endpoint == "completions":
        prompt = list(req.prompt_ids) if req.prompt_ids is not None else req.prompt_text
        return body | {"prompt": prompt}
    return body | {"messages": [{"role": "user", "content": _prompt_text(req, detokenize)}]}


def _prompt_text(req: TraceRequest, detokenize: Detokenize | None) -> str:
    if req.prompt_text is not None:
        return req.prompt_text
    if detokenize is None:
        raise ValueError("chat needs text prompts: give --tokenizer to turn token ids into text")
    return detokenize(list(req.prompt_ids))


def chunk_token_ids(chunk: dict[str, Any]) -> list[int] | None:
    """The token ids a chunk carries, or None when the server does not send them."""
    choices = chunk.get("choices") or []
    if not choices:
        return []
    ids = choices[0].get("token_ids")
    return list(ids) if ids is not None else None


def chunk_token_count(chunk: dict[str, Any]) -> int:
    """How many output tokens a chunk carries. Without ids: 1 if it has any text, or, for a
    completion, 1 for a chunk before the last (servers streaming one chunk per token, such as
    llama-cpp-python, send an empty one for a token that ends inside a character)."""
    ids = chunk_token_ids(chunk)
    if ids is not None:
        return len(ids)
    choice = chunk["choices"][0]
    if "text" in choice:
        return 1 if choice["text"] or choice.get("finish_reason") is None else 0
    return 1 if (choice.get("delta") or {}).get("content") else 0


def apply_chunk(rec: RequestRecord, chunk: dict[str, Any], now: float) -> None:
    """Fold one parsed chunk into `rec`: an error, the usage, or tokens arriving at `now`."""
    if "error" in chunk:
        error = chunk["error"]
        rec.error = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        return
    if usage := chunk.get("usage"):
        rec.prompt_len = usage.get("prompt_tokens", rec.prompt_len)
        rec.output_len = usage.get("completion_tokens", rec.output_len)
    k = chunk_token_count(chunk)
    if k:
        rec.chunk_times.append(now)
        rec.chunk_tokens.append(k)
        rec.token_ids += chunk_token_ids(chunk) or []


async def send_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], rec: RequestRecord, timeout_s: float
) -> RequestRecord:
    """POST `body`, read the stream into `rec` (sent_at set here); never raises for the server's
    failures: they end up in `rec.error`. The whole request is bounded by `timeout_s`."""
    rec.sent_at = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s), client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {text[:300]}"
                return rec
            await _read_stream(resp, rec)
    except (httpx.HTTPError, TimeoutError, json.JSONDecodeError) as err:
        rec.error = f"{type(err).__name__}: {err}"
    finally:
        if rec.done_at is None:  # failed: when the client gave up or heard of the failure
            rec.done_at = time.perf_counter()
    return rec


async def _read_stream(resp: httpx.Response, rec: RequestRecord) -> None:
    async for line in resp.aiter_lines():
        item = parse_sse_line(line)
        if item is None:
            continue
        now = time.perf_counter()
        if item == DONE:
            rec.done_at = now
            return
        apply_chunk(rec, item, now)
        if rec.error is not None:
            return
    rec.error = "the stream ended without data: [DONE]"


async def fetch_metrics(
    base_url: str, api_key: str | None = None, timeout_s: float = 10.0
) -> str | None:
    """The server's Prometheus text from /metrics; None when it has none or does not answer."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(headers=headers, timeout=timeout_s) as client:
            resp = await client.get(base_url.rstrip("/") + "/metrics")
    except httpx.HTTPError:
        return None
    return resp.text if resp.status_code == 200 else None


async def first_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model the server lists on /v1/models."""
    resp = await client.get(base_url.rstrip("/") + "/v1/models", timeout=30)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]
