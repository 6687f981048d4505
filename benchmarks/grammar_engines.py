"""Structured-output engines on this CPU: xgrammar against llguidance (issue 15 picks by this).

For each vocabulary size (`--vocab`, byte-level BPE tokenizers trained here on a synthetic
corpus of words, numbers and JSON, cached under ~/.cache/disagg/bench/) and each engine:

- **setup**: the one-time tokenizer preprocessing a worker does at start;
- **compile**: turning a realistic JSON schema (nested objects, arrays, enums, bounded numbers,
  required fields, `additionalProperties: false`) into the engine's grammar, cache off;
- **first mask**: the first next-token bitmask (engines that compile lazily pay here);
- **mask per step** at batch 1 and at batch `--batch`: filling every row's bitmask once, as a
  decode step would, over `--steps` steps of a random walk through tokens the mask allows
  (each engine's own batched call: xgrammar `BatchGrammarMatcher`, llguidance
  `fill_next_token_bitmask_par`, with `--threads` threads).

Not a dependency of disagg: install both into the environment that runs it
(`pip install -c constraints.txt xgrammar llguidance`, torch first). Run:
`python benchmarks/grammar_engines.py [--vocab 32000,128000] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import numpy as np

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "name", "status", "items", "owner"],
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 10_000_000},
        "name": {"type": "string", "minLength": 1, "maxLength": 64},
        "status": {"enum": ["open", "closed", "pending", "archived"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "owner": {
            "type": "object",
            "additionalProperties": False,
            "required": ["login", "admin"],
            "properties": {
                "login": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,15}$"},
                "admin": {"type": "boolean"},
                "email": {"type": "string"},
            },
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["sku", "qty"],
                "properties": {
                    "sku": {"type": "string"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 999},
                    "price": {"type": "number", "minimum": 0},
                },
            },
        },
    },
}
EOS = "<|endoftext|>"


def corpus(n_words: int, seed: int = 0):
    """Synthetic text with a long tail of word forms, numbers, and JSON punctuation."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lexicon = ["".join(rng.choices(letters, k=rng.randint(2, 12))) for _ in range(400_000)]
    weights = [1.0 / (i + 1) ** 0.8 for i in range(len(lexicon))]
    for _ in range(n_words // 1000):
        words = rng.choices(lexicon, weights, k=1000)
        parts = []
        for w in words:
            r = rng.random()
            if r < 0.05:
                parts.append(str(rng.randint(0, 100_000)))
            elif r < 0.10:
                parts.append(f'{{"{w}": "{rng.choice(lexicon)}", "n": {rng.randint(0, 99)}}}')
            elif r < 0.15:
                parts.append(w.capitalize() + rng.choice([".", ",", ":", ";"]))
            else:
                parts.append(w)
        yield " ".join(parts)


def tokenizer_for(vocab: int, cache: Path):
    """A byte-level BPE tokenizer of `vocab` tokens (trained once, then loaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = cache / f"bpe-{vocab}.json"
    if not path.is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=[EOS], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )  # fmt: skip
        tok.train_from_iterator(corpus(max(2_000_000, vocab * 40)), trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS)


def allowed(bitmask_row: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, hf, vocab: int, threads: int) -> None:
        import xgrammar as xgr

        self.xgr, self.vocab = xgr, vocab
        start = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
        self.setup_s = time.perf_counter() - start
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self.batcher = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema: str):
        return self.compiler.compile_json_schema(schema)

    def matchers(self, grammar, n: int) -> list:
        return [self.xgr.GrammarMatcher(grammar) for _ in range(n)]

    def bitmask(self, n: int) -> np.ndarray:
        return self.xgr.allocate_token_bitmask(n, self.vocab).numpy()

    def fill(self, matchers, bitmask) -> None:
        import torch

        view = torch.from_numpy(bitmask)
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(view, 0)
        else:
            self.batcher.batch_fill_next_token_bitmask(matchers, view)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token) and not matcher.is_terminated()


class Llguidance:
    name = "llguidance"

    def __init__(self, hf, vocab: int, threads: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        self.llg, self.vocab = llguidance, vocab
        start = time.perf_counter()
        self.tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
        self.setup_s = time.perf_counter() - start
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def compile(self, schema: str):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        return self.llg.LLMatcher(self.tokenizer, grammar)  # checks it; masks are lazy

    def matchers(self, grammar, n: int) -> list:
        return [grammar.deep_copy() for _ in range(n)]

    def bitmask(self, n: int) -> np.ndarray:
        return self.llg.numpy.allocate_token_bitmask(n, self.vocab)

    def fill(self, matchers, bitmask) -> None:
        if len(matchers) == 1:
            self.llg.numpy.fill_next_token_bitmask(matchers[0], bitmask, 0)
        else:
            pairs = [(m, i) for i, m in enumerate(matchers)]
            self.llg.numpy.fill_next_token_bitmask_par(self.executor, pairs, bitmask)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token) and not matcher.is_stopped()


def measure(engine, schema: str, batch: int, steps: int, seed: int) -> dict:
    start = time.perf_counter()
    grammar = engine.compile(schema)
    compile_ms = (time.perf_counter() - start) * 1e3
    out = {"engine": engine.name, "vocab": engine.vocab, "setup_s": engine.setup_s,
           "compile_ms": compile_ms}  # fmt: skip
    for n in (1, batch):
        rng = np.random.default_rng(seed)
        matchers, bitmask = engine.matchers(grammar, n), engine.bitmask(n)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            engine.fill(matchers, bitmask)
            times.append(time.perf_counter() - start)
            for i, m in enumerate(matchers):  # a random walk the grammar allows
                ok = allowed(bitmask[i], engine.vocab)
                if len(ok) == 0 or not engine.accept(m, int(rng.choice(ok))):
                    matchers[i] = engine.matchers(grammar, 1)[0]
        if n == 1:
            out["first_mask_ms"] = times[0] * 1e3
        out[f"mask_batch{n}_us_median"] = statistics.median(times[1:]) * 1e6
        out[f"mask_batch{n}_us_p90"] = float(np.percentile(times[1:], 90)) * 1e6
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", default="32000,128000", help="comma list of vocabulary sizes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "disagg" / "bench"
    schema, rows = json.dumps(SCHEMA), []
    for vocab in (int(v) for v in args.vocab.split(",")):
        hf = tokenizer_for(vocab, cache)
        vocab = len(hf)  # what training reached (a small corpus may fall short)
        for cls in (Xgrammar, Llguidance):
            rows.append(measure(cls(hf, vocab, args.threads), schema, args.batch, args.steps,
                                args.seed))  # fmt: skip
    b = args.batch
    print(f"grammar engines, {args.threads} thread(s), batch 1 and {b}, {args.steps} steps")
    print(f"{'engine':>10} {'vocab':>7} {'setup s':>8} {'compile ms':>11} {'1st mask ms':>12} "
          f"{'mask b1 us':>11} {f'mask b{b} us':>12} {f'b{b} p90 us':>11}")  # fmt: skip
    for r in rows:
        batched = f"{r[f'mask_batch{b}_us_median']:>12.0f} {r[f'mask_batch{b}_us_p90']:>11.0f}"
        print(
            f"{r['engine']:>10} {r['vocab']:>7} {r['setup_s']:>8.2f} {r['compile_ms']:>11.1f} "
            f"{r['first_mask_ms']:>12.2f} {r['mask_batch1_us_median']:>11.0f} {batched}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "threads": args.threads}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
