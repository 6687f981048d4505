"""Structured output: on tiny random checkpoints (which never write JSON unconstrained) every
output that stops is valid against its grammar, in the engine and through real stacks (agg
and disagg, where the first token is sampled on the prefill worker and the matcher continues
on the decode worker); the OpenAI SDK's `parse` gets its object back."""

from __future__ import annotations

import contextlib
import json
import re

import jsonschema
import pytest
from tokenizers import Tokenizer

from disagg.shared.engine.grammar import GrammarError, Grammars, choice_grammar
from disagg.shared.engine.runtime import RuntimeConfig, build_runtime
from disagg.shared.protocol.sampling import SamplingParams, Structured
from tests.test_services import Up, assert_decode_pools_full

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
        },
        "required": ["name", "age", "role"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "number", "minimum": -5, "maximum": 5},
                    "y": {"type": "number", "minimum": -5, "maximum": 5},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
        },
        "required": ["point", "flags"],
        "additionalProperties": False,
    },  # fmt: skip
    "list": {
        "type": "array",
        "items": {"enum": ["red", "green", "blue"]},
        "minItems": 2,
        "maxItems": 4,
    },
}
PROMPTS = [[5, 6, 7, 8], [40, 41, 42], [100, 7, 200, 9, 11]]


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints(arch="llama")


@pytest.fixture(scope="module")
def runtime(model):
    return build_runtime(RuntimeConfig(model=model, dtype="float32", num_blocks=256, block_size=4))


@pytest.fixture(scope="module")
def tokenizer(model):
    return Tokenizer.from_file(str(model / "tokenizer.json"))


def generate(
    runtime, structured: Structured, prompts=PROMPTS, **sampling
) -> list[tuple[list[int], bool]]:
    """(output ids, stopped at EOS) of each prompt."""
    params = SamplingParams(max_tokens=96, structured=structured, **sampling)
    eos = set(runtime.model.args.eos_token_ids)
    return [(out, bool(out) and out[-1] in eos) for out in runtime.engine.generate(prompts, params)]


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_stopped_output_is_valid_json_for_its_schema(runtime, tokenizer, name):
    schema, stopped = SCHEMAS[name], 0
    unconstrained = runtime.engine.generate(PROMPTS, SamplingParams(max_tokens=24))
    assert not any(_parses(text_of(tokenizer, ids)) for ids in unconstrained)  # never by luck
    for sampling in ({}, {"temperature": 1.0, "seed": 7}, {"temperature": 1.0, "seed": 8}):
        for ids, at_eos in generate(runtime, Structured("json", json.dumps(schema)), **sampling):
            if at_eos:
                jsonschema.validate(json.loads(text_of(tokenizer, ids)), schema)
                stopped += 1
    assert stopped >= 3  # most stop well within max_tokens: the checks above ran
    assert runtime.pool.num_free == runtime.pool.num_blocks


def test_regex_and_choice_outputs_match(runtime, tokenizer):
    for ids, at_eos in generate(runtime, Structured("regex", r"[a-z]{3}-\d{2}")):
        assert at_eos and re.fullmatch(r"[a-z]{3}-\d{2}", text_of(tokenizer, ids))
    choices = ["yes", "no", 'say "maybe"']
    grammar = Structured("grammar", choice_grammar(choices))
    for ids, at_eos in generate(runtime, grammar, temperature=1.0, seed=3):
        assert at_eos and text_of(tokenizer, ids) in choices


def test_max_tokens_cuts_are_length_and_a_bad_grammar_is_refused_on_admission(runtime):
    from disagg.shared.engine.request import RequestError

    long = Structured("regex", r"[a-z]{40}")
    params = SamplingParams(max_tokens=5, structured=long)
    runtime.engine.add_request("cut", PROMPTS[0], params)
    finish = None
    while runtime.engine.has_unfinished():
        for out in runtime.engine.step():
            finish = out.finish_reason or finish
    assert finish == "length"
    bad = SamplingParams(structured=Structured("regex", "a(b"))
    with pytest.raises(RequestError, match="does not compile"):
        runtime.engine.add_request("bad", PROMPTS[0], bad)
    assert runtime.pool.num_free == runtime.pool.num_blocks


