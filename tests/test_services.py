"""The whole stack as a user runs it: `disagg up` (real nats-server, real worker processes), the
official `openai` client, the NATS JSON API. Greedy tokens must equal transformers'."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nats
import openai
import pytest

from disagg.cli.procs import Child, NatsServer, disagg_command, free_port
from disagg.services.gateway.openai.parse import sequence_seed
from tests.conftest import hf_greedy, hf_logprobs

pytestmark = pytest.mark.slow
STARTUP_S = 240


class Up:
    """`disagg up` in a child process, stopped by PID at teardown."""

    def __init__(
        self, model: Path, *extra: str, log_dir: Path | None = None, ports: tuple | None = None
    ) -> None:
        self.port, self.nats_port = ports or (free_port(), free_port())
        argv = [*disagg_command(), "up", "--model", str(model), "--port", str(self.port)]
        argv += ["--nats-port", str(self.nats_port), "--kv-memory-gb", "0.05", "--block-size", "4"]
        if log_dir is not None:
            argv += ["--log-dir", str(log_dir)]
        # These tests check the disaggregated path itself: no prompt is prefilled on decode.
        env = os.environ | {"DISAGG_LOCAL_PREFILL_THRESHOLD": "0"}
        self.proc = subprocess.Popen(
            [*argv, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(STARTUP_S):
            self.stop()
            raise AssertionError("disagg up did not get ready:\n" + "".join(self.lines[-40:]))
        self.pids = {n: int(p) for n, p in re.findall(r"(\S+) \(pid (\d+)\)", self.output)}

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("processes:"):
                self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url + "/v1", api_key="none", timeout=120, max_retries=0
        )

    def metrics(self) -> str:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def blocks(metrics: str, kind: str, role: str) -> dict[str, float]:
    pattern = rf'disagg:kv_blocks_{kind}{{role="{role}",worker="([^"]+)"}} ([0-9.e+]+)'
    return {w: float(v) for w, v in re.findall(pattern, metrics)}


def assert_decode_pools_full(up: Up, role: str = "decode", timeout: float = 30.0) -> None:
    """Every decode worker reports free == total (heartbeats lag: wait up to a few beats)."""
    deadline = time.monotonic() + timeout
    while True:
        text = up.metrics()
        free, total = blocks(text, "free", role), blocks(text, "total", role)
        if total and free == total:
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"blocks not returned: free {free} total {total}")
        time.sleep(0.5)


def wait_for_transfer_count(up: Up, want: int, timeout: float = 30.0) -> float:
    """The gateway's count of KV transfers; reports arrive asynchronously, so wait for `want`."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(r"^disagg:kv_transfer_bytes_count (\S+)", up.metrics(), re.M)
        count = float(found.group(1)) if found else 0.0
        if count >= want or time.monotonic() >= deadline:
            return count
        time.sleep(0.5)


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints(arch="llama")


@pytest.fixture(scope="module")
def disagg_stack(model):
    up = Up(model, "--mode", "disagg")
    yield up
    up.stop()


@pytest.fixture(scope="module")
def agg_stack(model):
    up = Up(model, "--mode", "agg")
    yield up
    up.stop()


def greedy_completion(client: openai.OpenAI, prompt: str, n: int):
    resp = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=prompt,
        max_tokens=n,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = resp.choices[0]
    return resp, choice.prompt_token_ids, choice.token_ids


