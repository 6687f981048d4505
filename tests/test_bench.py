"""`disagg bench`: metric math on hand-made timelines, trace determinism, SSE parsing, the JSON
keys, and a short run against a live tiny stack."""

from __future__ import annotations

import asyncio
import io
import json
import math
from pathlib import Path

import httpx
import numpy as np
import pytest

from disagg.benchmarks.harness import client as bench_client
from disagg.benchmarks.harness import compare, metrics, report
from disagg.benchmarks.harness.cli import main_run, with_compare_defaults, workload_spec
from disagg.benchmarks.harness.metrics import RequestRecord
from disagg.benchmarks.harness.stack import UpProcess
from disagg.benchmarks.harness.workload import (
    WorkloadSpec,
    make_trace,
    prefix_groups,
    shared_prefixes,
    warmup_trace,
)
from disagg.cli.main import build_parser


def record(sent, chunks, done, out=None, kind="short", prompt_len=10, error=None):
    """A RequestRecord from (time, tokens) chunk pairs."""
    return RequestRecord(
        kind=kind, sent_at=sent, prompt_len=prompt_len,
        chunk_times=[t for t, _ in chunks], chunk_tokens=[k for _, k in chunks],
        done_at=done, output_len=out, error=error,
    )  # fmt: skip


# -- metrics ----------------------------------------------------------------------------------


def test_request_latencies_from_a_timeline():
    # first token at 0.5 s; then 1 token after 0.2 s; then 2 tokens together after 0.3 s
    rec = record(1.0, [(1.5, 1), (1.7, 1), (2.0, 2)], done=2.1)
    assert rec.num_output_tokens == 4
    assert metrics.ttft_s(rec) == pytest.approx(0.5)
    assert metrics.e2el_s(rec) == pytest.approx(1.1)
    assert metrics.tpot_s(rec) == pytest.approx((1.1 - 0.5) / 3)
    assert metrics.itls_s(rec) == pytest.approx([0.2, 0.15, 0.15])
    assert sum(metrics.itls_s(rec)) == pytest.approx(2.0 - 1.5)
    points = metrics.itl_timeline(rec, origin=1.0)
    assert [x for p in points for x in p] == pytest.approx([0.7, 0.2, 1.0, 0.15, 1.0, 0.15])


def test_usage_count_wins_and_first_chunk_tokens_have_no_itl():
    rec = record(0.0, [(0.4, 3), (0.6, 1)], done=0.6, out=4)
    assert metrics.itls_s(rec) == pytest.approx([0.2])
    assert metrics.tpot_s(rec) == pytest.approx(0.2 / 3)
    one = record(0.0, [(0.3, 1)], done=0.3)
    assert metrics.tpot_s(one) is None and metrics.itls_s(one) == []


def test_distribution_matches_numpy():
    values = np.random.default_rng(0).exponential(0.1, 257).tolist()
    stats = metrics.distribution_ms("itl", values)
    ms = np.asarray(values) * 1e3
    assert stats["mean_itl_ms"] == pytest.approx(ms.mean())
    assert stats["median_itl_ms"] == pytest.approx(np.median(ms))
    assert stats["std_itl_ms"] == pytest.approx(ms.std())
    assert stats["p90_itl_ms"] == pytest.approx(np.percentile(ms, 90))
    assert stats["p99_itl_ms"] == pytest.approx(np.percentile(ms, 99))
    assert stats["p99.9_itl_ms"] == pytest.approx(np.percentile(ms, 99.9))
    assert set(metrics.distribution_ms("itl", []).values()) == {None}