def test_a_continued_request_advances_its_matcher_over_the_tokens_so_far(runtime):
    """What a decode worker (or a worker after a migration) does: the tokens generated so far
    end the prompt (output_offset); its matcher has seen them, so the rest is what one worker
    would have generated."""
    structured = Structured("json", json.dumps(SCHEMAS["person"]))
    params = SamplingParams(max_tokens=96, structured=structured)
    (whole,) = runtime.engine.generate([PROMPTS[1]], params)
    for cut in (1, 5, len(whole) // 2):
        moved = params.replace(max_tokens=96 - cut, output_offset=cut)
        (rest,) = runtime.engine.generate([PROMPTS[1] + whole[:cut]], moved)
        assert whole[:cut] + rest == whole


def test_compiled_grammars_are_cached_per_tokenizer_and_grammar(model):
    grammars = Grammars(model / "tokenizer.json", 384, [0])
    regex = Structured("regex", "[ab]+")
    assert grammars.compile(regex) is grammars.compile(regex)
    assert grammars.compile(Structured("regex", "[ab]*")) is not grammars.compile(regex)
    with pytest.raises(GrammarError, match="parenthesis"):
        grammars.compile(Structured("regex", "(a"))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


# -- through real stacks ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["agg", "disagg"])
def stack(request, model):
    up = Up(model, "--mode", request.param)
    up.pool_role = "both" if request.param == "agg" else "decode"
    yield up
    up.stop()


@pytest.mark.slow
def test_response_format_and_guided_fields_through_the_stack(stack, model, runtime, tokenizer):
    """Greedy: the same text as the engine alone (so agg and disagg agree with each other)."""
    import httpx

    schema = SCHEMAS["person"]
    ((reference, _),) = generate(runtime, Structured("json", json.dumps(schema)), PROMPTS[:1])
    bodies = {
        "json_schema": {"response_format": {"type": "json_schema", "json_schema":
                        {"name": "person", "schema": schema, "strict": True}}},
        "structured_outputs": {"structured_outputs": {"json": schema}},
        "guided_json": {"guided_json": schema},
    }  # fmt: skip
    outputs = {}
    for name, extra in bodies.items():
        body = {"model": model.name, "prompt": PROMPTS[0], "max_tokens": 96, "temperature": 0}
        r = httpx.post(stack.base_url + "/v1/completions", json=body | extra, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["text"]), schema)
        outputs[name] = choice["text"]
    assert set(outputs.values()) == {text_of(tokenizer, reference)}  # three ways to ask
    chat = {"model": model.name, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 40, "temperature": 0, "guided_choice": ["left", "right"]}  # fmt: skip
    r = httpx.post(stack.base_url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.json()["choices"][0]["message"]["content"] in ("left", "right")
    bad = {"model": model.name, "prompt": "x", "guided_regex": "a(b"}
    r = httpx.post(stack.base_url + "/v1/completions", json=bad, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"
    assert_decode_pools_full(stack, stack.pool_role)


@pytest.mark.slow
def test_the_sdk_parse_helper_gets_its_object(stack, model):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=6)
        age: int = Field(ge=0, le=120)
        role: Literal["admin", "user", "guest"]

    client = stack.client()
    completion = client.beta.chat.completions.parse(
        model=model.name, messages=[{"role": "user", "content": "who?"}], max_tokens=96,
        temperature=0, response_format=Person,
    )  # fmt: skip
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Person) and 0 <= message.parsed.age <= 120


def test_length_bounded_json_strings_are_json_strings(model):
    """xgrammar's own lowering of minLength/maxLength admits raw control characters and no
    escapes (its issue #800); ours keeps the bound and JSON's string rules."""
    grammars = Grammars(model / "tokenizer.json", 384, [381])
    bounded = Structured("json", json.dumps({"type": "string", "maxLength": 3}))

    def accepts(text: str) -> bool:
        return grammars.matcher(bounded).accept_string(text)

    assert accepts('"ab"') and accepts('"a\\"b"') and accepts('"\\u00e9"')
    assert not accepts('"a\x14') and not accepts('"abcd')


@pytest.mark.slow
def test_structured_streams_survive_a_decode_worker_killed_mid_stream(model, tmp_path):
    """Greedy structured streams on the decode worker that is SIGKILLed move to the other one:
    the new worker's matcher is advanced over the tokens so far, and every stream ends as the
    uninterrupted one did (tokens equal, matching its regex). Both decode workers are stopped
    (SIGSTOP) once the streams have started, so none can finish before the kill."""
    import os
    import signal

    from tests.test_failures import Streams

    regex = "[a-z]{3}( [a-z]{2,5}){120}"  # ~600 bytes
    bodies = [{"guided_regex": regex, "ignore_eos": False}] * len(PROMPTS)
    stack = Up(model, "--prefill", "1", "--decode", "2", log_dir=tmp_path)
    decodes = [n for n in stack.pids if n.startswith("decode")]
    try:
        reference = Streams(stack.base_url, PROMPTS, 900, bodies).results()
        streams = Streams(stack.base_url, PROMPTS, 900, bodies)
        streams.wait_started(5)
        for name in decodes:
            os.kill(stack.pids[name], signal.SIGSTOP)
        placed = [json.loads(line) for line in (tmp_path / "scheduler.log").read_text().splitlines()
                  if '"placed"' in line]  # fmt: skip
        victim_id = next(e["decode"] for e in placed if e["request_id"] in streams.ids)
        victim = next(n for n in decodes if victim_id in (tmp_path / f"{n}.log").read_text())
        os.kill(stack.pids[victim], signal.SIGKILL)
        for name in decodes:
            if name != victim:
                os.kill(stack.pids[name], signal.SIGCONT)
        assert streams.results() == reference
        moved = (tmp_path / "gateway.log").read_text().count('"event": "migrating"')
        assert moved >= 1  # streams were on the killed worker, mid-stream
        text = Tokenizer.from_file(str(model / "tokenizer.json"))
        for ids in reference:
            assert re.fullmatch(regex, text.decode(ids, skip_special_tokens=True))
        assert_decode_pools_full(stack)
    finally:
        for name in decodes:  # never leave one stopped behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(stack.pids[name], signal.SIGCONT)
        stack.stop()


