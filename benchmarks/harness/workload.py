"""Request traces: what to send and when, fixed by a seed so two runs send the same requests.

Workloads:

- `fixed`: every prompt `input_len` token ids, every output `output_len` tokens.
- `random`: lengths uniform in [L(1 - r), L(1 + r)] for L = input/output len, r = `range_ratio`
  (vLLM's random dataset).
- `sharegpt`: a ShareGPT JSON file; the first human turn is the prompt and the length of the
  first reply (in the model's tokens) the output length, shuffled by the seed and filtered as
  vLLM's benchmark does (prompt and reply >= 4 tokens, prompt <= 1024, both <= 2048).
- `mixed`: the interference case. Short decode-heavy requests (`input_len` in, `output_len` out)
  with every `long_every`-th request a long prompt (`long_input_len` in, `long_output_len` out)
  arriving into them.
- `shared-prefix`: the prefix-cache case, as a system prompt or few-shot examples shared by many
  requests. `num_prefixes` groups, each with its own prefix of `prefix_len` ids; a request is its
  group's prefix followed by `input_len` ids of its own (vLLM's random `--random-prefix-len`,
  one prefix per group), `output_len` out. Groups interleave in arrival order: each run of
  `num_prefixes` requests (0.., then `num_prefixes`.., ...) has every group once, in a seeded
  order. The kind of a request is `prefix-<group>`.

Prompts are lists of token ids drawn from [0, `vocab_size`), so their length is exact (the
gateway takes a list of ids as `prompt`); the default 256 is valid for every tokenizer disagg
loads. Arrivals are a Poisson process of `request_rate` per second (all at 0 when infinite);
lengths and arrivals come from separate streams of the seed (as do the shared prefixes and the
group order), so changing the rate does not change the prompts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

WORKLOADS = ("fixed", "random", "sharegpt", "mixed", "shared-prefix")
LENGTHS = ("input_len", "output_len", "long_input_len", "long_output_len", "prefix_len")
SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048


class TextTokenizer(Protocol):
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: its arrival offset, prompt (ids, text or both) and lengths."""

    index: int
    kind: str
    arrival_s: float
    prompt_len: int
    output_len: int
    prompt_ids: tuple[int, ...] | None = None
    prompt_text: str | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that decides a trace; the same spec always gives the same trace."""

    workload: str = "fixed"
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.5
    long_input_len: int = 512
    long_output_len: int = 8
    long_every: int = 8
    prefix_len: int = 384
    num_prefixes: int = 4
    vocab_size: int = 256
    request_rate: float = math.inf
    num_prompts: int | None = 32
    duration_s: float | None = None
    seed: int = 0
    dataset_path: Path | None = None

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {self.workload!r}")
        for name in LENGTHS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.long_every, self.num_prefixes, self.vocab_size) < 1:
            raise ValueError("long_every, num_prefixes and vocab_size must be >= 1")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf: at once), got {self.request_rate}")
        self._check_bounds()

    def _check_bounds(self) -> None:
        if self.num_prompts is None and self.duration_s is None:
            raise ValueError("give num_prompts or duration_s (every run is bounded)")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be positive, got {self.duration_s}")
        if self.workload == "sharegpt" and self.dataset_path is None:
            raise ValueError("the sharegpt workload needs a dataset path")

    @property
    def max_requests(self) -> int:
        """Trace length cap: num_prompts, else what the duration can hold (closed loop: 10k)."""
        if self.num_prompts is not None:
            return self.num_prompts
        if math.isinf(self.request_rate):
            return 10_000
        return int(self.duration_s * self.request_rate * 4) + 16


def make_trace(spec: WorkloadSpec, tokenizer: TextTokenizer | None = None) -> list[TraceRequest]:
    """The trace of `spec`: requests in arrival order, cut at num_prompts or duration_s."""
    rng = np.random.default_rng([spec.seed, 0])
    arrivals = arrival_times(spec.request_rate, spec.max_requests, spec.seed)
    if spec.duration_s is not None and not math.isinf(spec.request_rate):
        arrivals = [t for t in arrivals if t < spec.duration_s]
    if spec.workload == "sharegpt":
        if tokenizer is None:
            raise ValueError("the sharegpt workload needs the model's tokenizer (--tokenizer)")
        return _sharegpt_trace(spec, arrivals, tokenizer, rng)
    trace = [_synthetic(spec, i, t, rng) for i, t in enumerate(arrivals)]
    return _add_shared_prefixes(spec, trace) if spec.workload == "shared-prefix" else trace


def warmup_trace(spec: WorkloadSpec, n: int, output_len: int = 4) -> list[TraceRequest]:
    """`n` short requests (`input_len` ids, `output_len` out) to send before measuring; drawn
    from their own stream of the seed, so they do not change the trace."""
    rng = np.random.default_rng([spec.seed, 2])
    return [
        TraceRequest(-1 - i, "warmup", 0.0, spec.input_len, output_len,
                     prompt_ids=tuple(rng.integers(0, spec.vocab_size, spec.input_len).tolist()))
        for i in range(n)
    ]  # fmt: skip


def arrival_times(rate: float, n: int, seed: int) -> list[float]:
    """n Poisson arrival offsets (exponential gaps, mean 1/rate); all 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng([seed, 1]).exponential(1.0 / rate, n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()


def _synthetic(spec: WorkloadSpec, index: int, arrival: float, rng) -> TraceRequest:
    kind, n_in, n_out = spec.workload, spec.input_len, spec.output_len
    if spec.workload == "random":
        n_in, n_out = _spread(n_in, spec.range_ratio, rng), _spread(n_out, spec.range_ratio, rng)
    elif spec.workload == "mixed":
        long = index % spec.long_every == spec.long_every - 1
        kind = "long" if long else "short"
        if long:
            n_in, n_out = spec.long_input_len, spec.long_output_len
    ids = tuple(rng.integers(0, spec.vocab_size, n_in).tolist())
    return TraceRequest(index, kind, arrival, n_in, n_out, prompt_ids=ids)


def shared_prefixes(spec: WorkloadSpec) -> list[tuple[int, ...]]:
    """The `num_prefixes` prefixes of `prefix_len` ids, from their own stream of the seed."""
    rng = np.random.default_rng([spec.seed, 3])
    return [
        tuple(rng.integers(0, spec.vocab_size, spec.prefix_len).tolist())
        for _ in range(spec.num_prefixes)
    ]


def prefix_groups(n: int, num_prefixes: int, seed: int) -> list[int]:
    """The group of each of `n` requests: every aligned run of `num_prefixes` requests holds
    each group once, in an order drawn from its own stream of the seed (the first groups do not
    depend on `n`)."""
    rng = np.random.default_rng([seed, 4])
    runs = [rng.permutation(num_prefixes) for _ in range(-(-n // num_prefixes))]
    return [int(g) for run in runs for g in run][:n]


def _add_shared_prefixes(spec: WorkloadSpec, trace: list[TraceRequest]) -> list[TraceRequest]:
    """Put its group's prefix in front of each request's own ids."""
    prefixes = shared_prefixes(spec)
    groups = prefix_groups(len(trace), spec.num_prefixes, spec.seed)
    return [
        replace(r, kind=f"prefix-{g}", prompt_len=spec.prefix_len + r.prompt_len,
                prompt_ids=prefixes[g] + r.prompt_ids)
        for r, g in zip(trace, groups)
    ]  # fmt: skip


def _spread(center: int, ratio: float, rng) -> int:
    lo, hi = max(1, int(center * (1 - ratio))), max(1, int(center * (1 + ratio)))
    return int(rng.integers(lo, hi + 1))


def load_sharegpt(path: Path) -> list[tuple[str, str]]:
    """(first human turn, first reply) of every conversation with at least two turns."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    pairs = []
    for item in data:
        turns = item.get("conversations") or item.get("conversation") or []
        if len(turns) >= 2:
            pairs.append((_turn_text(turns[0]), _turn_text(turns[1])))
    return pairs


def _turn_text(turn: dict[str, Any]) -> str:
    return str(turn.get("value", turn.get("content", "")))


def _sharegpt_trace(
    spec: WorkloadSpec, arrivals: list[float], tokenizer: TextTokenizer, rng
) -> list[TraceRequest]:
    pairs = load_sharegpt(spec.dataset_path)
    order = rng.permutation(len(pairs))
    trace: list[TraceRequest] = []
    for k in order:
        if len(trace) == len(arrivals):
            break
        prompt, reply = pairs[int(k)]
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        n_out = len(tokenizer.encode(reply, add_special_tokens=False))
        if _sharegpt_keeps(len(ids), n_out):
            i = len(trace)
            trace.append(
                TraceRequest(i, "sharegpt", arrivals[i], len(ids), n_out, tuple(ids), prompt)
            )
    if not trace:
        raise ValueError(f"{spec.dataset_path}: no conversation passes the length filter")
    return trace


def _sharegpt_keeps(prompt_len: int, output_len: int) -> bool:
    if prompt_len < SHAREGPT_MIN_LEN or output_len < SHAREGPT_MIN_LEN:
        return False
    return prompt_len <= SHAREGPT_MAX_PROMPT and prompt_len + output_len <= SHAREGPT_MAX_TOTAL