def test_summary_throughput_goodput_and_failures():
    good = record(0.0, [(0.1, 1), (0.2, 1), (0.3, 1)], done=0.3, prompt_len=7)
    slow_first = record(0.5, [(1.5, 1), (1.6, 1)], done=1.6, prompt_len=5)  # TTFT 1000 ms
    slow_decode = record(1.0, [(1.1, 1), (2.1, 1)], done=2.1, prompt_len=5)  # TPOT 1000 ms
    failed = record(1.0, [], done=1.2, error="HTTP 500: boom")
    recs = [good, slow_first, slow_decode, failed]
    s = metrics.summarize(recs, {"ttft": 500, "tpot": 500})
    span = s["duration"]  # computed from the records above: first send -> last end
    assert span == pytest.approx(2.1)
    assert (s["completed"], s["failed"]) == (3, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (17, 7)
    assert s["request_throughput"] == pytest.approx(3 / 2.1)
    assert s["output_throughput"] == pytest.approx(7 / 2.1)
    assert s["total_token_throughput"] == pytest.approx(24 / 2.1)
    assert s["request_goodput"] == pytest.approx(1 / 2.1)
    assert s["max_concurrent_requests"] == 3
    assert s["mean_ttft_ms"] == pytest.approx((100 + 1000 + 100) / 3)
    assert metrics.summarize(recs)["request_goodput"] is None
    assert metrics.summarize(recs, {"e2el": 1200})["request_goodput"] == pytest.approx(3 / 2.1)
    none_ok = metrics.summarize([failed])
    assert none_ok["completed"] == 0 and none_ok["mean_ttft_ms"] is None


def test_parse_slos_and_ratios():
    assert metrics.parse_slos("ttft:500, tpot:50.5") == {"ttft": 500.0, "tpot": 50.5}
    assert metrics.parse_slos(None) == {}
    for bad in ("itl:5", "ttft", "ttft:-1"):
        with pytest.raises(ValueError):
            metrics.parse_slos(bad)
    r = metrics.ratios({"a": 2.0, "b": 0, "c": None, "d": 4}, {"a": 1.0, "b": 3, "c": 1, "d": 2})
    assert r == {"a": 0.5, "b": None, "d": 0.5}


# -- workloads --------------------------------------------------------------------------------


def test_same_seed_same_trace_and_rate_does_not_change_prompts():
    spec = WorkloadSpec(workload="random", num_prompts=20, request_rate=4.0, seed=3)
    assert make_trace(spec) == make_trace(spec)
    other = make_trace(WorkloadSpec(workload="random", num_prompts=20, request_rate=4.0, seed=4))
    assert [r.prompt_ids for r in other] != [r.prompt_ids for r in make_trace(spec)]
    burst = make_trace(WorkloadSpec(workload="random", num_prompts=20, seed=3))
    assert [r.prompt_ids for r in burst] == [r.prompt_ids for r in make_trace(spec)]
    assert all(r.arrival_s == 0 for r in burst)
    arrivals = [r.arrival_s for r in make_trace(spec)]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0 and arrivals[-1] > 0


def test_random_lengths_are_exact_and_in_range():
    spec = WorkloadSpec(workload="random", input_len=100, output_len=40, range_ratio=0.25)
    trace = make_trace(spec)
    assert all(75 <= r.prompt_len <= 125 and 30 <= r.output_len <= 50 for r in trace)
    assert all(len(r.prompt_ids) == r.prompt_len for r in trace)
    assert all(0 <= t < spec.vocab_size for r in trace for t in r.prompt_ids)


def test_mixed_has_short_and_long_and_duration_cuts_the_trace():
    spec = WorkloadSpec(
        workload="mixed", input_len=8, output_len=16, long_input_len=200, long_output_len=2,
        long_every=4, request_rate=10.0, num_prompts=None, duration_s=5.0,
    )  # fmt: skip
    trace = make_trace(spec)
    assert trace and all(r.arrival_s < 5.0 for r in trace)
    kinds = [r.kind for r in trace]
    assert kinds[3] == "long" and kinds[:3] == ["short"] * 3
    assert {(r.kind, r.prompt_len, r.output_len) for r in trace} == {
        ("short", 8, 16),
        ("long", 200, 2),
    }
    warm = warmup_trace(spec, 2)
    assert len(warm) == 2 and all(r.kind == "warmup" and r.prompt_len == 8 for r in warm)


def test_shared_prefix_requests_share_their_groups_prefix_and_nothing_else():
    spec = WorkloadSpec(
        workload="shared-prefix", num_prefixes=3, prefix_len=40, input_len=8, output_len=5,
        num_prompts=12,
    )  # fmt: skip
    trace, prefixes = make_trace(spec), shared_prefixes(spec)
    assert {(r.prompt_len, len(r.prompt_ids), r.output_len) for r in trace} == {(48, 48, 5)}
    for r in trace:
        group = int(r.kind.removeprefix("prefix-"))
        assert r.prompt_ids[:40] == prefixes[group]
    assert len({p[:16] for p in prefixes}) == 3  # distinct from the first KV block on
    assert len({r.prompt_ids[40:] for r in trace}) == 12  # every suffix is the request's own
    assert all(0 <= t < spec.vocab_size for r in trace for t in r.prompt_ids)


def test_shared_prefix_groups_interleave_and_are_fixed_by_the_seed():
    groups = prefix_groups(10, 4, seed=0)
    assert sorted(groups[0:4]) == sorted(groups[4:8]) == [0, 1, 2, 3]
    assert len(set(groups[8:])) == 2
    assert prefix_groups(10, 4, seed=0) == groups and prefix_groups(6, 4, seed=0) == groups[:6]
    assert len({tuple(prefix_groups(8, 4, seed)) for seed in range(5)}) > 1  # order is seeded
    spec = WorkloadSpec(workload="shared-prefix", num_prompts=16, request_rate=4.0, seed=7)
    trace = make_trace(spec)
    assert trace == make_trace(spec)
    assert [r.kind for r in trace] == [f"prefix-{g}" for g in prefix_groups(16, 4, seed=7)]
    burst = make_trace(WorkloadSpec(workload="shared-prefix", num_prompts=16, seed=7))
    assert [r.prompt_ids for r in burst] == [r.prompt_ids for r in trace]
    other = make_trace(WorkloadSpec(workload="shared-prefix", num_prompts=16, seed=8))
    assert {r.prompt_ids[:384] for r in other}.isdisjoint({r.prompt_ids[:384] for r in trace})
    with pytest.raises(ValueError, match="prefix_len"):
        WorkloadSpec(workload="shared-prefix", prefix_len=0)
    with pytest.raises(ValueError, match="num_prefixes"):
        WorkloadSpec(workload="shared-prefix", num_prefixes=0)


class WordTokenizer:
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()]