def test_min_tokens_past_the_grammars_end_ends_at_eos_and_ignore_eos_is_refused(runtime):
    """A grammar that is complete while min_tokens still forbids EOS leaves no token: the
    request ends at EOS (never a garbage token); ignore_eos cannot be combined at all."""
    from disagg.shared.engine.request import RequestError

    eos = runtime.model.args.eos_token_ids
    done = Structured("grammar", 'root ::= "no"')
    (out,) = runtime.engine.generate([PROMPTS[0]], SamplingParams(structured=done, min_tokens=8))
    assert out[-1] in eos and len(out) <= 3
    with pytest.raises(RequestError, match="EOS"):
        params = SamplingParams(structured=done, ignore_eos=True)
        runtime.engine.add_request("x", PROMPTS[0], params)
    assert runtime.pool.num_free == runtime.pool.num_blocks


# -- tool calls through real stacks --------------------------------------------------------------

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
         "additionalProperties": False}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]  # fmt: skip
ASK = [{"role": "user", "content": "Weather in Oslo?"}]
# What a Hermes-style model writes when it calls a tool (the tiny random one never would): forced
# by a regex, so that 'auto' reads calls out of real generated text.
HERMES_CALL = (r'Sure\.\n<tool_call>\n\{"name": "get_weather", "arguments": '
               r'\{"city": "[A-Z][a-z]{2,6}", "unit": "[CF]"\}\}\n</tool_call>')  # fmt: skip


def _chat(stack, model, **fields) -> dict:
    import httpx

    body = {"model": model.name, "messages": ASK, "max_tokens": 96, "temperature": 0,
            "tools": TOOLS} | fields  # fmt: skip
    r = httpx.post(stack.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.slow
def test_tool_calls_through_the_stack(stack, model, runtime, tokenizer):
    """A named function's arguments and `required`'s calls validate against their schemas (the
    named one greedy-equal to the engine alone under the same grammar, so agg and disagg agree);
    `auto` reads the Hermes call the model wrote."""
    import httpx

    named = {"type": "function", "function": {"name": "get_weather"}}
    choice = _chat(stack, model, tool_choice=named)
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), CITY)
    tokenized = {"model": model.name, "messages": ASK, "tools": TOOLS}
    prompt = httpx.post(stack.base_url + "/tokenize", json=tokenized, timeout=60).json()["tokens"]
    ((reference, _),) = generate(runtime, Structured("json", json.dumps(CITY)), [prompt])
    assert call["function"]["arguments"] == text_of(tokenizer, reference)

    for parallel in (True, False):
        choice = _chat(stack, model, tool_choice="required", parallel_tool_calls=parallel,
                       temperature=1.0, seed=11)  # fmt: skip
        calls = choice["message"]["tool_calls"]
        assert choice["finish_reason"] == "tool_calls" and calls
        assert parallel or len(calls) == 1
        for call in calls:
            schema = {"get_weather": CITY, "get_time": CLOCK}[call["function"]["name"]]
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)

    choice = _chat(stack, model, structured_outputs={"regex": HERMES_CALL})  # tool_choice auto
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Sure.\n"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), CITY)
    choice = _chat(stack, model, tool_choice="none", max_tokens=8)  # tools shown, none read
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "length"
    assert_decode_pools_full(stack, stack.pool_role)


@pytest.mark.slow
def test_streamed_tool_calls_reassemble_with_the_sdk_stream_helpers(stack, model):
    from typing import Literal

    import openai
    from pydantic import BaseModel, Field

    class GetWeather(BaseModel):
        city: str = Field(max_length=8)
        unit: Literal["C", "F"]

    client = stack.client()
    tool = openai.pydantic_function_tool(GetWeather)
    with client.beta.chat.completions.stream(
        model=model.name, messages=ASK, tools=[tool], max_tokens=96, temperature=0,
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
    ) as stream:  # fmt: skip
        pieces = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls" and len(pieces) > 1  # streamed
    assert isinstance(call.function.parsed_arguments, GetWeather)
    with client.beta.chat.completions.stream(
        model=model.name, messages=ASK, tools=TOOLS, max_tokens=96, temperature=0,
        extra_body={"structured_outputs": {"regex": HERMES_CALL}},
    ) as stream:  # fmt: skip
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.content == "Sure.\n" and message.tool_calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(message.tool_calls[0].function.arguments), CITY)
    assert_decode_pools_full(stack, stack.pool_role)