@pytest.mark.parametrize("stack", ["disagg_stack", "agg_stack"])
def test_openai_client_end_to_end(request, model, stack):
    up: Up = request.getfixturevalue(stack)
    client = up.client()
    assert [m.id for m in client.models.list().data] == [model.name]
    # completions: greedy token ids equal transformers
    resp, prompt_ids, ids = greedy_completion(client, "The market opened at seven.", 12)
    assert ids == hf_greedy(model, prompt_ids, 12)[: len(ids)]
    assert resp.usage.prompt_tokens == len(prompt_ids) and resp.usage.completion_tokens == len(ids)
    # chat, not streamed
    chat = client.chat.completions.create(
        model=model.name,
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=6,
        temperature=0,
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    # chat, streamed with usage: the same text as not streamed
    stream = client.chat.completions.create(
        model=model.name,
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    assert_decode_pools_full(up, "decode" if stack == "disagg_stack" else "both")
    transfers = wait_for_transfer_count(up, 3 if stack == "disagg_stack" else 0)
    if stack == "disagg_stack":  # every request crossed from prefill to decode, and was counted
        assert transfers >= 3
    else:
        assert transfers == 0


def seeded_ids(up: Up, prompt: str, seed: int, **fields) -> list[int]:
    resp = up.client().completions.create(
        model=up.client().models.list().data[0].id, prompt=prompt, max_tokens=12,
        temperature=1.0, seed=seed, extra_body={"return_token_ids": True, "ignore_eos": True,
                                                **fields},
    )  # fmt: skip
    return resp.choices[0].token_ids


SAMPLINGS = [
    {},
    {"top_k": 40, "top_p": 0.9},
    {"min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": 0.5},
    {"repetition_penalty": 1.3, "top_p": 0.8},
]


def test_seeded_sampling_is_the_same_in_agg_and_disagg(disagg_stack, agg_stack):
    prompt = "The market opened at seven."
    for fields in SAMPLINGS:
        draws = {seed: seeded_ids(agg_stack, prompt, seed, **fields) for seed in (1, 2, 3)}
        for seed, ids in draws.items():  # the prefill worker draws token 0, decode the rest
            assert seeded_ids(disagg_stack, prompt, seed, **fields) == ids, (fields, seed)
        assert len({tuple(ids) for ids in draws.values()}) == 3, fields
    assert_decode_pools_full(disagg_stack, "decode")
    assert_decode_pools_full(agg_stack, "both")


@pytest.mark.parametrize("stack", ["disagg_stack", "agg_stack"])
def test_logprobs_equal_transformers(request, model, stack):
    up: Up = request.getfixturevalue(stack)
    client = up.client()
    resp = client.completions.create(
        model=model.name, prompt="The market opened", max_tokens=6, temperature=0, logprobs=3,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )  # fmt: skip
    choice = resp.choices[0]
    ref = hf_logprobs(model, choice.prompt_token_ids, choice.token_ids)
    block = choice.logprobs
    assert len(block.token_logprobs) == len(choice.token_ids) == 6
    for i, token in enumerate(choice.token_ids):  # token 0 is the prefill worker's (disagg)
        assert block.token_logprobs[i] == pytest.approx(ref[i, token].item(), abs=1e-4)
        assert sorted(block.top_logprobs[i].values(), reverse=True)[:3] == pytest.approx(
            ref[i].topk(3).values.tolist(), abs=1e-4
        )
    assert block.text_offset[0] == 0 and len(block.tokens) == 6
    chat = dict(model=model.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    whole = client.chat.completions.create(**chat).choices[0]
    entries = whole.logprobs.content
    assert len(entries) >= 1 and all(len(e.top_logprobs) == 2 for e in entries)
    assert entries[0].top_logprobs[0].logprob >= entries[0].top_logprobs[1].logprob
    streamed = [
        e for c in client.chat.completions.create(**chat, stream=True)
        if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]  # fmt: skip
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in entries
    ]
    assert_decode_pools_full(up, "decode" if stack == "disagg_stack" else "both")


@pytest.mark.parametrize("stack", ["disagg_stack", "agg_stack"])
def test_echoed_prompt_logprobs_are_lm_evals_loglikelihood(request, model, stack):
    """lm-eval's loglikelihood request: the prompt's token ids, echo, logprobs, max_tokens 1."""
    up: Up = request.getfixturevalue(stack)
    prompt = [5, 9, 5, 17, 33, 9, 2, 40, 41, 7]
    for _ in range(2):  # the second time its blocks are cached: logprobs still come out whole
        body = {"model": model.name, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                "logprobs": 1, "echo": True, "prompt_logprobs": 2}  # fmt: skip
        with urllib.request.urlopen(_post(up.base_url + "/v1/completions", body), timeout=60) as r:
            choice = json.loads(r.read())["choices"][0]
        block = choice["logprobs"]
        assert (
            len(block["token_logprobs"]) == len(prompt) + 1 and block["token_logprobs"][0] is None
        )
        assert block["top_logprobs"][0] is None and block["text_offset"][0] == 0
        output = hf_greedy(model, prompt, 1)
        ref = hf_logprobs(model, prompt[:1], prompt[1:] + output)  # rows predict tokens 1..n
        for i, token in enumerate(prompt[1:] + output):
            assert block["token_logprobs"][i + 1] == pytest.approx(ref[i, token].item(), abs=1e-4)
        # lm-eval's parse_logprobs: context of 6 tokens, the rest is the continuation scored
        ctxlen, cont = 6, prompt[6:]
        loglik = sum(block["token_logprobs"][ctxlen:-1])
        ref_loglik = sum(ref[ctxlen - 1 + i, t].item() for i, t in enumerate(cont))
        assert loglik == pytest.approx(ref_loglik, abs=1e-3)
        greedy = all(
            max(top, key=top.get) == tok
            for top, tok in zip(block["top_logprobs"][ctxlen:-1], block["tokens"][ctxlen:-1])
        )
        assert greedy == all(int(ref[ctxlen - 1 + i].argmax()) == t for i, t in enumerate(cont))
        vllm = choice["prompt_logprobs"]
        assert vllm[0] is None and len(vllm) == len(prompt)
        for i, token in enumerate(prompt[1:]):
            mine = vllm[i + 1][str(token)]
            assert mine["logprob"] == pytest.approx(ref[i, token].item(), abs=1e-4)
            assert mine["rank"] == int((ref[i] > ref[i, token]).sum()) + 1
    assert_decode_pools_full(up, "decode" if stack == "disagg_stack" else "both")


def test_n_and_several_prompts_are_indexed_choices(disagg_stack, model):
    client = disagg_stack.client()
    ask = dict(model=model.name, prompt="The market opened", max_tokens=8, temperature=1.0,
               n=3, seed=11, extra_body={"return_token_ids": True, "ignore_eos": True})  # fmt: skip
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    ids = [c.token_ids for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2] and len({tuple(i) for i in ids}) == 3
    assert [c.token_ids for c in again.choices] == ids  # each sequence has a seed of its own
    assert first.usage.completion_tokens == 24
    solo = client.completions.create(**(ask | {"n": 1}))
    assert solo.choices[0].token_ids == ids[0]  # sequence 0 keeps the request's seed
    stream = client.completions.create(
        model=model.name, prompt=["The river", "A road"], max_tokens=5, temperature=0,
        stream=True, stream_options={"include_usage": True},
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )  # fmt: skip
    per_choice: dict[int, list[int]] = {0: [], 1: []}
    chunks = list(stream)
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            per_choice[c.index] += c.token_ids or []
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    for index, text in enumerate(("The river", "A road")):
        extra = {"return_token_ids": True, "ignore_eos": True}
        resp = client.completions.create(
            model=model.name, prompt=text, max_tokens=5, temperature=0, extra_body=extra
        )
        assert per_choice[index] == resp.choices[0].token_ids
    chat = client.chat.completions.create(model=model.name, n=2, max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "Hi"}])  # fmt: skip
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy
    assert_decode_pools_full(disagg_stack, "decode")