def test_sharegpt_first_turn_and_reply_length(tmp_path):
    def conv(*turns):
        return {"conversations": [{"from": w, "value": v} for w, v in zip(("human", "gpt"), turns)]}

    convs = [conv("a b c d e", "x " * 6), conv("too short", "y " * 9), conv("only one turn")]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    spec = WorkloadSpec(workload="sharegpt", num_prompts=5, dataset_path=path)
    trace = make_trace(spec, WordTokenizer())
    assert [(r.prompt_text, r.prompt_len, r.output_len) for r in trace] == [("a b c d e", 5, 6)]
    with pytest.raises(ValueError, match="tokenizer"):
        make_trace(spec)


# -- SSE and the client -----------------------------------------------------------------------


def test_parse_sse_lines():
    assert bench_client.parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert bench_client.parse_sse_line("data:[DONE]") == bench_client.DONE
    for other in ("", ": keep-alive", "event: message", "id: 3"):
        assert bench_client.parse_sse_line(other) is None


def test_chunks_fold_into_a_record():
    rec = RequestRecord(kind="short", sent_at=0.0, prompt_len=3)
    chat_role = {"choices": [{"delta": {"role": "assistant", "content": ""}}]}
    bench_client.apply_chunk(rec, chat_role, 0.1)
    bench_client.apply_chunk(rec, {"choices": [{"text": "ab", "token_ids": [5, 6]}]}, 0.2)
    bench_client.apply_chunk(rec, {"choices": [{"text": "c"}]}, 0.3)  # no ids: one token
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}
    bench_client.apply_chunk(rec, usage, 0.4)
    assert (rec.chunk_times, rec.chunk_tokens, rec.token_ids) == ([0.2, 0.3], [2, 1], [5, 6])
    assert (rec.prompt_len, rec.num_output_tokens) == (4, 3)
    bench_client.apply_chunk(rec, {"error": {"message": "worker died"}}, 0.5)
    assert rec.error == "worker died"
    # one chunk per token without ids (llama-cpp-python): an empty text before the end is a
    # token that ends inside a character; the empty closing chunk is none
    assert bench_client.chunk_token_count({"choices": [{"text": "", "finish_reason": None}]}) == 1
    end = {"choices": [{"text": "", "finish_reason": "length"}]}
    assert bench_client.chunk_token_count(end) == 0


