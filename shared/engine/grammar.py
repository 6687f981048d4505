"""Structured output: the grammars a request's tokens must follow, on xgrammar.

xgrammar was chosen by measurement (`benchmarks/grammar_engines.py`): its per-step masks cost
3-4x less than llguidance's at batch 32 on a 128k vocabulary; its compile is slower, and
compiled grammars are cached here. ``Grammars`` belongs to one worker and its one tokenizer:
it compiles a ``Structured`` once (an LRU keyed by the grammar; the tokenizer is the instance's)
and hands out a fresh matcher per request. ``check`` validates a grammar without a tokenizer
(what the gateway does before any token is generated). xgrammar is imported on first use: a
worker that never sees a structured request never loads it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disagg.shared.protocol.sampling import Structured

MAX_COMPILED = 256  # grammars kept compiled per worker


class GrammarError(ValueError):
    """A grammar that cannot be compiled (a 400 for the request that sent it)."""


# xgrammar (0.2.9; its issue #800, open) lowers a string with minLength/maxLength to a bounded
# repetition of this bare class: it admits raw control characters (invalid JSON) and no escapes.
# Until a release fixes it, such rules get the JSON string character of its own helper rules.
_BOUNDED_CHAR = '(([^\\"\\\\\\r\\n]))'
_JSON_CHAR = '(([^\\0-\\x1f\\"\\\\]) | ("\\\\" basic_escape))'


def grammar_of(structured: Structured):
    """``structured`` as an xgrammar ``Grammar``; GrammarError when it does not parse."""
    import xgrammar as xgr

    try:
        if structured.kind == "json":
            grammar = xgr.Grammar.from_json_schema(structured.spec, any_whitespace=False)
            text = str(grammar)
            if _BOUNDED_CHAR in text and "basic_escape ::=" in text:
                grammar = xgr.Grammar.from_ebnf(text.replace(_BOUNDED_CHAR, _JSON_CHAR))
            return grammar
        if structured.kind == "regex":
            return xgr.Grammar.from_regex(structured.spec)
        return xgr.Grammar.from_ebnf(structured.spec)
    except (RuntimeError, ValueError, TypeError) as err:  # xgrammar raises RuntimeError
        raise GrammarError(_message(err)) from None


def check(structured: Structured) -> None:
    """Raise GrammarError when ``structured`` does not parse (no tokenizer needed)."""
    grammar_of(structured)


def choice_grammar(choices: Collection[str]) -> str:
    """EBNF accepting exactly one of ``choices`` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Grammars:
    """Compiled grammars of one worker's tokenizer, and matchers over them."""

    def __init__(self, tokenizer_file: Path, vocab_size: int, eos_ids: Collection[int]) -> None:
        self.tokenizer_file, self.vocab_size = Path(tokenizer_file), vocab_size
        self.eos_ids = sorted(eos_ids)
        self._compiler = None
        self._compiled: OrderedDict[Structured, Any] = OrderedDict()

    def compile(self, structured: Structured):
        """The compiled grammar (cached); GrammarError when it does not compile."""
        key = structured  # frozen: hashable by (kind, spec)
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        compiler = self._compiler or self._build_compiler()
        grammar = grammar_of(structured)
        try:
            compiled = compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError, TypeError) as err:
            raise GrammarError(_message(err)) from None
        self._compiled[key] = compiled
        while len(self._compiled) > MAX_COMPILED:
            self._compiled.popitem(last=False)
        return compiled

    def matcher(self, structured: Structured):
        """A fresh matcher at the grammar's start (compiles on a cache miss)."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(structured))

    def _build_compiler(self):
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        if not self.tokenizer_file.is_file():
            raise GrammarError(f"structured output needs {self.tokenizer_file}; it is missing")
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(self.tokenizer_file))
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_ids
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler


@dataclass(frozen=True)
class Masks:
    """A step's grammar masks: which logits rows are constrained, and their token bitmask."""

    rows: list[int]
    bitmask: Any  # int32 [batch, ceil(vocab / 32)], xgrammar's layout


def fill_masks(matchers: Sequence, vocab: int) -> Masks | None:
    """The masks of the rows whose matcher (None: free text) has not terminated; None if none.
    Reads the matchers only, so it may run while the forward pass does (``MaskFiller``)."""
    import xgrammar as xgr

    rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
    if not rows:
        return None
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab)
    for row in rows:
        matchers[row].fill_next_token_bitmask(bitmask, row)
    return Masks(rows, bitmask)


def apply_masks(logits, masks: Masks) -> None:
    """Set to -inf, in place, every logit the masks reject."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, masks.bitmask, indices=masks.rows)


class MaskFiller:
    """Fills a step's masks on a thread of its own while the forward pass runs (which
    releases the GIL inside torch's kernels; xgrammar's fill holds it): the matchers only change
    when the step's tokens are sampled, after."""

    TIMEOUT_S = 60.0

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")

    def start(self, matchers: Sequence, vocab: int) -> Future | None:
        if all(m is None for m in matchers):
            return None
        return self._pool.submit(fill_masks, list(matchers), vocab)

    @classmethod
    def result(cls, pending: Future | None) -> Masks | None:
        return None if pending is None else pending.result(timeout=cls.TIMEOUT_S)


def _message(err: Exception) -> str:
    """xgrammar's message without its C++ source location prefix."""
    text = str(err).strip()
    if text.startswith("[") and ": " in text:  # "[14:42:25] /project/cpp/x.cc:94: Regex ..."
        text = text.split(": ", 1)[1]
        if ".cc:" in text.split(" ", 1)[0]:
            text = text.split(": ", 1)[-1]
    return text.splitlines()[0][:500]