@pytest.mark.parametrize("stack", ["disagg_stack", "agg_stack"])
def test_n_sequences_share_one_prefill_and_repeat(request, model, stack):
    up = request.getfixturevalue(stack)
    client = up.client()
    prompt = f"{stack}: the four sequences of this prompt share its blocks on one decode worker."
    ask = dict(model=model.name, prompt=prompt, max_tokens=6, temperature=1.0, n=4,
               seed=21, extra_body={"return_token_ids": True, "ignore_eos": True})  # fmt: skip
    transfers = wait_for_transfer_count(up, 0, timeout=0)
    first = client.completions.create(**ask)
    if stack == "disagg_stack":  # one transfer for the four; none follows later
        assert wait_for_transfer_count(up, transfers + 1) == transfers + 1
        time.sleep(1.0)
        assert wait_for_transfer_count(up, 0, timeout=0) == transfers + 1
    ids = [c.token_ids for c in sorted(first.choices, key=lambda c: c.index)]
    assert len({tuple(i) for i in ids}) == 4 and all(len(i) == 6 for i in ids)
    # Sequences 1..3 found the prompt's full blocks cached (sequence 0 had just computed them).
    block = 16
    shared = (first.usage.prompt_tokens // 4 - 1) // block * block
    assert shared >= 2 * block  # the prompt spans several blocks
    assert first.usage.prompt_tokens_details.cached_tokens >= 3 * shared
    again = client.completions.create(**ask)
    assert [c.token_ids for c in sorted(again.choices, key=lambda c: c.index)] == ids
    for j, seq in enumerate(ids):  # each sequence draws what it would alone, with its seed
        alone = ask | {"n": 1, "seed": sequence_seed(21, j)}
        assert client.completions.create(**alone).choices[0].token_ids == seq
    assert_decode_pools_full(up, "decode" if stack == "disagg_stack" else "both")


def test_vllm_routes_tokenize_detokenize_version_models(disagg_stack, model):
    def post(path: str, body: dict):
        req = _post(disagg_stack.base_url + path, body)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    status, tokens = post("/tokenize", {"model": model.name, "prompt": "Hello there"})
    assert status == 200 and tokens["count"] == len(tokens["tokens"]) > 0
    assert post("/detokenize", {"tokens": tokens["tokens"]}) == (200, {"prompt": "Hello there"})
    status, err = post("/detokenize", {"tokens": ["x"]})
    assert status == 400 and err["error"]["param"] == "tokens[0]"
    with urllib.request.urlopen(disagg_stack.base_url + "/version", timeout=10) as resp:
        assert json.loads(resp.read())["version"]
    entry = disagg_stack.client().models.list().data[0]
    assert entry.root == model.name and entry.parent is None and entry.permission


def _post(url: str, body: dict) -> urllib.request.Request:
    headers = {"content-type": "application/json"}
    return urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")


def test_streamed_completion_equals_transformers(disagg_stack, model):
    client = disagg_stack.client()
    stream = client.completions.create(
        model=model.name,
        prompt=[5, 17, 33, 250, 7, 99, 120, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51],
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True},
    )
    ids = [t for chunk in stream for t in (chunk.choices[0].token_ids or [])]
    assert (
        ids
        == hf_greedy(
            model, [5, 17, 33, 250, 7, 99, 120, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], 10
        )[: len(ids)]
    )
    assert_decode_pools_full(disagg_stack)