def _sse(*objs) -> bytes:
    return b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs)


def _send(handler, body=None):
    async def go():
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport) as c:
            rec = RequestRecord(kind="x", sent_at=0.0)
            return await bench_client.send_request(c, "http://t/v1/completions", body or {}, rec, 5)

    return asyncio.run(go())


def test_send_request_reads_a_stream_and_reports_failures():
    seen = []

    def ok(request):
        seen.append(json.loads(request.content))
        chunks = _sse({"choices": [{"text": "a", "token_ids": [1]}]}, {"choices": [], "usage": {}})
        return httpx.Response(200, content=chunks + b"data: [DONE]\n\n")

    rec = _send(ok, {"prompt": [1, 2]})
    assert rec.success and rec.chunk_tokens == [1] and seen == [{"prompt": [1, 2]}]
    assert rec.sent_at <= rec.chunk_times[0] <= rec.done_at
    busy = _send(lambda r: httpx.Response(429, json={"error": {"message": "full"}}))
    assert not busy.success and busy.error.startswith("HTTP 429")
    cut = _send(lambda r: httpx.Response(200, content=_sse({"choices": [{"text": "a"}]})))
    assert not cut.success and "[DONE]" in cut.error


def test_payloads_are_greedy_exact_length_streams():
    req = make_trace(WorkloadSpec(num_prompts=1, input_len=5, output_len=7))[0]
    body = bench_client.build_payload(req, "m", "completions")
    assert body["prompt"] == list(req.prompt_ids) and body["max_tokens"] == 7
    assert body["temperature"] == 0 and body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["return_token_ids"]
    chat = bench_client.build_payload(req, "m", "chat", detokenize=lambda ids: "hi")
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="tokenizer"):
        bench_client.build_payload(req, "m", "chat")


# -- JSON and compare -------------------------------------------------------------------------

VLLM_KEYS = (
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    "max_output_tokens_per_s", "max_concurrent_requests", "input_lens", "output_lens", "ttfts",
    "itls", "latencies", "start_times", "errors",
    *(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
      for s in ("mean", "median", "std", "p90", "p99")),
)  # fmt: skip


def test_result_document_uses_vllm_key_names(tmp_path):
    recs = [record(0.0, [(0.1, 1), (0.2, 1)], 0.2), record(0.1, [(0.3, 2)], 0.3, kind="long")]
    doc = report.result_document(recs, {"ttft": 150}, {"seed": 0})
    assert set(VLLM_KEYS) <= set(doc)
    assert set(doc["by_kind"]) == {"long", "short"} and doc["by_kind"]["long"]["completed"] == 1
    path = tmp_path / "r.json"
    report.write_json(path, doc)
    assert json.loads(path.read_text())["request_goodput"] == pytest.approx(1 / 0.3)
    both = compare.compare_document({"agg": doc, "disagg": doc})
    assert both["ratios"]["mean_ttft_ms"] == 1.0 and set(both["modes"]) == {"agg", "disagg"}


