"""Bad input never gets further than an OpenAI error: schema-driven fuzzing of the HTTP API
(schemathesis, positive and negative bodies, in process over ASGI with a fake backend) and
property tests of the parsers behind the HTTP and NATS APIs."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from disagg.services.gateway.app import create_app
from disagg.services.gateway.core import Gateway
from disagg.services.gateway.metrics import GatewayMetrics
from disagg.services.gateway.migration import BackendError
from disagg.services.gateway.nats_api import NatsApi, parse_json
from disagg.services.gateway.openai.errors import APIError
from disagg.services.gateway.openai.request import ParseContext
from disagg.services.gateway.stream import TokenEvent
from disagg.shared.model.args import ModelArgs
from disagg.shared.tokenizer import Tokenizer

MAX_BODY = 64 << 10
ALL_CHECKS = list(HealthCheck)


class FakeBackend:
    """Answers with up to 3 tokens of the prompt; `fail_at` makes the i-th token a failure."""

    def __init__(self) -> None:
        self.fail_at: int | None = None

    def can_serve(self) -> bool:
        return True

    def alive_workers(self) -> list:
        return []

    async def generate(self, request_id: str, prompt: list[int], params, group=None):
        n = min(params.max_tokens, 3)
        for i in range(n):
            if self.fail_at == i:
                raise BackendError(503, "the decode worker died")
            yield TokenEvent([prompt[i % len(prompt)]], "length" if i == n - 1 else None)


def make_gateway(model) -> Gateway:
    tokenizer, args = Tokenizer(model), ModelArgs.from_folder(model)
    ctx = ParseContext(
        served_models=(model.name,),
        tokenizer=tokenizer,
        max_model_len=args.max_model_len,
        vocab_size=min(tokenizer.vocab_size, args.vocab_size),
    )
    return Gateway(FakeBackend(), ctx, GatewayMetrics(), frozenset(args.eos_token_ids), 8)


@pytest.fixture(scope="module")
def gateway(checkpoints) -> Gateway:
    return make_gateway(checkpoints(arch="llama"))


@pytest.fixture(scope="module")
def app(gateway):
    return create_app(gateway, gateway.metrics, max_body_bytes=MAX_BODY)


def assert_openai_error(body: Any) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schema_fuzz_no_5xx_and_errors_are_openai_bodies(app, mode):
    """Bodies that fit the schema get no 5xx; bodies that do not are refused (4xx); every
    refusal is an OpenAI error body."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)

    @settings(
        max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=schema.as_strategy(generation_mode=mode))
    def run(case) -> None:
        response = case.call_and_validate(checks=CHECKS)
        if response.status_code >= 400:
            assert_openai_error(response.json())

    run()


def test_openapi_documents_the_request_bodies(app):
    doc = app.openapi()
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    schema = body["application/json"]["schema"]
    assert "messages" in schema["required"]
    assert "ChatMessage" in doc["components"]["schemas"]
    assert {"400", "401", "429", "503", "504"} <= set(
        doc["paths"]["/v1/completions"]["post"]["responses"]
    )


# --- real requests in process --------------------------------------------------------------


@pytest.fixture
async def client(app):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c


async def test_errors_before_and_after_the_sse_headers(client, gateway):
    body = {"prompt": [5, 6, 7], "max_tokens": 3, "stream": True}
    gateway.backend.fail_at = 0  # before the first chunk: a plain 503 with Retry-After
    resp = await client.post("/v1/completions", json=body)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert_openai_error(resp.json())
    gateway.backend.fail_at = 1  # mid-stream: the error is the last event before [DONE]
    resp = await client.post("/v1/completions", json=body)
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert resp.status_code == 200 and events[-1] == "[DONE]"
    assert_openai_error(json.loads(events[-2]))
    gateway.backend.fail_at = None
    assert gateway.running == 0, "a failed request kept its slot"


async def test_several_choices_stream_interleaved_and_fail_together(client, gateway):
    body = {"prompt": [[5, 6, 7], [8, 9]], "n": 2, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    resp = await client.post("/v1/completions", json=body)
    events = [json.loads(line[6:]) for line in resp.text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    indexes = {c["index"] for e in events for c in e["choices"]}
    assert indexes == {0, 1, 2, 3} and events[-1]["usage"]["completion_tokens"] == 12
    assert all(e["usage"] is None for e in events[:-1])  # one usage, at the end
    whole = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}
    resp = await client.post("/v1/completions", json=whole)
    assert [c["index"] for c in resp.json()["choices"]] == [0, 1, 2, 3]
    gateway.backend.fail_at = 1  # every choice fails at its second token
    resp = await client.post("/v1/completions", json=body)
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert_openai_error(json.loads(events[-2]))
    resp = await client.post("/v1/completions", json=whole)
    assert resp.status_code == 503
    assert_openai_error(resp.json())
    gateway.backend.fail_at = None
    assert gateway.running == 0, "a failed request kept its slots"


async def test_body_limit_and_unknown_routes_are_openai_errors(client):
    big = b'{"prompt": "' + b"x" * MAX_BODY + b'"}'
    resp = await client.post("/v1/completions", content=big)
    assert resp.status_code == 413

    async def parts():  # no content-length: the limit applies while reading
        yield big[:100]
        yield big[100:]

    chunked = await client.post("/v1/completions", content=parts())
    assert chunked.status_code == 413
    for resp in (await client.get("/v2/nothing"), await client.put("/v1/completions")):
        assert resp.status_code in (404, 405)
        assert_openai_error(resp.json())


async def test_api_keys_guard_every_route_but_health(gateway):
    app = create_app(gateway, gateway.metrics, api_keys=["k1", "k2"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        assert (await c.get("/health")).status_code == 200
        for path in ("/v1/models", "/metrics", "/openapi.json"):
            for headers in ({}, {"Authorization": "Bearer k3"}, {"Authorization": "k1"}):
                resp = await c.get(path, headers=headers)
                assert resp.status_code == 401 and "k1" not in resp.text
                assert_openai_error(resp.json())
            assert (await c.get(path, headers={"Authorization": "Bearer k2"})).status_code == 200
        resp = await c.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status_code == 401


# --- parsers, whatever the input -----------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed",
          "stop", "stop_token_ids", "stream", "stream_options", "n", "echo", "content"]  # fmt: skip
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6) | json_values
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(bodies, st.sampled_from(["completion", "chat"]))
def test_parse_raises_only_openai_errors(gateway, body, kind):
    try:
        req = gateway.parse(kind, body)
    except APIError as err:
        assert 400 <= err.status < 500
        assert_openai_error(err.body())
        return
    assert req.prompt_token_ids and req.params.max_tokens >= 1


@FUZZ
@given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_nats_api_bytes_parse_or_400(data):
    try:
        parse_json(data)
    except APIError as err:
        assert err.status == 400


class _NoNats:
    async def publish(self, subject, data):  # an abort naming nothing must not answer
        raise AssertionError("published")


@FUZZ
@given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
async def test_nats_abort_of_anything_unknown_is_ignored(gateway, data):
    class Msg:
        reply = "_INBOX.x"

    Msg.data = data
    await NatsApi(_NoNats(), gateway, None)._on_abort(Msg())
