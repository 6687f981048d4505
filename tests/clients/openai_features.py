"""The openai SDK, unchanged, for every request feature disagg serves. Run in the clients' venv:
`python openai_features.py BASE_URL MODEL`; prints one JSON row [name, ok, detail] per check."""

from __future__ import annotations

import json
import math
import sys
import urllib.request

import openai


def row(name: str, ok: bool, detail: str = "") -> None:
    print(json.dumps([f"openai SDK: {name}", bool(ok), detail]), flush=True)


def check(name: str, fn) -> None:
    try:
        ok, detail = fn()
    except Exception as err:  # a client error is a failed check, reported, not a crash
        ok, detail = False, f"{type(err).__name__}: {err}"[:160]
    row(name, ok, detail)


def main(base: str, model: str) -> int:
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    prompt = "The market opened at seven and"

    def ids(**kw) -> list[int]:
        extra = {"return_token_ids": True} | kw.pop("extra", {})
        resp = client.completions.create(
            model=model, prompt=prompt, max_tokens=10, extra_body=extra, **kw
        )
        return resp.choices[0].token_ids

    def seeded():
        a = ids(temperature=1.0, seed=7, top_p=0.9)
        b = ids(temperature=1.0, seed=7, top_p=0.9)
        c = ids(temperature=1.0, seed=8, top_p=0.9)
        return a == b and a != c, f"seed 7 twice equal, seed 8 differs: {a != c}"

    def penalties():
        plain = ids(temperature=0, extra={"ignore_eos": True})
        pen = ids(temperature=0, frequency_penalty=2.0, presence_penalty=2.0,
                  extra={"ignore_eos": True, "repetition_penalty": 1.5})  # fmt: skip
        return len(
            pen
        ) == 10, f"repeats {len(plain) - len(set(plain))} -> {len(pen) - len(set(pen))}"

    def logit_bias():
        forced = ids(temperature=0, logit_bias={"65": 100}, extra={"ignore_eos": True})
        return set(forced) == {65}, f"{forced[:4]}..."

    def completion_logprobs():
        resp = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0,
                                         logprobs=3, echo=True)  # fmt: skip
        lp = resp.choices[0].logprobs
        ok = lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
        return ok and len(lp.top_logprobs) == len(lp.tokens), f"{len(lp.tokens)} tokens with echo"

    def chat_logprobs():
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
            temperature=0, logprobs=True, top_logprobs=4,
        )  # fmt: skip
        content = resp.choices[0].logprobs.content
        ok = all(len(c.top_logprobs) == 4 and math.isfinite(c.logprob) for c in content)
        return ok and bool(content), f"{len(content)} tokens, 4 alternatives each"

    def streaming_usage():
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
            temperature=0, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )  # fmt: skip
        chunks = list(stream)
        with_usage = sum(c.usage is not None for c in chunks)
        return with_usage == len(chunks), f"usage on {with_usage}/{len(chunks)} chunks"

    def many_stops():
        resp = client.completions.create(model=model, prompt=prompt, max_tokens=8,
                                         stop=[f"zz{i}" for i in range(10)])  # fmt: skip
        return resp.choices[0].finish_reason in ("stop", "length"), "10 stop strings accepted"

    def n_choices():
        resp = client.completions.create(model=model, prompt=[prompt, "Hello"], max_tokens=4,
                                         n=2, temperature=1.0, seed=3)  # fmt: skip
        idx = [c.index for c in resp.choices]
        return idx == [0, 1, 2, 3], f"2 prompts x n=2: indexes {idx}"

    def tokenize_routes():
        req = urllib.request.Request(base + "/tokenize", json.dumps({"prompt": prompt}).encode(),
                                     {"content-type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as resp:
            tokens = json.loads(resp.read())["tokens"]
        return bool(tokens), f"{len(tokens)} tokens"

    checks = {
        "seeded sampling repeats": seeded,
        "penalties": penalties,
        "logit_bias": logit_bias,
        "completion logprobs + echo": completion_logprobs,
        "chat logprobs + top_logprobs": chat_logprobs,
        "stream continuous_usage_stats": streaming_usage,
        "more than 4 stop strings": many_stops,
        "n and several prompts": n_choices,
        "/tokenize": tokenize_routes,
    }
    for name, fn in checks.items():
        check(name, fn)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
