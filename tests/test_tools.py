"""Tool calling in the gateway's core: what ``tools`` / ``tool_choice`` become (a grammar for
``required`` and a named function, a parser for ``auto``), the conversation's calls through the
chat template, and the calls read back from text, whole and streamed in pieces."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.services.gateway.openai.errors import APIError
from disagg.services.gateway.openai.parse import parse_chat
from disagg.services.gateway.openai.request import ParseContext
from disagg.services.gateway.openai.responses import StreamAssembler, chat_response, usage
from disagg.services.gateway.openai.toolcalls import ToolCallReader, read_all
from disagg.services.gateway.openai.tools import ToolPlan, parser_for
from disagg.shared.tokenizer import Tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
HERMES = ToolPlan("auto", parser="hermes")
# as pydantic (and so the SDK's pydantic_function_tool) writes nested models: $refs to its root
PLACE = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
DEFS = {"type": "function", "function": {"name": "route", "parameters": {
    "type": "object", "$defs": {"Place": PLACE},
    "properties": {"start": {"$ref": "#/$defs/Place"}, "end": {"$ref": "#/$defs/Place"}},
    "required": ["start", "end"]}}}  # fmt: skip
DEFS_TOO = {"type": "function", "function": {"name": "visit", "parameters": {
    "type": "object", "$defs": {"Place": {"type": "string"}},
    "properties": {"at": {"$ref": "#/$defs/Place"}}}}}  # fmt: skip


@pytest.fixture(scope="module")
def tok(checkpoints) -> Tokenizer:
    return Tokenizer(checkpoints(arch="llama"))


@pytest.fixture(scope="module")
def ctx(tok) -> ParseContext:
    parser = parser_for(None, tok.chat_template)
    return ParseContext(("tiny",), tok, max_model_len=4096, tool_parser=parser)


def chat(ctx, **fields):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Weather in Oslo?"}]}
    return parse_chat(body | {"max_tokens": 8} | fields, ctx)


def test_the_tiny_template_selects_the_hermes_parser_and_a_flag_overrides_it(tok):
    assert parser_for(None, tok.chat_template) == "hermes"
    assert parser_for("none", tok.chat_template) is None
    assert parser_for(None, "{{ messages }}") is None


def test_tool_choice_becomes_a_grammar_or_a_parser(ctx):
    named = chat(ctx, tools=[WEATHER, TIME],
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
    assert named.tools == ToolPlan("named", name="get_weather")
    assert json.loads(named.params.structured.spec) == WEATHER["function"]["parameters"]
    required = chat(ctx, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(required.params.structured.spec)
    assert required.tools.mode == "required" and schema["maxItems"] == 1
    names = [o["properties"]["name"]["const"] for o in schema["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    auto = chat(ctx, tools=[WEATHER])  # auto is the default with tools
    assert auto.tools == HERMES and auto.params.structured is None
    assert chat(ctx, tools=[WEATHER], tool_choice="none").tools is None
    # auto may be combined with a grammar of its own; required / named may not
    both = chat(ctx, tools=[WEATHER], structured_outputs={"regex": "[a-z]+"})
    assert both.tools == HERMES and both.params.structured.kind == "regex"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice.function.name"),
        ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a+"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters":
          {"type": "objectx"}}}], "tool_choice": "required"}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"chat_template_kwargs": {"raise_exception": 1}}, "chat_template_kwargs"),
        ({"tools": [DEFS, DEFS_TOO], "tool_choice": "required"}, "tools"),  # clashing $defs
        ({"tools": [WEATHER], "tool_choice": "required", "ignore_eos": True}, "ignore_eos"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}], "tools": [WEATHER],
          "tool_choice": "none"}, None),  # an empty list is no calls: accepted
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c", "function":
          {"name": "f", "arguments": "{}"}}]}]}, "messages[0].tool_calls"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400s_naming_their_field(ctx, fields, param):
    if param is None:
        chat(ctx, **fields)
        return
    with pytest.raises(APIError) as info:
        chat(ctx, **fields)
    assert (info.value.status, info.value.param) == (400, param)


def test_the_conversations_calls_and_results_reach_the_template(ctx, tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type":
         "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
    ]  # fmt: skip
    req = chat(ctx, messages=messages, tools=[WEATHER], chat_template_kwargs={"unused": 1})
    prompt = tok.decode(req.prompt_token_ids, skip_special_tokens=False)
    assert json.dumps(WEATHER) in prompt and "Be brief." in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' in prompt
    assert "<tool_response>\n-3 C\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_hermes_calls_are_read_out_of_the_content():
    text = (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n'
    )
    content, calls = read_all(HERMES, text)
    assert content == "Let me look.\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {}),
    ]  # fmt: skip
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2
    content, calls = read_all(replace(HERMES, parallel=False), text + "\n\nbye")
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert content == read_all(HERMES, text + "\n\nbye")[0] == "Let me look.\n\n\n\nbye"
    # not a call: a block that is no JSON call, text without blocks
    assert read_all(HERMES, "a <tool_call>oops</tool_call> b") == (
        "a <tool_call>oops</tool_call> b", [])  # fmt: skip
    assert read_all(HERMES, "a < b <tool") == ("a < b <tool", [])
    # the model stopped inside a block whose JSON is complete: still a call
    _, calls = read_all(HERMES, '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}')
    assert calls[0]["function"] == {"name": "f", "arguments": '{"a": 1}'}


def test_required_and_named_outputs_are_calls():
    text = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", ' \
           '"parameters": {}}]'  # fmt: skip
    content, calls = read_all(ToolPlan("required"), text)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    content, calls = read_all(ToolPlan("named", name="get_weather"), '{"city": "Oslo"}')
    assert content is None and calls[0]["function"] == {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}  # fmt: skip


def _fold(plan: ToolPlan, pieces: list[str]) -> tuple[str, list[tuple[str, str]], list[dict]]:
    reader, content, calls, deltas = ToolCallReader(plan), [], [], []
    for i, piece in enumerate(pieces):
        text, out = reader.push(piece, final=i == len(pieces) - 1)
        content.append(text)
        deltas += out
        for d in out:
            if "id" in d:
                assert d["index"] == len(calls) and d["type"] == "function"
                calls.append([d["function"]["name"], d["function"]["arguments"]])
            else:
                calls[d["index"]][1] += d["function"]["arguments"]
        assert len({d["index"] for d in out}) == len(out)  # one delta per call and chunk
    return "".join(content), [tuple(c) for c in calls], deltas


TEXTS = {
    HERMES: 'I will call it.<tool_call>\n{"name": "f", "arguments": {"x": [1, "</"]}}\n'
            '</tool_call>\n \n<tool_call>{"name": "g", "arguments": {}}</tool_call> and done <t',
    ToolPlan("required"): ' [ {"name": "f", "parameters": {"x": "]}"}} ,{"name": "g", '
                          '"parameters": {"y": [1, 2]}}]',
    ToolPlan("named", name="f"): '{"x": [1, 2], "s": "a}b"}',
}  # fmt: skip


@pytest.mark.parametrize("plan", list(TEXTS), ids=["hermes", "required", "named"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_streamed_in_any_pieces_the_calls_are_the_whole_texts(plan, data):
    text = TEXTS[plan]
    cuts = sorted(data.draw(st.sets(st.integers(1, len(text) - 1), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    whole_content, whole_calls = read_all(plan, text)
    content, calls, _ = _fold(plan, pieces)
    assert calls == [(c["function"]["name"], c["function"]["arguments"]) for c in whole_calls]
    assert content == (whole_content or "")


def test_stream_chunks_and_bodies_carry_tool_calls_and_their_finish(ctx):
    req = chat(ctx, tools=[WEATHER], stream=True)
    text = 'Hm.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    assembler = StreamAssembler(req)
    chunks = assembler.delta(text[:10], [1]) + assembler.delta(text[10:], [2])
    chunks += assembler.finish("stop", usage(3, 2))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": "Hm."}
    (call,) = deltas[1]["tool_calls"]
    assert deltas[1]["content"] is None and call["function"]["name"] == "get_weather"
    pieces = [tc["function"]["arguments"] for d in deltas for tc in d.get("tool_calls", [])]
    arguments = "".join(pieces)
    assert json.loads(arguments) == {"city": "Oslo"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    body = chat_response(req, text, "stop", usage(3, 2))
    message = body["choices"][0]["message"]
    assert message["content"] == "Hm." and message["tool_calls"][0]["function"]["name"] == (
        "get_weather")  # fmt: skip
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    # cut by max_tokens: "length" stays; no call read: content as it is
    assert chat_response(req, text, "length", usage(3, 2))["choices"][0]["finish_reason"] == (
        "length")  # fmt: skip
    plain = chat_response(req, "no calls", "stop", usage(3, 2))["choices"][0]
    assert plain["message"] == {"role": "assistant", "content": "no calls"}
    assert plain["finish_reason"] == "stop"


def test_required_keeps_each_tools_defs_reachable(ctx):
    """A tool's $defs move to the root of the calls' schema, where its $refs point (the parse
    compiles the grammar: an unresolved $ref would be a 400)."""
    req = chat(ctx, tools=[DEFS, WEATHER], tool_choice="required")
    schema = json.loads(req.params.structured.spec)
    assert schema["$defs"] == {"Place": PLACE}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]


def test_a_template_error_the_request_causes_is_a_400(tok):
    from disagg.shared.tokenizer import ChatTemplateError

    broken = Tokenizer.__new__(Tokenizer)
    broken.__dict__ |= tok.__dict__ | {"chat_template": "{{ messages[0].content + extra }}"}
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        broken.apply_chat_template([{"role": "user", "content": "a"}], extra=1)
