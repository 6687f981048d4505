"""What validating a wire message costs: disagg's msgspec structs against the same messages
declared as pydantic v2 models, in one run.

For each message on a hot path — `StreamChunk` (every decode step, per request), the KV
`LayerHeader` (every chunk of every layer), a `Heartbeat` with 4096 prefix hashes (every second,
per worker) and an `AdmitRequest` with a 512-token prompt (per request) — it times, as the
median of `--repeats` rounds of `--number` calls each:

- **msgspec**: `codec.encode` / `codec.decode` (product path: msgpack, bounds checked on decode,
  and `encode` validates by decoding: a Struct does not check its bounds when built), and the
  bare msgspec encode for reference;
- **pydantic**: the same bounds as `Field(...)` constraints; encode = `model_dump` + msgpack,
  decode = msgpack + `model_validate` (pydantic has no msgpack of its own), and JSON both ways
  with pydantic's Rust core (`model_dump_json` / `model_validate_json`). A pydantic model
  validates when it is built, so "build+enc" (construct from fields, then encode) is the fair
  sender-side comparison of the two.

Run: `python benchmarks/wire_codec.py [--json PATH]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from disagg.shared.protocol import codec
from disagg.shared.protocol.kv_wire import LayerHeader, parse_header
from disagg.shared.protocol.messages import AdmitRequest, Heartbeat, StreamChunk
from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.protocol.types import ID_PATTERN, MAX_COUNT, MAX_TOKEN_ID, MAX_TOKENS, Role

# -- the same messages as pydantic models (bounds as in shared/protocol) ------------------------

PId = Annotated[str, Field(pattern=ID_PATTERN.replace(r"\Z", "$"))]  # Rust regex: no \Z
PCount = Annotated[int, Field(ge=0, le=MAX_COUNT)]
PTokenIds = Annotated[
    list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]], Field(max_length=MAX_TOKENS)
]
PSeconds = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True)
    v: Literal[1] = 1


class PStreamChunk(_Model):
    request_id: PId
    worker_id: PId
    index: PCount
    token_ids: PTokenIds
    finish_reason: Literal["stop", "length", "abort", "error"] | None
    num_prompt_tokens: PCount
    num_cached_tokens: PCount
    error: dict[str, Any] | None = None


class PLayerHeader(_Model):
    kind: Literal["layer"] = "layer"
    tid: Annotated[str, Field(min_length=1, max_length=64)]
    tok: Annotated[str, Field(min_length=1, max_length=64)]
    layer: Annotated[int, Field(ge=0, le=1024)]
    chunk: Annotated[int, Field(ge=0, le=1 << 24)]
    nchunks: Annotated[int, Field(ge=1, le=1 << 24)]
    first_block: Annotated[int, Field(ge=0, le=1 << 24)]
    nblocks: Annotated[int, Field(ge=1, le=1 << 24)]
    dtype: Literal["float32", "bfloat16", "float16", "int8"]
    shape: Annotated[
        list[Annotated[int, Field(ge=1, le=1 << 20)]], Field(min_length=5, max_length=5)
    ]
    nbytes: Annotated[int, Field(ge=1, le=1 << 40)]
    scales_nbytes: Annotated[int, Field(ge=1, le=1 << 40)] | None = None


class PHeartbeat(_Model):
    worker_id: PId
    role: Literal["prefill", "decode", "both"]
    zmq_address: Annotated[str, Field(max_length=256)]
    model: Annotated[str, Field(min_length=1, max_length=1024)]
    fingerprint: Annotated[str, Field(min_length=1, max_length=128)]
    block_size: Annotated[int, Field(ge=1, le=1 << 16)]
    total_blocks: PCount
    free_blocks: PCount
    running: PCount
    waiting: PCount
    queued_prefill_tokens: PCount
    max_model_len: Annotated[int, Field(ge=1, le=MAX_TOKENS)]
    prefix_hashes: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1 << 16)] = []
    sent_at: PSeconds = 0.0
    draining: bool = False
    prefill_tokens: PCount = 0
    sampled_tokens: PCount = 0
    busy_s: PSeconds = 0.0


class PAdmitRequest(_Model):
    request_id: PId
    gateway_id: PId
    prompt: PTokenIds
    sampling: dict[str, Any]
    prefill_id: PId | None
    wire_dtype: Literal["float32", "bfloat16", "float16", "int8"]
    num_generated: PCount = 0


# -- the sample messages ------------------------------------------------------------------------


def samples() -> dict[str, tuple[Any, type[BaseModel]]]:
    """One realistic instance of each message, and its pydantic twin class."""
    chunk = StreamChunk(
        request_id="req-Xy3k9Qa1b2c3", worker_id="decode-Ab12Cd", index=17, token_ids=[4711],
        finish_reason=None, num_prompt_tokens=512, num_cached_tokens=0,
    )  # fmt: skip
    header = LayerHeader(
        transfer_id="t" * 22, token="k" * 43, layer=11, chunk=0, nchunks=1, first_block=0,
        nblocks=32, dtype="float32", shape=(2, 32, 16, 4, 64), nbytes=2 * 32 * 16 * 4 * 64 * 4,
    )  # fmt: skip
    beat = Heartbeat(
        worker_id="decode-Ab12Cd", role=Role.DECODE, zmq_address="tcp://10.0.0.7:41234",
        model="/models/llama", fingerprint="f" * 64, block_size=16, total_blocks=4096,
        free_blocks=1200, running=24, waiting=3, queued_prefill_tokens=0, max_model_len=8192,
        prefix_hashes=[(i * 0x9E3779B97F4A7C15) % (1 << 63) for i in range(4096)],
        sent_at=time.time(),
    )  # fmt: skip
    admit = AdmitRequest(
        request_id="req-Xy3k9Qa1b2c3", gateway_id="gw-1", prompt=list(range(1000, 1512)),
        sampling=SamplingParams(max_tokens=128, temperature=0.7, top_p=0.9, seed=7),
        prefill_id="prefill-Zz9", wire_dtype="float32",
    )  # fmt: skip
    return {
        "StreamChunk": (chunk, PStreamChunk),
        "LayerHeader": (header, PLayerHeader),
        "Heartbeat(4096 hashes)": (beat, PHeartbeat),
        "AdmitRequest(512 tokens)": (admit, PAdmitRequest),
    }


# -- timing -------------------------------------------------------------------------------------


def per_call_us(fn: Callable[[], object], number: int, repeats: int) -> float:
    """Median over `repeats` rounds of the mean µs per call of `fn` (`number` calls a round)."""
    fn()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        rounds.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(rounds)


def measure(name: str, msg: Any, model: type[BaseModel], number: int, repeats: int) -> dict:
    """µs per encode and per decode of one message, every codec."""
    is_header = isinstance(msg, LayerHeader)
    wire = msg.encode() if is_header else codec.encode(msg)
    as_dict = msgspec.to_builtins(msg)
    twin = model.model_validate(msgspec.msgpack.decode(wire))  # the same content validates
    packed, as_json = msgspec.msgpack.encode(twin.model_dump()), twin.model_dump_json()
    if is_header:
        ms_encode, ms_decode = msg.encode, lambda: parse_header(wire)
    else:
        ms_encode, ms_decode = lambda: codec.encode(msg), lambda: codec.decode(type(msg), wire)
    fields, twin_fields = msgspec.structs.asdict(msg), twin.model_dump()
    if is_header:
        build_encode = lambda: type(msg)(**fields).encode()  # noqa: E731
    else:
        build_encode = lambda: codec.encode(type(msg)(**fields))  # noqa: E731
    timed = {
        "msgspec_build_encode": build_encode,
        "pydantic_build_encode": lambda: msgspec.msgpack.encode(model(**twin_fields).model_dump()),
        "msgspec_encode": ms_encode,
        "msgspec_decode": ms_decode,
        "msgspec_bare_encode": lambda: msgspec.msgpack.encode(msg),
        "pydantic_msgpack_encode": lambda: msgspec.msgpack.encode(twin.model_dump()),
        "pydantic_msgpack_decode": lambda: model.model_validate(msgspec.msgpack.decode(packed)),
        "pydantic_json_encode": twin.model_dump_json,
        "pydantic_json_decode": lambda: model.model_validate_json(as_json),
    }
    row = {k: per_call_us(fn, number, repeats) for k, fn in timed.items()}
    row |= {"bytes_msgpack": len(wire), "bytes_json": len(as_json), "fields": len(as_dict)}
    row["decode_pydantic_over_msgspec"] = row["pydantic_msgpack_decode"] / row["msgspec_decode"]
    row["encode_pydantic_over_msgspec"] = row["pydantic_msgpack_encode"] / row["msgspec_encode"]
    return row


def format_table(rows: dict[str, dict]) -> str:
    cols = [
        ("ms build+enc", "msgspec_build_encode"), ("pyd build+enc", "pydantic_build_encode"),
        ("msgspec enc", "msgspec_encode"), ("msgspec dec", "msgspec_decode"),
        ("pyd enc", "pydantic_msgpack_encode"), ("pyd dec", "pydantic_msgpack_decode"),
        ("pyd json enc", "pydantic_json_encode"), ("pyd json dec", "pydantic_json_decode"),
        ("dec pyd/ms", "decode_pydantic_over_msgspec"),
        ("enc pyd/ms", "encode_pydantic_over_msgspec"),
    ]  # fmt: skip
    lines = [f"{'message (µs per call)':<26}" + "".join(f"{c:>14}" for c, _ in cols)]
    for name, row in rows.items():
        lines.append(f"{name:<26}" + "".join(f"{row[k]:>14.2f}" for _, k in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--number", type=int, default=2000, help="calls per round")
    p.add_argument("--repeats", type=int, default=5, help="rounds (median taken)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    rows = {}
    for name, (msg, model) in samples().items():
        number = max(1, args.number // 10) if "Heartbeat" in name else args.number
        rows[name] = measure(name, msg, model, number, args.repeats)
    print(f"wire codec: msgspec {msgspec.__version__} vs pydantic {pydantic.VERSION}, medians")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
