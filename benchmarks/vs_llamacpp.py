"""disagg against llama.cpp (`llama-cpp-python`'s OpenAI server): the same checkpoint, the same
request trace, on the same core, ratios.

1. Sets up llama-cpp-python in its own venv outside the repository (default
   `~/.cache/disagg/llamacpp-venv`): `python3 -m venv`, the local CPU torch (the converter needs
   it), then `llama-cpp-python[server]` built from source (`CMAKE_ARGS=-DGGML_NATIVE=ON`: for
   this CPU's instruction set; the build time is printed) with `gguf` and `transformers`.
2. Converts the checkpoint to GGUF (`--outtype`, default f32: the dtype disagg computes in) with
   llama.cpp's own `convert_hf_to_gguf.py` and `gguf-py`, taken from the llama-cpp-python source
   distribution of the installed version. The converter names a BPE pre-tokenizer by hashing
   what the tokenizer makes of a test text; the tiny checkpoints' tokenizer is unknown to it but
   splits with Qwen2's pattern exactly, so it is told "qwen2".
3. Serves the GGUF with `python -m llama_cpp.server` under `taskset -c CORE` (`--n_threads 1`)
   and disagg with `disagg up --cpus CORE` (default: one aggregated worker): one engine
   computing on one core each; their HTTP front ends are not pinned.
4. Sends the same trace to each, one server at a time, as text prompts (llama-cpp-python takes
   no token ids; both tokenize the same text with the same vocabulary), every special token
   banned by `logit_bias` on both (llama.cpp has no `ignore_eos` and ends at any
   end-of-generation token), and prints every metric as disagg / llama.cpp. Then compares the
   greedy texts of a few prompts, non-streamed, character by character.

llama-cpp-python's server runs one request at a time (no batching of its own): under
concurrency it queues, which is what its users get. Without `return_token_ids` or usage in its
stream, its output tokens are counted one per chunk with text (as vLLM's benchmark counts).
Not run in CI or tests: the install downloads and compiles llama.cpp.
Run from the repository root: `python benchmarks/vs_llamacpp.py [--json PATH]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import tarfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from disagg.benchmarks.harness.checkpoint import bench_checkpoint, cache_root
from disagg.benchmarks.harness.foreign import (
    ServerProcess,
    add_common_args,
    agreement,
    finish,
    make_venv,
    probe,
    report_pair,
    run_logged,
    send,
    venv_python,
)
from disagg.benchmarks.harness.stack import UpProcess
from disagg.benchmarks.harness.workload import WorkloadSpec, make_trace, warmup_trace
from disagg.cli.procs import free_port

PACKAGES = ("llama-cpp-python[server]", "gguf", "transformers>=4.45,<5.25", "sentencepiece")
VERSION_CODE = "import llama_cpp; print(llama_cpp.__version__)"
# Run in the llama venv: llama.cpp's converter, told the tiny tokenizer's pre-tokenizer.
CONVERT = """
import sys
sys.path[:0] = [{src!r}, {gguf_py!r}]
import importlib
import convert_hf_to_gguf as c
modules = [c]
try:  # newer llama.cpp keeps the model classes in conversion/base.py
    modules.append(importlib.import_module("conversion.base"))
except ImportError:
    pass
for module in modules:
    for name in ("TextModel", "Model"):
        cls = getattr(module, name, None)
        if cls is not None and hasattr(cls, "get_vocab_base_pre"):
            cls.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py", *{argv!r}]
