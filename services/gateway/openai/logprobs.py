"""OpenAI's logprobs blocks from the workers' per-token ``Logprob``s.

Completions use the legacy block (``tokens``, ``token_logprobs``, ``top_logprobs`` as
{token: logprob} maps that also hold the sampled token, ``text_offset``); chat uses ``content``:
[{token, logprob, bytes, top_logprobs}]. Values are log-softmax of the raw logits, before
temperature, penalties and masks (vLLM's default); -inf is written as -9999.0, as vLLM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from disagg.shared.protocol.sampling import Logprob

FLOOR = -9999.0


class TokenSource(Protocol):
    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...


class LogprobFormatter:
    """One request's logprobs blocks, chunk by chunk (``text_offset`` runs across chunks)."""

    def __init__(self, tokenizer: TokenSource, kind: str, text_offset: int = 0) -> None:
        self.tokenizer, self.kind, self.offset = tokenizer, kind, text_offset

    def block(self, ids: Sequence[int], logprobs: Sequence[Logprob]) -> dict[str, Any]:
        """The block for these tokens (as many logprobs as ids)."""
        if self.kind == "chat":
            return {"content": [self._chat_entry(t, lp) for t, lp in zip(ids, logprobs)]}
        tokens = [self.token(t) for t in ids]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [_value(lp.logprob) for lp in logprobs],
            "top_logprobs": [self._top_map(t, lp) for t, lp in zip(ids, logprobs)],
            "text_offset": offsets,
        }

    def prompt_block(self, prompt_ids: Sequence[int], logprobs: Sequence[Logprob], n: int):
        """The legacy block of an echoed prompt: its first token has no logprob (null)."""
        tokens = [self.token(t) for t in prompt_ids]
        offsets, offset = [], 0
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [None] + [_value(lp.logprob) for lp in logprobs],
            "top_logprobs": [None]
            + [self._top_map(t, lp, n) for t, lp in zip(prompt_ids[1:], logprobs)],
            "text_offset": offsets,
        }

    def vllm_prompt(
        self, prompt_ids: Sequence[int], logprobs: Sequence[Logprob], n: int
    ) -> list[dict[str, Any] | None]:
        """vLLM's `prompt_logprobs`: null, then per token {id: {logprob, rank, decoded_token}}
        for the token and the top `n`."""
        out: list[dict[str, Any] | None] = [None]
        for token, lp in zip(prompt_ids[1:], logprobs):
            entry = {str(t): self._vllm(t, v, rank) for rank, (t, v) in enumerate(lp.top[:n], 1)}
            entry[str(token)] = self._vllm(token, lp.logprob, lp.rank)
            out.append(entry)
        return out

    def _vllm(self, token_id: int, value: float, rank: int | None) -> dict[str, Any]:
        return {"logprob": _value(value), "rank": rank, "decoded_token": self.token(token_id)}

    def token(self, token_id: int) -> str:
        """A token's text; one that is part of a character is written as its bytes (vLLM)."""
        raw = self.tokenizer.token_bytes(token_id)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _top_map(self, token_id: int, lp: Logprob, n: int | None = None) -> dict[str, float]:
        top = {self.token(t): _value(v) for t, v in lp.top[:n]}
        top.setdefault(self.token(token_id), _value(lp.logprob))
        return top

    def _chat_entry(self, token_id: int, lp: Logprob) -> dict[str, Any]:
        entry = self._chat_token(token_id, lp.logprob)
        entry["top_logprobs"] = [self._chat_token(t, v) for t, v in lp.top]
        return entry

    def _chat_token(self, token_id: int, value: float) -> dict[str, Any]:
        raw = self.tokenizer.token_bytes(token_id)
        return {"token": self.token(token_id), "logprob": _value(value), "bytes": list(raw)}


def merge(blocks: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """One block from several (a whole response from its chunks' blocks)."""
    if not blocks:
        return None
    merged: dict[str, list] = {key: [] for key in blocks[0]}
    for block in blocks:
        for key, values in block.items():
            merged[key].extend(values)
    return merged


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)