def test_compare_gives_both_modes_the_same_workers():
    cfg = compare.StackConfig(model="/m", prefill=1, decode=1, cpus="0,1")
    agg, dis = compare.up_args("agg", cfg), compare.up_args("disagg", cfg)
    assert agg[agg.index("--mode") + 1] == "agg" and agg[agg.index("--decode") + 1] == "2"
    assert dis[dis.index("--prefill") + 1] == "1" and dis[dis.index("--decode") + 1] == "1"
    assert agg[agg.index("--cpus") + 1] == dis[dis.index("--cpus") + 1] == "0,1"
    with pytest.raises(ValueError):
        compare.parse_modes("agg,fast")


def test_compare_defaults_depend_on_what_is_compared():
    def parse(*flags):
        return with_compare_defaults(build_parser().parse_args(["bench", "compare", *flags]))

    modes = parse()
    assert (modes.compare, modes.workload, modes.modes, modes.decode) == (
        "modes", "mixed", "agg,disagg", 1,
    )  # fmt: skip
    assert (modes.input_len, modes.output_len) == (32, 64)
    routing = parse("--compare", "routing")
    assert (routing.workload, routing.modes, routing.decode, routing.output_len) == (
        "shared-prefix", "disagg", 2, 16,
    )  # fmt: skip
    spec = workload_spec(routing)
    assert (spec.num_prefixes, spec.prefix_len, spec.input_len, spec.output_len) == (4, 384, 32, 16)
    arrivals = (spec.request_rate, spec.duration_s, spec.num_prompts)  # configured, not timed
    assert arrivals == (1.0, 60.0, None)
    given = parse("--compare", "routing", "--modes", "agg", "--decode", "3", "--output-len", "4")
    assert (given.modes, given.decode, given.output_len) == ("agg", 3, 4)
    flags = ["--workload", "shared-prefix", "--num-prefixes", "2", "--prefix-len", "64"]
    run = build_parser().parse_args(["bench", "run", "--url", "http://x", *flags])
    assert (workload_spec(run).num_prefixes, workload_spec(run).prefix_len) == (2, 64)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "compare", "--compare", "speed"])


def test_routing_compare_runs_one_mode_with_routing_off_then_on():
    off, on = compare.plan_runs("routing", ["disagg"], prefill=1, decode=2)
    assert [(r.label, r.mode) for r in (off, on)] == [
        ("routing-off", "disagg"),
        ("routing-on", "disagg"),
    ]
    base = {"PATH": "/bin", compare.NO_PREFIX_ROUTING_ENV: "1"}
    assert off.env({"PATH": "/bin"}) == base
    assert on.env(base) == {"PATH": "/bin"}  # on even if this shell turned it off
    modes = compare.plan_runs("modes", ["agg", "disagg"], 1, 1)
    assert [(r.label, r.mode) for r in modes] == [("agg", "agg"), ("disagg", "disagg")]
    assert compare.plan_runs("modes", ["agg"], 1, 1)[0].env(base) == base
    assert len(compare.plan_runs("routing", ["agg"], prefill=1, decode=1)) == 2  # 2 agg workers
    with pytest.raises(ValueError, match="choice"):
        compare.plan_runs("routing", ["disagg"], prefill=1, decode=1)
    with pytest.raises(ValueError, match="one mode"):
        compare.plan_runs("routing", ["agg", "disagg"], prefill=1, decode=2)
    cfg = compare.StackConfig(model="/m", prefill=1, decode=2, log_dir=Path("/logs"))
    argv = compare.up_args(off.mode, cfg, off.label)
    assert argv[argv.index("--log-dir") + 1] == "/logs/routing-off"
    assert argv[argv.index("--decode") + 1] == "2"


