"""The gateway's pure core: OpenAI request validation, response shapes, SSE framing, the
streaming detokenizer with stop strings, and the Prometheus metrics."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from disagg.services.gateway.detok import StreamDetokenizer
from disagg.services.gateway.metrics import GatewayMetrics
from disagg.services.gateway.openai.errors import (
    APIError,
    authentication_failed,
    gateway_timeout,
    model_not_found,
    payload_too_large,
    queue_full,
    service_unavailable,
)
from disagg.services.gateway.openai.logprobs import LogprobFormatter, merge
from disagg.services.gateway.openai.parse import parse_chat, parse_completion
from disagg.services.gateway.openai.request import GenerationRequest, ParseContext
from disagg.services.gateway.openai.responses import (
    SSE_DONE,
    StreamAssembler,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    models_response,
    sse,
    usage,
    usage_chunk,
)
from disagg.services.gateway.openai.tokenize import detokenize, tokenize
from disagg.shared.protocol.sampling import Logprob, SamplingParams
from disagg.shared.tokenizer import Tokenizer

MAX_MODEL_LEN = 64
DELETE = object()  # marks a field to remove from the base body


@pytest.fixture(scope="module")
def tok(checkpoints) -> Tokenizer:
    return Tokenizer(checkpoints(arch="llama"))


@pytest.fixture(scope="module")
def ctx(tok) -> ParseContext:
    return ParseContext(
        served_models=("tiny", "tiny-alias"),
        tokenizer=tok,
        max_model_len=MAX_MODEL_LEN,
        max_prompt_chars=500,
    )


def completion_body(**fields) -> dict:
    return _merge({"model": "tiny", "prompt": "Hello", "max_tokens": 4}, fields)


def chat_body(**fields) -> dict:
    base = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    return _merge(base, fields)


def _merge(base: dict, fields: dict) -> dict:
    body = base | fields
    return {k: v for k, v in body.items() if v is not DELETE}


def parse(kind: str, body, ctx: ParseContext) -> GenerationRequest:
    return (parse_completion if kind == "completion" else parse_chat)(body, ctx)


# ---------------------------------------------------------------------------------------------
# Validation: each bad field gives the right status, type and param.

BAD_COMMON = [
    ("model", "nope", 404, "not_found_error"),
    ("model", 7, 400, "invalid_request_error"),
    ("max_tokens", 0, 400, "invalid_request_error"),
    ("max_tokens", -3, 400, "invalid_request_error"),
    ("max_tokens", "5", 400, "invalid_request_error"),
    ("max_tokens", 5.0, 400, "invalid_request_error"),
    ("max_tokens", True, 400, "invalid_request_error"),
    ("temperature", -0.1, 400, "invalid_request_error"),
    ("temperature", 2.5, 400, "invalid_request_error"),
    ("temperature", "1", 400, "invalid_request_error"),
    ("temperature", True, 400, "invalid_request_error"),
    ("temperature", math.nan, 400, "invalid_request_error"),
    ("top_p", 0, 400, "invalid_request_error"),
    ("top_p", 1.5, 400, "invalid_request_error"),
    ("top_k", -2, 400, "invalid_request_error"),
    ("top_k", 2.5, 400, "invalid_request_error"),
    ("seed", "1", 400, "invalid_request_error"),
    ("seed", 2**63, 400, "invalid_request_error"),
    ("seed", 1.0, 400, "invalid_request_error"),
    ("stop", 5, 400, "invalid_request_error"),
    ("stop", ["a", 1], 400, "invalid_request_error"),  # param "stop[1]": see ELEMENT
    ("stop", [f"s{i}" for i in range(33)], 400, "invalid_request_error"),  # over the flag's 32
    ("stop", [""], 400, "invalid_request_error"),
    ("stop", ["x" * 201], 400, "invalid_request_error"),
    ("stop_token_ids", [384], 400, "invalid_request_error"),
    ("stop_token_ids", [-1], 400, "invalid_request_error"),
    ("stop_token_ids", "1", 400, "invalid_request_error"),
    ("stop_token_ids", [1.5], 400, "invalid_request_error"),
    ("stop_token_ids", list(range(65)), 400, "invalid_request_error"),
    ("ignore_eos", "yes", 400, "invalid_request_error"),
    ("ignore_eos", 1, 400, "invalid_request_error"),
    ("n", 17, 400, "invalid_request_error"),  # over 16 choices
    ("n", 0, 400, "invalid_request_error"),
    ("n", True, 400, "invalid_request_error"),
    ("stream", "true", 400, "invalid_request_error"),
    ("stream", 1, 400, "invalid_request_error"),
    ("stream_options", {"include_usage": True}, 400, "invalid_request_error"),
    ("return_token_ids", 1, 400, "invalid_request_error"),
    ("best_of", 2, 400, "invalid_request_error"),
    ("logit_bias", {"x": 5}, 400, "invalid_request_error"),
    ("logit_bias", {"384": 5}, 400, "invalid_request_error"),
    ("logit_bias", [1], 400, "invalid_request_error"),
    ("presence_penalty", 2.5, 400, "invalid_request_error"),
    ("frequency_penalty", False, 400, "invalid_request_error"),
    ("repetition_penalty", 0, 400, "invalid_request_error"),
    ("min_p", 1.5, 400, "invalid_request_error"),
    ("min_tokens", -1, 400, "invalid_request_error"),
    ("min_tokens", 99, 400, "invalid_request_error"),  # above max_tokens
    ("allowed_token_ids", [], 400, "invalid_request_error"),
    ("allowed_token_ids", [400], 400, "invalid_request_error"),
    ("bad_words", [""], 400, "invalid_request_error"),
    ("guided_grammar", "root ::= x", 400, "invalid_request_error"),
    ("truncate_prompt_tokens", 5, 400, "invalid_request_error"),
    ("response_format", {"type": "json_schema"}, 400, "invalid_request_error"),
    ("response_format", {"type": "xml"}, 400, "invalid_request_error"),
    (
        "response_format",
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}},
        400,
        "invalid_request_error",
    ),  # fmt: skip
    ("response_format", {"type": "json_object", "strict": True}, 400, "invalid_request_error"),
    ("structured_outputs", {"regex": "a(b"}, 400, "invalid_request_error"),
    ("structured_outputs", {"regex": "a", "choice": ["b"]}, 400, "invalid_request_error"),
    ("structured_outputs", {}, 400, "invalid_request_error"),
    ("guided_choice", [], 400, "invalid_request_error"),
    ("guided_regex", "", 400, "invalid_request_error"),
    ("guided_json", 5, 400, "invalid_request_error"),
    ("tool_choice", "required", 400, "invalid_request_error"),  # no tools (chat), or at all
]
F_TOOL = [{"type": "function", "function": {"name": "f"}}]
BAD_COMPLETION = [
    ("tools", F_TOOL, "tools"),  # chat only
    ("prompt", DELETE, "prompt"),
    ("prompt", 5, "prompt"),
    ("prompt", "", "prompt"),
    ("prompt", [], "prompt"),
    ("prompt", ["a"] * 17, "prompt"),  # over 16 prompts
    ("prompt", [[1, "a"], [3]], "prompt"),
    ("prompt", [1, "a"], "prompt"),
    ("prompt", [1, 384], "prompt"),
    ("prompt", [-1], "prompt"),
    ("prompt", [True], "prompt"),
    ("prompt", [[1, "a"]], "prompt"),
    ("prompt", "a" * 501, "prompt"),
    ("logprobs", 21, "logprobs"),
    ("logprobs", True, "logprobs"),
    ("echo", "yes", "echo"),
    ("suffix", "end", "suffix"),
]
BAD_CHAT = [
    ("tools", F_TOOL, "tool_choice"),  # 'auto' by default: this model reads no calls back
    ("tools", [{"type": "function", "function": {"name": "no spaces"}}], "tools[0].function.name"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}, "tool_choice"),  # no tools
    ("chat_template_kwargs", {"tools": []}, "chat_template_kwargs"),
    ("chat_template_kwargs", [], "chat_template_kwargs"),
    ("messages", DELETE, "messages"),
    ("messages", "hi", "messages"),
    ("messages", [], "messages"),
    ("messages", ["hi"], "messages[0]"),
    ("messages", [{"role": "robot", "content": "x"}], "messages[0].role"),
    ("messages", [{"content": "x"}], "messages[0].role"),
    ("messages", [{"role": 1, "content": "x"}], "messages[0].role"),
    ("messages", [{"role": "user"}], "messages[0].content"),
    ("messages", [{"role": "user", "content": 5}], "messages[0].content"),
    ("messages", [{"role": "user", "content": [{"type": "image_url"}]}], None),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}], None),
    ("messages", [{"role": "user", "content": "x", "name": 3}], "messages[0].name"),
    ("messages", [{"role": "user", "content": "a" * 501}], "messages"),
    ("max_completion_tokens", 0, "max_completion_tokens"),
    ("logprobs", "yes", "logprobs"),
    ("top_logprobs", 2, "top_logprobs"),  # without logprobs: true
    ("top_logprobs", 21, "top_logprobs"),
    ("echo", True, "echo"),
    ("add_generation_prompt", "no", "add_generation_prompt"),
]


# A bad element of an array is named by its path (OpenAI's `param`, e.g. "stop[1]").
ELEMENT = {
    ("stop", "['a', 1]"): "stop[1]",
    ("stop_token_ids", "[-1]"): "stop_token_ids[0]",
    ("stop_token_ids", "[1.5]"): "stop_token_ids[0]",
    ("bad_words", "['']"): "bad_words[0]",
    ("prompt", "[[1, 'a'], [3]]"): "prompt[0][1]",
    ("prompt", "[1, 'a']"): "prompt[1]",
    ("prompt", "[True]"): "prompt[0]",
    ("prompt", "[[1, 'a']]"): "prompt[0][1]",
    ("response_format", "{'type': 'json_schema'}"): "response_format.json_schema",
    ("response_format", "{'type': 'xml'}"): "response_format.type",
    ("response_format", "{'type': 'json_object', 'strict': True}"): "response_format.strict",
    (
        "response_format",
        "{'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': {'type': 'objectx'}}}",
    ): "response_format.json_schema.schema",
    ("structured_outputs", "{'regex': 'a(b'}"): "structured_outputs.regex",
}


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize(("name", "value", "status", "type_"), BAD_COMMON)
def test_bad_common_field(ctx, kind, name, value, status, type_):
    body = (completion_body if kind == "completion" else chat_body)(**{name: value})
    with pytest.raises(APIError) as info:
        parse(kind, body, ctx)
    param = ELEMENT.get((name, repr(value)), name)
    assert (info.value.status, info.value.type, info.value.param) == (status, type_, param)


@pytest.mark.parametrize(("name", "value", "param"), BAD_COMPLETION)
def test_bad_completion_field(ctx, name, value, param):
    with pytest.raises(APIError) as info:
        parse_completion(completion_body(**{name: value}), ctx)
    param = ELEMENT.get((name, repr(value)), param)
    assert (info.value.status, info.value.type, info.value.param) == (
        400,
        "invalid_request_error",
        param,
    )


@pytest.mark.parametrize(("name", "value", "param"), BAD_CHAT)
def test_bad_chat_field(ctx, name, value, param):
    with pytest.raises(APIError) as info:
        parse_chat(chat_body(**{name: value}), ctx)
    err = info.value
    assert (err.status, err.type) == (400, "invalid_request_error")
    if param is None:  # content parts: the param names the part; check the prefix
        assert err.param.startswith("messages[0].content[0]")
    else:
        assert err.param == param


@pytest.mark.parametrize("body", [[], "text", None, 3, [{"prompt": "x"}]])
def test_body_must_be_an_object(ctx, body):
    for kind in ("completion", "chat"):
        with pytest.raises(APIError) as info:
            parse(kind, body, ctx)
        assert info.value.status == 400 and "JSON object" in info.value.message


def test_stream_options_checked_inside(ctx):
    with pytest.raises(APIError) as info:
        parse_chat(chat_body(stream=True, stream_options={"include_usage": "yes"}), ctx)
    assert info.value.param == "stream_options.include_usage"
    with pytest.raises(APIError) as info:
        parse_chat(chat_body(stream=True, stream_options=[]), ctx)
    assert info.value.param == "stream_options"


def test_prompts_and_n_become_indexed_choices_with_their_own_seeds(ctx, tok):
    req = parse_completion(completion_body(prompt=["one", [5, 6]], n=2, seed=9), ctx)
    assert [c.index for c in req.choices] == [0, 1, 2, 3]
    assert [c.prompt_token_ids for c in req.choices] == [tok.encode("one")] * 2 + [[5, 6]] * 2
    seeds = [c.params.seed for c in req.choices]
    assert seeds[0] == seeds[2] == 9 and seeds[1] == seeds[3] != 9  # per sequence, per prompt
    assert len({c.request_id for c in req.choices}) == 4
    assert {c.response_id for c in req.choices} == {req.request_id}
    assert parse_completion(completion_body(prompt=["one"]), ctx).choices == []  # one prompt
    with pytest.raises(APIError) as info:
        parse_completion(completion_body(prompt=["a"] * 9, n=2), ctx)
    assert info.value.param == "n"  # 18 choices
    assert parse_completion(completion_body(n=3, best_of=3), ctx).choices


def test_model_not_found_message(ctx):
    with pytest.raises(APIError) as info:
        parse_completion(completion_body(model="gpt-4"), ctx)
    assert info.value.body() == {
        "error": {
            "message": "The model `gpt-4` does not exist.",
            "type": "not_found_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


NEUTRAL = {
    "logprobs": None,
    "best_of": 1,
    "response_format": {"type": "text"},
    "tools": [],
    "tool_choice": "none",
    "n": 1,
    "user": "someone",
    "some_unknown_extension": {"x": 1},
    "stop": None,
    "seed": None,
}


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_neutral_and_unknown_fields_accepted(ctx, kind):
    body = (completion_body if kind == "completion" else chat_body)(**NEUTRAL)
    req = parse(kind, body, ctx)
    assert req.params.max_tokens == 4 and req.stop == []


# ---------------------------------------------------------------------------------------------
# Good bodies


def test_completion_parses_every_field(ctx, tok):
    body = completion_body(
        prompt="The river",
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=20,
        seed=-5,
        stop=["\n", "END", "\n"],
        stop_token_ids=[381, 5],
        ignore_eos=True,
        stream=True,
        stream_options={"include_usage": True},
        return_token_ids=True,
        echo=True,
    )
    req = parse_completion(body, ctx, request_id="cmpl-abc", created=1700000000)
    assert req.params == SamplingParams(
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=20,
        seed=-5,
        stop_token_ids=(381, 5),
        ignore_eos=True,
    )
    assert req.prompt_token_ids == tok.encode("The river")
    assert req.stop == ["\n", "END"]
    assert (req.stream, req.include_usage, req.return_token_ids) == (True, True, True)
    assert (req.request_id, req.created, req.kind, req.model) == (
        "cmpl-abc",
        1700000000,
        "completion",
        "tiny",
    )
    assert req.echo_prompt_text == "The river"


def test_sampling_controls_reach_the_workers_as_token_ids(ctx, tok):
    body = completion_body(
        max_tokens=8, min_p=0.05, presence_penalty=-0.5, frequency_penalty=1.25,
        repetition_penalty=1.1, min_tokens=3, logit_bias={"17": -100, "5": 2.5},
        allowed_token_ids=[5, 17, 40], bad_words=["river", " flow"],
        stop=[f"s{i}" for i in range(20)],  # above OpenAI's 4: lm-eval sends more
    )  # fmt: skip
    params = parse_completion(body, ctx).params
    assert (params.min_p, params.presence_penalty, params.frequency_penalty) == (0.05, -0.5, 1.25)
    assert (params.repetition_penalty, params.min_tokens) == (1.1, 3)
    assert params.logit_bias == ((17, -100.0), (5, 2.5))
    assert params.allowed_token_ids == (5, 17, 40)
    forms = {
        tuple(tok.encode(t, add_special_tokens=False)) for t in ("river", " river", "flow", " flow")
    }
    assert set(params.bad_words_token_ids) == forms
    with pytest.raises(APIError) as info:
        parse_completion(completion_body(logit_bias={"5": 101}), ctx)
    assert info.value.param == "logit_bias.5"


def test_continuous_usage_stats_put_usage_on_every_chunk(ctx):
    options = {"include_usage": True, "continuous_usage_stats": True}
    req = make_request(ctx, stream=True, stream_options=options)
    stream = StreamAssembler(req)
    (first,) = stream.delta("Hel", [1, 2])
    (second,) = stream.delta("lo", [3])
    n = len(req.prompt_token_ids)
    assert first["usage"] == {"prompt_tokens": n, "completion_tokens": 2, "total_tokens": n + 2}
    assert second["usage"]["completion_tokens"] == 3
    done, tail = stream.finish("stop", usage(n, 4), "", [4])
    assert done["usage"]["completion_tokens"] == 4 and tail["usage"]["completion_tokens"] == 4
    plain = StreamAssembler(make_request(ctx, stream=True, stream_options={"include_usage": True}))
    assert plain.delta("x", [1])[0]["usage"] is None  # OpenAI: null until the last chunk


def test_completion_defaults(ctx, tok):
    req = parse_completion({"prompt": "Hello"}, ctx)
    assert req.model == "tiny"  # the first served name
    assert req.params == SamplingParams(max_tokens=16, temperature=1.0)
    assert req.request_id.startswith("cmpl-") and len(req.request_id) > 10
    assert (req.stream, req.include_usage, req.return_token_ids) == (False, False, False)
    assert req.echo_prompt_text is None and req.created > 0


@pytest.mark.parametrize(
    "prompt", [[71, 72, 383], [[71, 72, 383]], ["hi<|im_end|>"], "hi<|im_end|>"]
)
def test_completion_prompt_forms(ctx, tok, prompt):
    req = parse_completion(completion_body(prompt=prompt, echo=True), ctx)
    assert req.prompt_token_ids == [71, 72, 383]
    assert req.echo_prompt_text in ("hi", "hi<|im_end|>")  # ids decode without specials


def test_top_k_minus_one_and_zero_mean_off(ctx):
    for top_k in (-1, 0):
        assert parse_completion(completion_body(top_k=top_k), ctx).params.top_k == 0


def test_integer_temperature_is_a_number(ctx):
    assert parse_completion(completion_body(temperature=1), ctx).params.temperature == 1.0


def test_chat_applies_template(ctx, tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "ok", "name": "ann"},
    ]
    req = parse_chat(chat_body(messages=messages, max_tokens=DELETE), ctx)
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\nok<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert req.prompt_token_ids == tok.encode(expected, add_special_tokens=False)
    assert tok.decode(req.prompt_token_ids, skip_special_tokens=False) == expected
    # No max_tokens: fill the context window, as vLLM does.
    assert req.params.max_tokens == MAX_MODEL_LEN - len(req.prompt_token_ids)
    assert req.request_id.startswith("chatcmpl-") and req.kind == "chat"


def test_chat_without_generation_prompt(ctx, tok):
    req = parse_chat(chat_body(add_generation_prompt=False), ctx)
    assert tok.decode(req.prompt_token_ids, skip_special_tokens=False) == (
        "<|im_start|>user\nHi<|im_end|>\n"
    )


def test_chat_max_completion_tokens_wins(ctx):
    req = parse_chat(chat_body(max_tokens=9, max_completion_tokens=3), ctx)
    assert req.params.max_tokens == 3


def test_default_max_tokens_cap(ctx):
    capped = ParseContext(("tiny",), ctx.tokenizer, MAX_MODEL_LEN, default_max_tokens=5)
    assert parse_chat(chat_body(max_tokens=DELETE), capped).params.max_tokens == 5


# ---------------------------------------------------------------------------------------------
# Context length


def test_context_length_boundary_chat(ctx):
    prompt_len = len(parse_chat(chat_body(), ctx).prompt_token_ids)
    room = MAX_MODEL_LEN - prompt_len
    assert parse_chat(chat_body(max_tokens=room), ctx).params.max_tokens == room
    with pytest.raises(APIError) as info:
        parse_chat(chat_body(max_tokens=room + 1), ctx)
    err = info.value
    assert (err.status, err.param, err.code) == (400, "messages", "context_length_exceeded")
    assert err.message == (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you "
        f"requested {MAX_MODEL_LEN + 1} tokens ({prompt_len} in the messages, {room + 1} in "
        "the completion). Please reduce the length of the messages or completion."
    )


def test_context_length_completion(ctx, tok):
    prompt = "The river ran past the old mill " * 3
    n = len(tok.encode(prompt))
    with pytest.raises(APIError) as info:
        parse_completion(completion_body(prompt=prompt, max_tokens=MAX_MODEL_LEN), ctx)
    assert info.value.param == "prompt"
    assert "maximum context length is 64 tokens" in info.value.message
    assert f"({n} in your prompt; {MAX_MODEL_LEN} for the completion)" in info.value.message


def test_prompt_alone_too_long(ctx):
    with pytest.raises(APIError) as info:
        parse_chat(chat_body(messages=[{"role": "user", "content": "a b " * 40}]), ctx)
    assert "maximum context length" in info.value.message
    with pytest.raises(APIError) as info:
        parse_completion(completion_body(prompt=[1] * MAX_MODEL_LEN, max_tokens=DELETE), ctx)
    assert "maximum context length" in info.value.message


# ---------------------------------------------------------------------------------------------
# Errors


def test_error_helpers():
    cases = [
        (authentication_failed(), 401, "authentication_error"),
        (payload_too_large(1024), 413, "invalid_request_error"),
        (queue_full(3), 429, "rate_limit_error"),
        (service_unavailable("no decode worker"), 503, "service_unavailable_error"),
        (gateway_timeout("no first token in 30 s"), 504, "timeout_error"),
        (model_not_found("m"), 404, "not_found_error"),
    ]
    for err, status, type_ in cases:
        assert (err.status, err.type) == (status, type_)
        assert set(err.body()["error"]) == {"message", "type", "param", "code"}
        json.dumps(err.body())
    assert queue_full(3).headers == {"Retry-After": "3"}
    assert authentication_failed().headers == {}


# ---------------------------------------------------------------------------------------------
# Responses


def make_request(ctx, kind="chat", **fields) -> GenerationRequest:
    body = (completion_body if kind == "completion" else chat_body)(**fields)
    return parse(kind, body, ctx) if kind == "chat" else parse_completion(body, ctx)


def test_usage_shape():
    assert usage(10, 5, cached_tokens=8) == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 8},
    }


def test_completion_response_shape(ctx):
    req = make_request(ctx, "completion")
    body = completion_response(req, " world", "length", usage(1, 4))
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert (body["id"], body["object"], body["model"]) == (
        req.request_id,
        "text_completion",
        "tiny",
    )
    assert body["choices"] == [
        {"index": 0, "text": " world", "logprobs": None, "finish_reason": "length"}
    ]


def test_completion_response_token_ids_and_echo(ctx):
    req = make_request(ctx, "completion", return_token_ids=True, echo=True)
    choice = completion_response(req, "!", "stop", usage(1, 1), [5])["choices"][0]
    assert choice["text"] == "Hello!"
    assert (choice["prompt_token_ids"], choice["token_ids"]) == (req.prompt_token_ids, [5])


def test_chat_response_shape(ctx):
    req = make_request(ctx, return_token_ids=True)
    body = chat_response(req, "Hi there", "stop", usage(3, 2), [7, 8])
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi there"}
    assert body["choices"][0]["token_ids"] == [7, 8]
    assert body["prompt_token_ids"] == req.prompt_token_ids
    plain = chat_response(make_request(ctx), "x", "stop", usage(1, 1))
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]


def test_chunk_shapes(ctx):
    chat = make_request(ctx, stream=True, stream_options={"include_usage": True})
    first = chat_chunk(chat, "He", first=True)
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "He"}
    assert chat_chunk(chat, "llo")["choices"][0]["delta"] == {"content": "llo"}
    last = chat_chunk(chat, "", "stop")
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    tail = usage_chunk(chat, usage(3, 2))
    assert tail["choices"] == [] and tail["usage"]["total_tokens"] == 5
    comp = make_request(ctx, "completion", stream=True, return_token_ids=True)
    chunk = completion_chunk(comp, "x", None, [4], first=True)
    assert chunk["object"] == "text_completion" and "usage" not in chunk
    assert chunk["choices"][0]["prompt_token_ids"] == comp.prompt_token_ids
    assert "prompt_token_ids" not in completion_chunk(comp, "y", None, [5])["choices"][0]


def test_models_response():
    body = models_response(["a", "b"], created=5, max_model_len=64)
    assert body["object"] == "list"
    first, second = body["data"]
    (permission,) = first.pop("permission")
    assert first == {
        "id": "a",
        "object": "model",
        "created": 5,
        "owned_by": "disagg",
        "max_model_len": 64,
        "root": "a",
        "parent": None,
    }
    assert second["root"] == "a"  # every served name is the one model, as vLLM's aliases
    assert permission["object"] == "model_permission" and permission["allow_logprobs"]


def test_tokenize_and_detokenize_in_vllms_shapes(ctx, tok):
    text = "The river flows"
    body = tokenize({"model": "tiny", "prompt": text}, ctx)
    assert body == {"count": len(tok.encode(text)), "max_model_len": MAX_MODEL_LEN,
                    "tokens": tok.encode(text), "token_strs": None}  # fmt: skip
    bare = tokenize({"prompt": text, "add_special_tokens": False}, ctx)["tokens"]
    assert bare == tok.encode(text, add_special_tokens=False)
    chat = tokenize({"messages": [{"role": "user", "content": "Hi"}]}, ctx)
    assert chat["tokens"] == parse_chat(chat_body(), ctx).prompt_token_ids
    assert detokenize({"tokens": bare}, ctx) == {"prompt": text}
    for fn, body, param in (
        (tokenize, {}, "prompt"), (tokenize, {"prompt": 5}, "prompt"),
        (detokenize, {"tokens": [1, 384]}, "tokens"), (detokenize, {"tokens": "1"}, "tokens"),
        (tokenize, {"model": "nope", "prompt": "x"}, "model"),
    ):  # fmt: skip
        with pytest.raises(APIError) as info:
            fn(body, ctx)
        assert info.value.param == param


def test_sse_framing():
    frame = sse({"text": "line\nbreak ✓", "n": 1})
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 2  # newlines inside the JSON are escaped
    assert json.loads(frame[len(b"data: ") : -2]) == {"text": "line\nbreak ✓", "n": 1}
    assert "✓".encode() in frame
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_stream_assembler_chat(ctx):
    req = make_request(
        ctx, stream=True, stream_options={"include_usage": True}, return_token_ids=True
    )
    stream = StreamAssembler(req)
    assert stream.delta("", [1]) == []  # held-back text: no content-less chunk
    (first,) = stream.delta("Hel", [2])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert first["choices"][0]["token_ids"] == [1, 2]
    assert first["prompt_token_ids"] == req.prompt_token_ids
    (second,) = stream.delta("lo", [3])
    assert "prompt_token_ids" not in second and second["choices"][0]["token_ids"] == [3]
    done, tail = stream.finish("stop", usage(len(req.prompt_token_ids), 4), "", [4])
    assert done["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
        "token_ids": [4],
    }
    assert tail["choices"] == [] and tail["usage"]["completion_tokens"] == 4


def test_stream_assembler_empty_output(ctx):
    req = make_request(ctx, stream=True)
    (only,) = StreamAssembler(req).finish("stop", usage(1, 1))
    assert only["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    comp = make_request(ctx, "completion", stream=True, echo=True)
    (only,) = StreamAssembler(comp).finish("length", usage(1, 1), " x")
    assert only["choices"][0]["text"] == "Hello x"


# ---------------------------------------------------------------------------------------------
# Detokenizer


def feed(tok, text_or_ids, stop=(), batch=1, prompt=None, **options):
    ids = tok.encode(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
    det = StreamDetokenizer(tok, list(stop), prompt, **options)
    deltas = [det.push(ids[i : i + batch]) for i in range(0, len(ids), batch)]
    deltas.append(det.flush())
    return det, deltas


def test_multibyte_split_across_tokens(tok):
    text = "héllo ✓ 日本"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the premise: bytes are split
    det, deltas = feed(tok, ids)
    assert "".join(d.text for d in deltas) == text
    assert all("\ufffd" not in d.text for d in deltas)
    assert det.num_tokens == len(ids) and not det.stopped


def test_incomplete_utf8_at_end_is_flushed_like_decode(tok):
    ids = tok.encode("ok 日")[:-1]  # cut inside the character
    det, deltas = feed(tok, ids)
    assert all("\ufffd" not in d.text for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == tok.decode(ids)


def test_stop_at_token_boundary(tok):
    # 'he' 'll' 'o' ' wor' 'ld'
    det, deltas = feed(tok, "hello world", stop=[" wor"])
    assert "".join(d.text for d in deltas) == "hello"
    assert det.stopped and det.matched_stop == " wor" and det.num_tokens == 4


def test_stop_inside_a_token(tok):
    det, deltas = feed(tok, "hello world", stop=["l"])
    assert "".join(d.text for d in deltas) == "he"
    assert det.stopped and det.num_tokens == 2


def test_include_stop_str_in_output_and_special_tokens(tok, ctx):
    det, deltas = feed(tok, "hello world", stop=["lo wo"], include_stop=True)
    assert "".join(d.text for d in deltas) == "hello wo" and det.stopped
    ids = tok.encode("hi") + [tok.token_to_id(tok.eos_token)] + tok.encode(" there")
    _, plain = feed(tok, ids)
    _, raw = feed(tok, ids, skip_special_tokens=False)
    assert tok.eos_token not in "".join(d.text for d in plain)
    assert tok.eos_token in "".join(d.text for d in raw)
    req = parse_completion(
        completion_body(include_stop_str_in_output=True, skip_special_tokens=False), ctx
    )
    assert req.include_stop_str and not req.skip_special_tokens


def test_stop_spanning_tokens(tok):
    det, deltas = feed(tok, "hello world", stop=["lo wo"])
    assert "".join(d.text for d in deltas) == "hel"
    assert deltas[3].stopped and det.num_tokens == 4


def test_stop_never_emitted_and_later_tokens_dropped(tok):
    ids = tok.encode("hello world")
    det = StreamDetokenizer(tok, ["o w"])
    out = det.push(ids)  # one batch: the ids after the stopping one are not counted
    assert out.stopped and out.text == "hell" and out.token_ids == ids[:4]
    assert det.push([5, 6]).text == "" and det.num_tokens == 4
    assert det.flush().text == ""


def test_partial_stop_held_back_then_released(tok):
    # 'he' 'll' 'o': the last "l", then "lo", may start the stop "lox": held, then flushed.
    det = StreamDetokenizer(tok, ["lox"])
    texts = [det.push([i]).text for i in tok.encode("hello")]
    assert texts == ["he", "l", ""]
    assert det.flush().text == "lo" and not det.stopped


def test_partial_stop_released_when_disambiguated(tok):
    det = StreamDetokenizer(tok, ["o x"])
    texts = [det.push([i]).text for i in tok.encode("hello world")]
    # 'o' is held after 'll', ' wor' shows it was not "o x".
    assert texts == ["he", "ll", "", "o wor", "ld"]


def test_first_completed_stop_wins(tok):
    # Both stops are in the text; "ll" completes first although "hello" starts earlier.
    det, deltas = feed(tok, "hello world", stop=["hello", "ll"], batch=5)
    assert "".join(d.text for d in deltas) == "he" and det.matched_stop == "ll"


def test_final_stop_token_text_not_output(tok):
    ids = tok.encode("hello")
    det = StreamDetokenizer(tok, [])
    out = det.push(ids, final_token_is_stop=True)
    assert out.text == "hell" and det.num_tokens == 3 and out.token_ids == ids


def test_special_tokens_skipped_and_prompt_context(tok):
    prompt = tok.encode("The river")
    ids = tok.encode(" ran<|endoftext|>")
    det, deltas = feed(tok, ids, prompt=prompt)
    assert "".join(d.text for d in deltas) == " ran"
    # A prompt that ends inside a character is not used as context: the generated bytes that
    # would complete it decode on their own, as tokenizer.decode(generated ids) does.
    char = tok.encode("日")
    generated = char[-1:] + ids
    det, deltas = feed(tok, generated, prompt=char[:-1])
    assert "".join(d.text for d in deltas) == tok.decode(generated) == "\ufffd ran"


def expected_output(full: str, stops: list[str]) -> tuple[str, bool]:
    """The reference: `full` cut at the stop occurrence that completes first."""
    hits = [(full.find(s) + len(s), full.find(s)) for s in stops if s in full]
    if not hits:
        return full, False
    return full[: min(hits)[1]], True


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_concatenation_property(tok, data):
    vocab = tok.vocab_size
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=24), label="ids")
    full = tok.decode(ids)
    substrings = st.builds(
        lambda i, n: full[i : i + n], st.integers(0, max(len(full) - 1, 0)), st.integers(1, 6)
    )
    stop_text = st.one_of(substrings, st.text(alphabet="elo wr\n日", min_size=1, max_size=3))
    stops = data.draw(st.lists(stop_text.filter(bool), max_size=3), label="stops")
    batch = data.draw(st.integers(1, 5), label="batch")
    prompt = data.draw(st.lists(st.integers(0, vocab - 1), max_size=8), label="prompt")
    det, deltas = feed(tok, ids, stops, batch, prompt)
    want, stopped = expected_output(full, stops)
    assert "".join(d.text for d in deltas) == want
    assert det.stopped == stopped
    if not stopped:
        assert det.num_tokens == len(ids)


# ---------------------------------------------------------------------------------------------
# Metrics

EXPECTED_NAMES = {
    "disagg:time_to_first_token_seconds_bucket",
    "disagg:inter_token_latency_seconds_bucket",
    "disagg:e2e_request_latency_seconds_bucket",
    "disagg:e2e_request_latency_seconds_count",
    "disagg:kv_transfer_bytes_bucket",
    "disagg:kv_transfer_seconds_sum",
    "disagg:kv_transfer_exposed_seconds_bucket",
    "disagg:num_requests_running",
    "disagg:num_requests_waiting",
    "disagg:kv_blocks_free",
    "disagg:kv_blocks_total",
    "disagg:prompt_tokens_total",
    "disagg:generation_tokens_total",
    "disagg:request_success_total",
    "disagg:prefix_cache_queries_total",
    "disagg:prefix_cache_hits_total",
}


def samples(metrics: GatewayMetrics) -> dict[tuple[str, tuple], float]:
    text, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_metric_names_exposed_exactly():
    m = GatewayMetrics()
    m.observe_first_token(0.2)
    m.observe_inter_token(0.01)
    m.observe_request_finished(
        prompt_tokens=10, generation_tokens=5, e2e_s=1.5, finished_reason="stop"
    )
    m.observe_kv_transfer(1 << 20, 0.01, 0.002)
    m.observe_prefix_cache(16, 8)
    m.set_num_requests(running=2, waiting=1)
    m.set_worker_blocks("decode-0", "decode", free=90, total=100)
    got = samples(m)
    names = {name for name, _ in got}
    assert names >= EXPECTED_NAMES
    assert not any(name.endswith("_total_total") for name in names)
    assert got[("disagg:prompt_tokens_total", ())] == 10
    assert got[("disagg:request_success_total", (("finished_reason", "stop"),))] == 1
    assert got[("disagg:kv_blocks_free", (("role", "decode"), ("worker", "decode-0")))] == 90
    assert got[("disagg:prefix_cache_hits_total", ())] == 8


def test_two_gateways_are_independent_and_forget_workers():
    a, b = GatewayMetrics(), GatewayMetrics()
    a.observe_prefix_cache(4, 4)
    a.set_worker_blocks("p0", "prefill", 1, 2)
    a.set_worker_blocks("p0", "decode", 3, 4)
    a.set_worker_blocks("d1", "decode", 5, 6)
    assert samples(b)[("disagg:prefix_cache_queries_total", ())] == 0
    a.forget_worker("p0")
    a.forget_worker("never-seen")
    workers = {dict(labels).get("worker") for name, labels in samples(a) if "kv_blocks" in name}
    assert workers == {"d1"}


# ---------------------------------------------------------------------------------------------
# Logprobs: the OpenAI blocks from the workers' per-token values


def test_logprobs_fields_parse_into_a_top_n_count(ctx):
    assert parse_completion(completion_body(logprobs=3), ctx).params.logprobs == 3
    assert parse_completion(completion_body(), ctx).params.logprobs is None
    assert parse_chat(chat_body(logprobs=True), ctx).params.logprobs == 0
    assert parse_chat(chat_body(logprobs=True, top_logprobs=5), ctx).params.logprobs == 5
    assert parse_chat(chat_body(logprobs=False), ctx).params.logprobs is None
    echoed = parse_completion(completion_body(logprobs=1, echo=True), ctx)
    assert (echoed.params.logprobs, echoed.params.prompt_logprobs) == (1, 1)  # lm-eval's path
    both = parse_completion(completion_body(logprobs=1, echo=True, prompt_logprobs=4), ctx)
    assert (both.params.prompt_logprobs, both.prompt_logprobs) == (4, 4)
    assert parse_chat(chat_body(prompt_logprobs=0), ctx).params.prompt_logprobs == 0
    with pytest.raises(APIError) as info:
        parse_chat(chat_body(prompt_logprobs=21), ctx)
    assert info.value.param == "prompt_logprobs"


def test_completion_logprobs_block(tok):
    ids = tok.encode("héllo", add_special_tokens=False)
    lps = [Logprob(-0.5 - i, ((ids[i], -0.5 - i), (7, -3.0))) for i in range(len(ids))]
    fmt = LogprobFormatter(tok, "completion", text_offset=4)
    first, rest = fmt.block(ids[:2], lps[:2]), fmt.block(ids[2:], lps[2:])
    block = merge([first, rest])
    texts = [fmt.token(t) for t in ids]
    assert block["tokens"] == texts and block["token_logprobs"] == [lp.logprob for lp in lps]
    offsets = [4 + sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    assert block["text_offset"] == offsets  # running across chunks, after the echoed prompt
    assert block["top_logprobs"][0] == {texts[0]: -0.5, fmt.token(7): -3.0}
    # a token that is part of a character is written as its bytes, as vLLM does
    partial = [t for t in ids if not tok.token_bytes(t).decode(errors="ignore")]
    for t in partial:
        assert fmt.token(t).startswith("bytes:\\x")


def test_chat_logprobs_block_and_the_floor(tok):
    ids = tok.encode("Hi", add_special_tokens=False)
    lps = [Logprob(float("-inf"), ((ids[0], -0.1),))] + [Logprob(-1.0)] * (len(ids) - 1)
    (entry, *_) = LogprobFormatter(tok, "chat").block(ids, lps)["content"]
    assert entry["logprob"] == -9999.0  # -inf, as vLLM writes it
    assert entry["bytes"] == list(tok.token_bytes(ids[0]))
    assert entry["top_logprobs"] == [
        {"token": entry["token"], "logprob": -0.1, "bytes": entry["bytes"]}
    ]


def test_stream_assembler_carries_logprobs_of_held_back_tokens(ctx):
    req = make_request(ctx, stream=True, logprobs=True)
    stream = StreamAssembler(req)
    a = {"content": [{"token": "a"}]}
    b = {"content": [{"token": "b"}]}
    assert stream.delta("", [1], a) == []  # held back with its text
    (chunk,) = stream.delta("ab", [2], b)
    assert chunk["choices"][0]["logprobs"] == {"content": [{"token": "a"}, {"token": "b"}]}
    done, *_ = stream.finish("stop", usage(3, 2))
    assert done["choices"][0]["logprobs"] is None


def test_fork_groups_attach_who_joined_in_time_and_free_the_rest(ctx):
    import asyncio

    from disagg.services.gateway.fork import ForkGroup, fork_groups

    async def scenario():
        p = SamplingParams()
        group: ForkGroup[str] = ForkGroup("r-0", {"r-1": p, "r-2": p})
        one = asyncio.ensure_future(group.placement("r-1", timeout=5))
        await asyncio.sleep(0)
        assert list(await group.gather(timeout=0.05)) == ["r-1"]  # "r-2" is late
        assert await group.placement("r-2", timeout=5) is None  # so it starts alone
        group.attach("decode-a")
        group.attach(None)  # only the first call counts
        assert await one == "decode-a"
        lone: ForkGroup[str] = ForkGroup("s-0", {"s-1": p})
        waiting = asyncio.ensure_future(lone.placement("s-1", timeout=5))
        await asyncio.sleep(0)
        assert list(await lone.gather()) == ["s-1"]  # all joined: no wait
        lone.attach(None)  # the leader's admit failed
        assert await waiting is None
        assert await ForkGroup("t", {"t-1": p}).placement("t-1", timeout=0.01) is None

    asyncio.run(scenario())
    req = parse_completion({"model": "tiny", "prompt": ["ab", "cd"], "n": 2, "max_tokens": 2}, ctx)
    groups = fork_groups(req.choices)
    assert {rid: g.leader for rid, g in groups.items()} == {
        c.request_id: req.choices[c.index // 2 * 2].request_id for c in req.choices
    }


def test_pydantic_errors_read_as_openai_errors(ctx):
    def error(**fields) -> tuple:
        with pytest.raises(APIError) as info:
            parse_chat(chat_body(**fields), ctx)
        return info.value.param, info.value.code, info.value.message

    part = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}]
    assert error(messages=part) == (
        "messages[0].content[1].text", "missing_required",
        "Missing required parameter: 'messages[0].content[1].text'.",
    )  # fmt: skip
    assert error(temperature=math.inf) == (
        "temperature", "invalid_value",
        "Invalid 'temperature': expected a finite number, but got inf instead.",
    )  # fmt: skip
    assert error(top_p=0) == (
        "top_p",
        "invalid_value",
        "Invalid 'top_p': expected a value > 0.0, but got 0 instead.",
    )
    assert error(tools=[{"type": "function"}])[:2] == ("tools[0].function", "missing_required")
    assert error(functions=[{"name": "f"}])[:2] == ("functions", "unsupported")
