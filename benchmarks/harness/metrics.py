"""Serving metrics from client-side request timelines, with no I/O.

A `RequestRecord` is what the load generator saw of one streamed request: when it was sent, when
each chunk that carried tokens arrived and how many tokens it carried, when the stream ended.
Everything else is derived here, with `vllm bench serve`'s definitions and key names:

- TTFT: first token-bearing chunk − send.
- E2E latency (`e2el`): end of stream − send.
- TPOT (per request): (e2el − ttft) / (output tokens − 1); requests with one token have none.
- ITL (per token): each chunk after the first contributes its gap to the previous chunk, shared
  evenly by the tokens it carries (a chunk of k tokens after a gap g gives k values g / k). So
  the ITLs of a request sum to last chunk − first chunk, whatever the server's chunking; tokens
  that came with the first chunk have no ITL.
- Throughputs and goodput are per second of the run's `duration_s` (first send → last end).
  Goodput counts the successful requests that meet every SLO given (`ttft`, `tpot`, `e2el`, ms).

Percentiles are numpy's default (linear interpolation), as vLLM computes them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (90.0, 99.0, 99.9)  # vLLM bench names p99.9 "p99.9_itl_ms"
LATENCIES = ("ttft", "tpot", "itl", "e2el")
SLO_NAMES = ("ttft", "tpot", "e2el")
PREFIX_CACHE_QUERIES = "disagg:prefix_cache_queries_total"  # prompt tokens looked up
PREFIX_CACHE_HITS = "disagg:prefix_cache_hits_total"  # prompt tokens found


@dataclass
class RequestRecord:
    """One request as the client saw it; times are seconds on one monotonic clock."""

    kind: str
    sent_at: float
    prompt_len: int = 0
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    done_at: float | None = None
    output_len: int | None = None  # from the usage chunk when the server sent one
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def success(self) -> bool:
        """Ended cleanly with at least one token."""
        return self.error is None and self.done_at is not None and bool(self.chunk_times)

    @property
    def num_output_tokens(self) -> int:
        return self.output_len if self.output_len is not None else sum(self.chunk_tokens)


def ttft_s(rec: RequestRecord) -> float:
    """Time to the first token-bearing chunk."""
    return rec.chunk_times[0] - rec.sent_at


def e2el_s(rec: RequestRecord) -> float:
    """Send to end of stream."""
    return rec.done_at - rec.sent_at


def tpot_s(rec: RequestRecord) -> float | None:
    """Mean time per output token after the first; None with fewer than two tokens."""
    n = rec.num_output_tokens
    return (e2el_s(rec) - ttft_s(rec)) / (n - 1) if n > 1 else None


def itls_s(rec: RequestRecord) -> list[float]:
    """Per-token inter-token latencies (see the module docstring)."""
    return [itl for _, itl in itl_timeline(rec, 0.0)]


def itl_timeline(rec: RequestRecord, origin: float) -> list[tuple[float, float]]:
    """(arrival time − origin, ITL) for each token with an ITL, for plots over time."""
    points = []
    for j in range(1, len(rec.chunk_times)):
        gap, k = rec.chunk_times[j] - rec.chunk_times[j - 1], rec.chunk_tokens[j]
        points += [(rec.chunk_times[j] - origin, gap / k)] * k
    return points


def meets_slos(rec: RequestRecord, slos_ms: Mapping[str, float]) -> bool:
    """Whether a successful request is within every SLO (a one-token request has TPOT 0)."""
    values = {"ttft": ttft_s(rec), "tpot": tpot_s(rec) or 0.0, "e2el": e2el_s(rec)}
    return all(values[name] * 1e3 <= limit for name, limit in slos_ms.items())


def parse_slos(spec: str | None) -> dict[str, float]:
    """`ttft:500,tpot:50` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for pair in filter(None, (spec or "").split(",")):
        name, sep, value = pair.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_NAMES:
            raise ValueError(f"bad SLO {pair!r}: use NAME:MS with NAME one of {SLO_NAMES}")
        slos[name] = float(value)
        if not slos[name] >= 0:
            raise ValueError(f"SLO {name} must be a non-negative number of ms, got {value}")
    return slos


def distribution_ms(name: str, values_s: Sequence[float]) -> dict[str, float | None]:
    """mean/median/std and PERCENTILES of `values_s`, in ms, under vLLM's key names (None for
    no values, where vLLM would report 0)."""
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"]
    keys += [f"p{_p_word(p)}_{name}_ms" for p in PERCENTILES]
    if not len(values_s):
        return dict.fromkeys(keys)
    arr = np.asarray(values_s, dtype=float) * 1e3
    values = [arr.mean(), np.median(arr), arr.std(), *(np.percentile(arr, p) for p in PERCENTILES)]
    return dict(zip(keys, map(float, values)))