async def nats_api(url: str, subject: str, body: dict, timeout: float = 60) -> list[dict]:
    """Request on the NATS API; for a stream, collect chunks until {"done": true}."""
    nc = await nats.connect(url)
    try:
        if not body.get("stream"):
            msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
            return [json.loads(msg.data)]
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(subject, json.dumps(body).encode(), reply=inbox)
        out = []
        while True:
            msg = await sub.next_msg(timeout=timeout)
            data = json.loads(msg.data)
            if data.get("done"):
                return out
            if not data.get("keepalive"):  # the gateway's probe of a long stream: skipped
                out.append(data)
    finally:
        await nc.close()


def test_nats_api_same_tokens(disagg_stack, model):
    body = {"model": model.name, "prompt": "She opened the window", "max_tokens": 8}
    body |= {"temperature": 0, "return_token_ids": True}
    (whole,) = asyncio.run(nats_api(disagg_stack.nats_url, "disagg.v1.completions", body))
    ids = whole["choices"][0]["token_ids"]
    prompt_ids = whole["choices"][0]["prompt_token_ids"]
    assert ids == hf_greedy(model, prompt_ids, 8)[: len(ids)]
    chunks = asyncio.run(
        nats_api(disagg_stack.nats_url, "disagg.v1.completions", body | {"stream": True})
    )
    assert [t for c in chunks for t in c["choices"][0].get("token_ids", [])] == ids
    chat = {"model": model.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0}  # fmt: skip
    (reply,) = asyncio.run(nats_api(disagg_stack.nats_url, "disagg.v1.chat.completions", chat))
    assert reply["object"] == "chat.completion"
    (bad,) = asyncio.run(
        nats_api(disagg_stack.nats_url, "disagg.v1.completions", {"model": "nope", "prompt": "x"})
    )
    assert bad["error"]["type"] == "not_found_error"
    assert_decode_pools_full(disagg_stack)


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_bad_requests_get_openai_errors(disagg_stack, model):
    url = disagg_stack.base_url + "/v1/completions"
    status, body = post(url, {"model": "gpt-17", "prompt": "hi"})
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body = post(url, {"model": model.name, "prompt": "hi", "temperature": "hot"})
    assert status == 400 and body["error"]["param"] == "temperature"
    status, body = post(
        url, {"model": model.name, "prompt": list(range(5, 380)) * 3, "max_tokens": 4}
    )
    assert status == 400 and "maximum context length" in body["error"]["message"]
    status, body = post(url, b"{not json")
    assert status == 400 and "error" in body
    assert_decode_pools_full(disagg_stack)