def test_prefix_cache_hit_rate_from_two_metrics_reads():
    def exposition(queries, hits):
        return (
            "# TYPE disagg:prefix_cache_queries_total counter\n"
            f"disagg:prefix_cache_queries_total {queries}\n"
            "# TYPE disagg:prefix_cache_hits_total counter\n"
            f"disagg:prefix_cache_hits_total {hits}\n"
            'disagg:requests_rejected_total{reason="queue full"} 2.0\n'
        )

    stats = metrics.prefix_cache_stats(exposition(100.0, 10.0), exposition(500.0, 310.0))
    assert stats == {
        "prefix_cache_queried_tokens": 400.0,
        "prefix_cache_hit_tokens": 300.0,
        "prefix_cache_hit_rate": 0.75,
    }
    assert metrics.prometheus_sum(exposition(1, 2), "disagg:requests_rejected_total") == 2.0
    without = "disagg:prompt_tokens_total 5.0\n"
    assert metrics.prefix_cache_stats(without, without) == {}  # not exported: skipped
    assert metrics.prefix_cache_stats(exposition(5, 0), exposition(5, 0)) == {}  # no lookups
    assert metrics.prefix_cache_stats(None, exposition(5, 0)) == {}  # no /metrics


def test_table_shows_the_hit_rate_row_only_when_measured():
    from rich.console import Console

    doc = report.result_document([record(0.0, [(0.1, 1)], 0.1)], {}, {})

    def text(*docs):
        table = report.render_table(dict(zip(("off", "on"), docs)), {}, title="t")
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(table)
        return console.export_text()

    assert "prefix cache hit %" not in text(doc, doc)
    shown = text(doc | {"prefix_cache_hit_rate": 0.25}, doc | {"prefix_cache_hit_rate": 0.5})
    assert "25.0" in shown and "50.0" in shown


# -- live -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_run_against_a_live_stack(checkpoints, tmp_path):
    model = checkpoints(arch="llama")
    up_flags = ["--model", str(model), "--mode", "agg", "--kv-memory-gb", "0.05"]
    with UpProcess([*up_flags, "--block-size", "4"], ready_timeout_s=240) as up:
        argv = ["bench", "run", "--url", up.base_url, "--workload", "mixed", "--num-prompts", "6"]
        argv += ["--input-len", "8", "--output-len", "6", "--long-input-len", "64"]
        argv += ["--long-every", "3", "--request-rate", "20", "--slo", "ttft:60000"]
        argv += ["--json", str(tmp_path / "r.json"), "--plot-dir", str(tmp_path), "--no-progress"]
        assert main_run(build_parser().parse_args(argv)) == 0
    assert up.proc.poll() is not None  # stopped on the way out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert (doc["completed"], doc["failed"]) == (6, 0) and set(VLLM_KEYS) <= set(doc)
    assert doc["output_lens"] == [6, 6, 8, 6, 6, 8] and doc["request_goodput"] > 0
    assert doc["input_lens"] == [8, 8, 64, 8, 8, 64]
    assert all(not math.isnan(doc[k]) for k in ("p99_itl_ms", "p99_ttft_ms"))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "itl-cdf.png",
        "itl-over-time.png",
        "ttft-cdf.png",
    ]


def test_bench_without_its_extra_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    from disagg.benchmarks.harness import cli as bench_cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "rich" else real(name, *a)
    )
    called = []
    command = bench_cli.needs_bench_extra(lambda args: called.append(args) or 0)
    assert command(None) == 2 and not called
    assert "rich not installed; pip install 'disagg[bench]'" in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert command("args") == 0 and called == ["args"]


# -- sweep ------------------------------------------------------------------------------------


