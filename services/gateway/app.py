"""The HTTP surface of the gateway: OpenAI routes, SSE, /health, /metrics, API keys."""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from disagg.services.gateway import openai as oai
from disagg.services.gateway.metrics import GatewayMetrics


def error_response(err: oai.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing anything over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise oai.payload_too_large(limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise oai.payload_too_large(limit)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise oai.invalid_request(f"the body is not valid JSON: {err}") from None


def create_app(
    gateway, metrics: GatewayMetrics, *, api_keys=(), max_body_bytes: int = 4 << 20
) -> FastAPI:
    app = FastAPI(title="disagg", version="0.1.0")
    keys = [k.encode() for k in api_keys]

    @app.exception_handler(oai.APIError)
    async def _api_error(_: Request, err: oai.APIError) -> JSONResponse:
        return error_response(err)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if keys and request.url.path != "/health" and not _authorized(request, keys):
            return error_response(oai.authentication_failed())
        return await call_next(request)

    async def generate(request: Request, kind: str) -> Response:
        req = gateway.parse(kind, await read_json(request, max_body_bytes))
        gateway.admit()
        if not req.stream:
            return JSONResponse(await gateway.complete(req))
        chunks = gateway.chunks(req)
        try:  # the first chunk before any header: an early failure is a plain HTTP error
            first = await anext(chunks)
        except StopAsyncIteration:
            first = None
        return StreamingResponse(_sse(first, chunks), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    @app.get("/v1/models")
    async def models() -> dict:
        return gateway.models()

    @app.get("/health")
    async def health() -> Response:
        if gateway.backend.can_serve():
            return JSONResponse({"status": "ok"})
        return error_response(oai.service_unavailable("no worker can serve a request right now"))

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


async def _sse(first: dict | None, rest: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            yield oai.sse(first)
        async for chunk in rest:
            yield oai.sse(chunk)
    except oai.APIError as err:  # after the headers: the error travels as a chunk
        yield oai.sse(err.body())
    finally:
        await rest.aclose()
    yield oai.SSE_DONE


def _authorized(request: Request, keys: list[bytes]) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return any(hmac.compare_digest(token.strip().encode(), key) for key in keys)