def test_no_worker_of_a_role_is_503(model, tmp_path):
    """Only a decode worker: nothing can prefill, so /health and requests answer 503."""
    server = NatsServer().start()
    port = free_port()
    common = ["--nats", server.url]
    children = [
        # Threshold 0: no conditional disaggregation, which would prefill "hi" on decode.
        Child(
            "scheduler", [*disagg_command(), "scheduler", *common, "--local-prefill-threshold", "0"]
        ),
        Child(
            "decode",
            [*disagg_command(), "decode", *common, "--model", str(model), "--kv-memory-gb", "0.05"],
        ),
        Child(
            "gateway",
            [*disagg_command(), "gateway", *common, "--model", str(model), "--port", str(port)],
        ),
    ]
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    raise AssertionError("healthy without a prefill worker")
            except urllib.error.HTTPError as err:
                assert err.code == 503
                break
            except OSError:
                if time.monotonic() >= deadline:
                    pytest.fail("gateway never answered")
                time.sleep(0.5)
        time.sleep(2.5)  # the decode worker's heartbeats have arrived by now
        status, body = post(base + "/v1/completions", {"model": model.name, "prompt": "hi"})
        assert status == 503 and body["error"]["type"] == "service_unavailable_error"
    finally:
        for child in reversed(children):
            child.stop()
        server.stop()


def test_two_pairs_spread_and_sigterm_drains(model, tmp_path):
    up = Up(model, "--prefill", "2", "--decode", "2", log_dir=tmp_path)
    try:
        client = up.client()
        prompts = [[7 + i, 20, 30 + i, 40, 50, 60 + i, 70, 80] for i in range(8)]

        def run(prompt):
            return (
                client.completions.create(
                    model=model.name,
                    prompt=prompt,
                    max_tokens=24,
                    temperature=0,
                    extra_body={"return_token_ids": True},
                )
                .choices[0]
                .token_ids
            )

        with ThreadPoolExecutor(8) as pool:
            first = list(pool.map(run, prompts))
        events = [
            json.loads(line) for line in (tmp_path / "scheduler.log").read_text().splitlines()
        ]
        placed = [e for e in events if e["event"] == "placed"]
        assert len({e["decode"] for e in placed}) == 2
        assert len({e["prefill"] for e in placed}) == 2
        # SIGTERM one decode worker while requests stream through both: none is lost.
        victim = next(pid for name, pid in up.pids.items() if name.startswith("decode"))
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(run, p) for p in prompts]
            time.sleep(1.0)
            subprocess.run(["kill", "-TERM", str(victim)], check=True)
            second = [f.result(timeout=180) for f in futures]
        assert second == first
        for prompt, ids in zip(prompts, second):
            assert ids == hf_greedy(model, prompt, 24)[: len(ids)]
        assert up.proc.poll() is None, "disagg up must survive a worker that drained"
        assert_decode_pools_full(up)
    finally:
        up.stop()