def test_attainment_goodput_interpolation_and_slo_scale():
    from disagg.benchmarks.harness import sweep

    fast = record(0.0, [(0.1, 1), (0.2, 1)], 0.2)  # TTFT 100 ms, TPOT 100 ms
    slow = record(0.0, [(0.5, 1), (1.5, 1)], 1.5)  # TTFT 500 ms, TPOT 1000 ms
    failed = RequestRecord(kind="short", sent_at=0.0, error="HTTP 503")
    slos = {"ttft": 200.0, "tpot": 200.0}
    assert sweep.attainment([fast, fast, slow, failed], slos) == 0.5
    assert sweep.attainment([], slos) == 0.0
    # 1.0 at 1 req/s, 0.95 at 2, 0.5 at 4: crosses 90% a ninth of the way from 2 to 4.
    value, bounded = sweep.goodput([(4.0, 0.5), (1.0, 1.0), (2.0, 0.95)])
    assert bounded and value == pytest.approx(2.0 + 0.05 / 0.45 * 2.0)
    assert sweep.goodput([(1.0, 0.95), (2.0, 0.92)]) == (2.0, False)  # at least the top rate
    assert sweep.goodput([(1.0, 0.5), (2.0, 0.1)]) == (0.0, True)
    curve = sweep.slo_scale_curve([fast, slow], slos, scales=(1.0, 5.0))
    assert curve == [{"scale": 1.0, "attainment": 0.5}, {"scale": 5.0, "attainment": 1.0}]
    docs = {m: sweep.mode_document({1.0: [fast], 2.0: [fast, slow]}, slos, 2.0)
            for m in ("agg", "disagg")}  # fmt: skip
    out = sweep.sweep_document(docs, slos, {})
    assert out["modes"]["agg"]["rates"][1] == {"rate": 2.0, "attainment": 0.5, "requests": 2,
                                               "completed": 2}  # fmt: skip
    assert out["goodput_ratio_disagg_over_agg"] == 1.0
    with pytest.raises(ValueError, match="two or more"):
        sweep.parse_rates("1")


@pytest.mark.slow
def test_bench_sweep_runs_both_modes_over_a_ladder(checkpoints, tmp_path):
    from disagg.benchmarks.harness.sweep import main_sweep

    argv = ["bench", "sweep", "--model", str(checkpoints(arch="llama")), "--rates", "2,6",
            "--duration-s", "3", "--input-len", "8", "--output-len", "6", "--long-input-len",
            "48", "--slo", "ttft:60000,tpot:60000", "--kv-memory-gb", "0.05",
            "--json", str(tmp_path / "s.json"), "--out-dir", str(tmp_path),
            "--no-progress"]  # fmt: skip
    assert main_sweep(build_parser().parse_args(argv)) == 0
    doc = json.loads((tmp_path / "s.json").read_text())
    assert set(doc["modes"]) == {"agg", "disagg"} and doc["slos_ms"]["ttft"] == 60000
    for mode in doc["modes"].values():
        assert [p["rate"] for p in mode["rates"]] == [2.0, 6.0]
        assert all(p["requests"] > 0 and p["attainment"] == 1.0 for p in mode["rates"])
        assert (mode["goodput_rps"], mode["goodput_bounded"]) == (6.0, False)  # at least
        assert mode["slo_scale"]["rate"] == 6.0 and len(mode["slo_scale"]["points"]) == 7
    assert doc["goodput_ratio_disagg_over_agg"] == 1.0
    assert {p.name for p in tmp_path.glob("sweep-*.png")} == {
        "sweep-attainment-vs-rate.png", "sweep-attainment-vs-slo-scale.png",
    }  # fmt: skip