c.main()
"""


def ensure_llamacpp(venv: Path) -> str:
    """Build llama-cpp-python into `venv` unless it imports there; returns its version."""
    if version := probe(venv, VERSION_CODE):
        return version
    print(f"building llama-cpp-python into {venv} ...", file=sys.stderr, flush=True)
    pip = make_venv(venv)
    env = os.environ | {"CMAKE_ARGS": "-DGGML_NATIVE=ON", "CMAKE_BUILD_PARALLEL_LEVEL":
                        str(len(os.sched_getaffinity(0)))}  # fmt: skip
    started = time.monotonic()
    run_logged([*pip, "install", "-c", str(venv / "constraints.txt"), *PACKAGES], env=env)
    print(f"llama-cpp-python built and installed in {time.monotonic() - started:.0f} s",
          file=sys.stderr, flush=True)  # fmt: skip
    if not (version := probe(venv, VERSION_CODE)):
        raise RuntimeError(f"llama_cpp does not import in {venv} after the install")
    return version


def converter_sources(venv: Path, version: str, cache: Path) -> Path:
    """The folder of `convert_hf_to_gguf.py` (with `gguf-py/`) of llama-cpp-python `version`,
    from its source distribution."""
    with contextlib.suppress(FileNotFoundError):
        src = _sdist_root(cache, version) / "vendor" / "llama.cpp"
        if (src / "convert_hf_to_gguf.py").is_file():
            return src
    cache.mkdir(parents=True, exist_ok=True)
    pip = [str(venv_python(venv)), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    run_logged([*pip, "-d", str(cache), f"llama-cpp-python=={version}"])
    (sdist,) = cache.glob(f"llama_cpp_python-{version}.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, filter="data")
    return _sdist_root(cache, version) / "vendor" / "llama.cpp"


def _sdist_root(cache: Path, version: str) -> Path:
    for name in (f"llama_cpp_python-{version}", f"llama-cpp-python-{version}"):
        if (cache / name).is_dir():
            return cache / name
    raise FileNotFoundError(f"no unpacked llama-cpp-python {version} under {cache}")


def convert(venv: Path, src: Path, model: Path, outtype: str, out: Path) -> Path:
    if out.is_file():
        return out
    tmp = out.with_suffix(".writing")
    argv = [str(model), "--outtype", outtype, "--outfile", str(tmp)]
    code = CONVERT.format(src=str(src), gguf_py=str(src / "gguf-py"), argv=argv)
    run_logged([str(venv_python(venv)), "-c", code])
    tmp.rename(out)
    return out


class LlamaCppServer(ServerProcess):
    name = "llama.cpp"

    def __init__(self, venv: Path, gguf: Path, core: int, extra: list[str], log: Path) -> None:
        port = free_port()
        argv = ["taskset", "-c", str(core), str(venv_python(venv)), "-m", "llama_cpp.server"]
        argv += ["--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
        # one request at a time, queued (by default a new request interrupts the running one)
        argv += ["--n_threads", "1", "--n_threads_batch", "1", "--interrupt_requests", "False"]
        argv += extra
        super().__init__(argv, dict(os.environ), log, port)


def greedy_texts(base_url: str, prompts: list[str], n: int, extra: dict) -> list[str]:
    out = []
    for prompt in prompts:
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": False} | extra
        request = urllib.request.Request(
            base_url + "/v1/completions", json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=600) as resp:
            out.append(json.loads(resp.read())["choices"][0]["text"])
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "llamacpp-venv", 600.0)
    p.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"))
    p.add_argument("--llamacpp-args", default="--n_ctx 2048 --n_batch 512",
                   help="extra llama_cpp.server flags")  # fmt: skip
    return p.parse_args(argv)


def text_trace(model: Path, spec: WorkloadSpec):
    """The trace and warm-up with text prompts (the ids decoded, their length re-counted)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))

    def as_text(trace):
        out = []
        for req in trace:
            text = tok.decode(list(req.prompt_ids))
            n = len(tok.encode(text).ids)
            out.append(replace(req, prompt_ids=None, prompt_text=text, prompt_len=n))
        return out

    # llama.cpp ends at any end-of-generation token (EOS, <|im_end|>, ...): ban every special one
    added = json.loads((model / "tokenizer.json").read_text()).get("added_tokens") or []
    special = [t["id"] for t in added if t.get("special")]
    return as_text(make_trace(spec)), as_text(warmup_trace(spec, 2)), special


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("taskset") is None:
        raise SystemExit("taskset (util-linux) is needed to pin llama.cpp to --core")
    version = ensure_llamacpp(args.venv)
    model = args.model or bench_checkpoint()
    src = converter_sources(args.venv, version, cache_root() / "llamacpp-src")
    gguf_dir = cache_root() / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    out = gguf_dir / f"{model.name}-{args.outtype}.gguf"
    gguf = convert(args.venv, src, model, args.outtype, out)
    spec = WorkloadSpec(input_len=args.input_len, output_len=args.output_len,
                        num_prompts=args.num_prompts, seed=args.seed)  # fmt: skip
    trace, warmup, special = text_trace(model, spec)
    no_eos = {"logit_bias": {str(t): -100.0 for t in special}}
    plain = no_eos | {"repeat_penalty": 1.0}  # llama-cpp-python's default is 1.1
    prompts = [r.prompt_text for r in trace[:4]]
    print(f"llama-cpp-python {version}; {gguf}; {len(trace)} requests", flush=True)
    up_args = ["--model", str(model), "--cpus", str(args.core), *shlex.split(args.disagg_args)]
    up_args += ["--log-dir", str(args.out_dir / "disagg-logs")]
    with UpProcess(up_args, log=args.out_dir / "disagg-logs" / "up.log") as up:
        ours = send(up.base_url, trace, warmup, args.max_concurrency, no_eos)
        our_texts = greedy_texts(up.base_url, prompts, args.output_len, no_eos)
    log = args.out_dir / "llamacpp-server.log"
    with LlamaCppServer(args.venv, gguf, args.core, shlex.split(args.llamacpp_args), log) as srv:
        srv.wait_ready(args.ready_timeout_s)
        theirs = send(srv.base_url, trace, warmup, args.max_concurrency, plain)
        their_texts = greedy_texts(srv.base_url, prompts, args.output_len, plain)
    # A random model writes bytes that end no character: disagg sends U+FFFD, llama.cpp nothing.
    texts = agreement(*([list(t.replace("\ufffd", "")) for t in side]
                        for side in (our_texts, their_texts)))  # fmt: skip
    return report_results(args, ours, theirs, version, texts)


def report_results(args, ours, theirs, version: str, texts: dict) -> int:
    config = {"llamacpp_version": version}
    title = "disagg vs llama.cpp (CPU, one core each)"
    out = report_pair(args, "llamacpp", ours, theirs, config, title)
    out["greedy_texts"] = texts
    print(f"greedy texts of {texts.get('compared', 0)} prompts, identical: "
          f"{texts.get('identical', 0)}")  # fmt: skip
    return finish(args, out)


if __name__ == "__main__":
    sys.exit(main())
