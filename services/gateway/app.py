"""The HTTP surface of the gateway: OpenAI routes, SSE, vLLM's /tokenize, /detokenize and
/version, /health, /metrics, API keys.

Every error is an OpenAI error body, sent before any SSE header when it happens before the first
chunk. A client that goes away (before the first chunk, during a non-streamed request, or
mid-stream) cancels its request, which aborts it on the workers and frees its blocks.
"""

from __future__ import annotations

import functools
import hmac
import importlib.metadata
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from disagg.services.gateway import schema
from disagg.services.gateway.config import ANY_ROLE
from disagg.services.gateway.metrics import GatewayMetrics
from disagg.services.gateway.openai.errors import (
    APIError,
    authentication_failed,
    invalid_request,
    payload_too_large,
    service_unavailable,
)
from disagg.services.gateway.openai.request import GenerationRequest
from disagg.services.gateway.openai.responses import SSE_DONE, sse
from disagg.services.gateway.openai.tokenize import detokenize, tokenize
from disagg.shared.service import Interrupted, unless

T = TypeVar("T")
OPEN_PATHS = frozenset({"/health"})  # reachable without an API key
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away (never sent)
MAX_TOKENIZE_BODY = 4 << 20


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing anything over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise payload_too_large(limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise payload_too_large(limit)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise invalid_request(f"the body is not valid JSON: {err}") from None


class ApiKeyAuth:
    """ASGI middleware: `Authorization: Bearer <key>` with one of `keys` on every path but
    /health (keys compared in constant time, never echoed or logged)."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await error_response(authentication_failed())(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        return any(hmac.compare_digest(token, key) for key in self.keys)


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client goes away first, cancel it (its cleanup aborts the request on
    the workers) and raise Interrupted."""
    return await unless(lambda: _disconnected(request), work)


def create_app(
    gateway, metrics: GatewayMetrics, *, api_keys=(), max_body_bytes: int = 4 << 20
) -> FastAPI:
    app = FastAPI(title="disagg", version="0.1.0", description="OpenAI-compatible LLM serving")
    if api_keys:
        app.add_middleware(ApiKeyAuth, keys=list(api_keys))
    _error_handlers(app)
    _generation_routes(app, gateway, max_body_bytes)
    _info_routes(app, gateway, metrics)
    _install_openapi(app)
    return app


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        body = APIError(err.status_code, str(err.detail), kind).body()
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)


def _generation_routes(app: FastAPI, gateway, max_body_bytes: int) -> None:
    async def generate(request: Request, kind: str) -> Response:
        req = gateway.parse(kind, await read_json(request, max_body_bytes))
        slot = gateway.admit(req)
        try:
            return await _respond(request, gateway, req, slot)
        except Interrupted:  # nobody reads this answer
            return Response(status_code=CLIENT_CLOSED)
        finally:
            if not req.stream:
                slot.release()  # streamed: the SSE body owns it (and releases it at its end)

    served = gateway.ctx.served_models

    @app.post(
        "/v1/completions",
        openapi_extra=schema.generation_route(schema.CompletionRequest, served),
    )
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    @app.post(
        "/v1/chat/completions",
        openapi_extra=schema.generation_route(schema.ChatCompletionRequest, served),
    )
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")


async def _respond(request: Request, gateway, req: GenerationRequest, slot) -> Response:
    if not req.stream:
        return JSONResponse(await until_disconnected(request, gateway.complete(req, slot)))
    chunks = gateway.chunks(req, slot)
    try:  # the first chunk before any header: an early failure is a plain HTTP error
        first = await until_disconnected(request, anext(chunks, None))
    except BaseException:
        slot.release()
        raise
    return StreamingResponse(_sse(first, chunks), media_type="text/event-stream")


def _info_routes(app: FastAPI, gateway, metrics: GatewayMetrics) -> None:
    @app.get("/v1/models", responses=schema.error_responses("401"))
    async def models() -> dict:
        return gateway.models()

    @app.get("/version")
    async def version() -> dict:
        return {"version": _version()}

    @app.post("/tokenize", responses=schema.error_responses("400", "401", "404"))
    async def tokenize_route(request: Request) -> dict:
        return tokenize(await read_json(request, MAX_TOKENIZE_BODY), gateway.ctx)

    @app.post("/detokenize", responses=schema.error_responses("400", "401", "404"))
    async def detokenize_route(request: Request) -> dict:
        return detokenize(await read_json(request, MAX_TOKENIZE_BODY), gateway.ctx)

    @app.get("/health", responses=schema.error_responses("503"))
    async def health() -> Response:
        if gateway.draining:
            return error_response(service_unavailable("the gateway is shutting down"))
        if not gateway.backend.can_serve():
            return error_response(service_unavailable("no worker can serve a request right now"))
        live = Counter(str(w.report.role) for w in gateway.backend.alive_workers())
        live[ANY_ROLE] = live.total()
        short = sorted(r for r, n in gateway.expected_workers.items() if live[r] < n)
        workers = {r: n for r, n in sorted(live.items()) if r != ANY_ROLE}
        body = {"status": "degraded" if short else "ok", "workers": workers}
        return JSONResponse(body | ({"degraded": short} if short else {}))

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={"200": {"content": {"text/plain": {}}}} | schema.error_responses("401"),
    )
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("disagg")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _install_openapi(app: FastAPI) -> None:
    """Put the nested request models in components/schemas, where the bodies refer to them."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(
                schema.component_schemas()
            )
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


async def _sse(first: dict | None, rest: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            yield sse(first)
        async for chunk in rest:
            yield sse(chunk)
    except APIError as err:  # after the headers: the error travels as a chunk
        yield sse(err.body())
    finally:
        await rest.aclose()
    yield SSE_DONE