def _p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def run_duration_s(records: Sequence[RequestRecord]) -> float:
    """First send to the last end of stream (or last chunk of a request that failed later)."""
    ends = [r.done_at or (r.chunk_times[-1] if r.chunk_times else r.sent_at) for r in records]
    return max(ends) - min(r.sent_at for r in records) if records else 0.0


def peak_output_rate(records: Iterable[RequestRecord]) -> float:
    """Most output tokens that arrived within one wall-clock second (1 s buckets from start)."""
    recs = list(records)
    if not recs:
        return 0.0
    origin = min(r.sent_at for r in recs)
    buckets: dict[int, int] = {}
    for r in recs:
        for t, k in zip(r.chunk_times, r.chunk_tokens):
            buckets[int(t - origin)] = buckets.get(int(t - origin), 0) + k
    return float(max(buckets.values(), default=0))


def peak_concurrency(records: Iterable[RequestRecord]) -> int:
    """Most requests in flight (sent, stream not ended) at any one time."""
    events = []
    for r in records:
        end = r.done_at if r.done_at is not None else max(r.chunk_times, default=r.sent_at)
        events += [(r.sent_at, 1), (end, -1)]
    level = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        level += step
        peak = max(peak, level)
    return peak


def summarize(
    records: Sequence[RequestRecord],
    slos_ms: Mapping[str, float] | None = None,
    duration_s: float | None = None,
) -> dict[str, float | int | None]:
    """The scalar results of a run, under `vllm bench serve`'s key names where it has one."""
    ok = [r for r in records if r.success]
    duration = duration_s if duration_s is not None else run_duration_s(records)
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.num_output_tokens for r in ok)
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    good = sum(meets_slos(r, slos_ms) for r in ok) if slos_ms else None
    summary: dict[str, float | int | None] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_s(len(ok)),
        "request_goodput": None if good is None else per_s(good),
        "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_in + total_out),
        "max_output_tokens_per_s": peak_output_rate(ok),
        "max_concurrent_requests": peak_concurrency(records),
    }
    return summary | latency_stats(ok)


def latency_stats(ok: Sequence[RequestRecord]) -> dict[str, float | None]:
    """Distributions of TTFT, TPOT, ITL and E2EL over successful requests."""
    tpots = [t for t in map(tpot_s, ok) if t is not None]
    series = {
        "ttft": [ttft_s(r) for r in ok],
        "tpot": tpots,
        "itl": [x for r in ok for x in itls_s(r)],
        "e2el": [e2el_s(r) for r in ok],
    }
    stats: dict[str, float | None] = {}
    for name in LATENCIES:
        stats |= distribution_ms(name, series[name])
    return stats


def per_request(records: Sequence[RequestRecord]) -> dict[str, list]:
    """vLLM's per-request lists (seconds): input/output lengths, TTFTs, ITLs, latencies, starts,
    errors; plus the kind of each request. Failed requests get 0 / [] / their error."""
    origin = min((r.sent_at for r in records), default=0.0)
    ok = [r.success for r in records]
    return {
        "kinds": [r.kind for r in records],
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.num_output_tokens if s else 0 for r, s in zip(records, ok)],
        "ttfts": [ttft_s(r) if s else 0.0 for r, s in zip(records, ok)],
        "itls": [itls_s(r) if s else [] for r, s in zip(records, ok)],
        "latencies": [e2el_s(r) if s else 0.0 for r, s in zip(records, ok)],
        "start_times": [r.sent_at - origin for r in records],
        "errors": [r.error or "" for r in records],
    }


def prometheus_sum(text: str, name: str) -> float | None:
    """The sum of every sample called `name` (any labels) in a Prometheus text exposition;
    None when it has none."""
    from prometheus_client.parser import text_string_to_metric_families

    values = [
        s.value for family in text_string_to_metric_families(text)
        for s in family.samples if s.name == name
    ]  # fmt: skip
    return sum(values) if values else None


def prefix_cache_stats(before: str | None, after: str | None) -> dict[str, float]:
    """Prompt tokens the server looked up in, and found in, its prefix caches between two
    /metrics reads, and the hit rate; empty when it does not export both counters or looked
    nothing up."""
    counts = [
        prometheus_sum(text, name)
        for text in (before, after) if text is not None
        for name in (PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS)
    ]  # fmt: skip
    if len(counts) != 4 or None in counts or not counts[2] > counts[0]:
        return {}
    queried, hit = counts[2] - counts[0], counts[3] - counts[1]
    return {
        "prefix_cache_queried_tokens": queried,
        "prefix_cache_hit_tokens": hit,
        "prefix_cache_hit_rate": hit / queried,
    }


def ratios(base: Mapping[str, object], other: Mapping[str, object]) -> dict[str, float | None]:
    """other / base for every numeric key both have (None where base is 0 or a value is NaN)."""
    out: dict[str, float | None] = {}
    for key, b in base.items():
        o = other.get(key)
        if _is_number(b) and _is_number(o):
            out[key] = o / b if b and math.isfinite(o / b) else None
    return out


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