def test_phased_trace_phases_late_changes_and_the_verdict():
    from disagg.benchmarks.harness import phased

    phases = phased.plan_phases(["prompts", "outputs"], 20.0)
    assert [(p.kind, p.start_s, p.end_s) for p in phases] == [
        ("prompts", 0.0, 20.0), ("outputs", 20.0, 40.0),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="--phases"):
        phased.plan_phases(["prompts", "bursts"], 20.0)
    load = phased.PhaseLoad({"prompts": 100, "outputs": 4}, {"prompts": 2, "outputs": 50},
                            {"prompts": 2.0, "outputs": 3.0})  # fmt: skip
    trace = phased.phased_trace(phases, load, seed=1, vocab_size=256)
    assert trace == phased.phased_trace(phases, load, seed=1, vocab_size=256)
    first = [r for r in trace if r.kind == "prompts"]
    second = [r for r in trace if r.kind == "outputs"]
    assert all(r.arrival_s < 20 and (r.prompt_len, r.output_len) == (100, 2) for r in first)
    assert all(20 <= r.arrival_s < 40 and (r.prompt_len, r.output_len) == (4, 50) for r in second)
    assert [r.index for r in trace] == list(range(len(trace)))
    assert 20 < len(first) < 60 and 30 < len(second) < 90  # ~40 and ~60 Poisson arrivals
    # A switch at 4 s is early in phase 0; one at 30 s is in the last 15 s of phase 1.
    timeline = {"w0": [(0.0, "decode"), (4.0, "switching"), (4.5, "both")],
                "w1": [(0.0, "prefill"), (30.0, "switching"), (31.0, "both")]}  # fmt: skip
    assert phased.late_changes(timeline, phases, 15.0) == {"0:prompts": 0, "1:outputs": 2}
    ok = record(0.0, [(0.1, 1), (0.2, 1)], 0.2)
    slow = record(25.0, [(30.0, 1), (30.1, 1)], 30.1)
    lost = record(26.0, [], None, error="HTTP 503")
    doc = phased.config_document([ok, slow, lost], 0.0, phases, {"ttft": 1000}, timeline, 15.0)
    assert doc["attainment"] == pytest.approx(1 / 3) and doc["failed"] == 1
    assert doc["phases"]["0:prompts"]["attainment"] == 1.0
    second_phase = doc["phases"]["1:outputs"]
    assert (second_phase["attainment"], second_phase["requests"], second_phase["failed"]) == (
        0.0, 2, 1,
    )  # fmt: skip
    assert second_phase["median_ttft_ms"] == pytest.approx(5000.0)  # the one that completed
    docs = {"1p1d": {"attainment": 0.6}, "2agg": {"attainment": 0.8},
            "autoscale": doc | {"attainment": 0.85}}  # fmt: skip
    v = phased.verdict(docs)
    assert (v["best_fixed"], v["autoscale_at_least_best_fixed"]) == ("2agg", True)
    assert v["autoscale_late_role_changes"] == 2


def test_bench_phased_runs_fixed_splits_and_the_autoscaler(checkpoints, tmp_path):
    from disagg.benchmarks.harness.phased import main_phased

    argv = ["bench", "phased", "--model", str(checkpoints(arch="llama")), "--phase-s", "3",
            "--configs", "1p1agg,autoscale", "--long-prompt-len", "40", "--long-output-len",
            "8", "--prompts-rate", "3", "--outputs-rate", "3", "--slo", "ttft:60000,tpot:60000",
            "--kv-memory-gb", "0.05", "--json", str(tmp_path / "p.json"),
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert main_phased(build_parser().parse_args(argv)) == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    assert list(doc["configs"]) == ["1p1agg", "autoscale"]
    for label, roles in (("1p1agg", ["both", "prefill"]), ("autoscale", ["decode", "prefill"])):
        run = doc["configs"][label]
        assert run["failed"] == 0 and run["attainment"] == 1.0
        assert "other_cpu_share" in run  # how much of the machine others took meanwhile
        assert set(run["phases"]) >= {"0:prompts", "1:outputs"}
        assert sorted(changes[0][1] for changes in run["roles"].values()) == roles
    assert doc["verdict"]["autoscale_at_least_best_fixed"]
    assert (tmp_path / "phased-roles.png").stat().st_size > 0
