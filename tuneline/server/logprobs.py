"""Logprobs in the hosted shape: what the decoder notes about each chosen token (tuneline/server/
modeling.py) as `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`.

`bytes` are the token's own bytes, which a token that splits a UTF-8 character needs (its text alone
would be a replacement character): byte-level BPE pieces are mapped back through GPT-2's byte alphabet
(transformers' bytes_to_unicode), SentencePiece byte tokens (`<0xE2>`) are their byte, any other token
is its decoded text. tokenizers offers no per-token bytes, so this small mapping is written here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

# What the decoder notes about one chosen token when asked: (token id, its logprob, the ids and logprobs
# of the likeliest tokens at that position, best first).
Scored = tuple[int, float, list[int], list[float]]


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: the printable character standing for each byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer: Any, token: int, memo: dict[int, bytes]) -> bytes:
    """The bytes a token stands for (memoised in `memo`)."""
    if token not in memo:
        text = tokenizer.decode([token])
        raw = text.encode("utf-8")
        if "\ufffd" in text:
            piece = tokenizer.convert_ids_to_tokens(token)
            if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                raw = bytes([int(piece[3:5], 16)])
            elif isinstance(piece, str) and all(c in _unicode_to_byte() for c in piece):
                raw = bytes(_unicode_to_byte()[c] for c in piece)
        memo[token] = raw
    return memo[token]


def hosted_logprobs(
    tokenizer: Any, scores: Sequence[Scored], top: int, memo: dict[int, bytes]
) -> list[dict[str, Any]]:
    """One entry per scored token, with its `top` likeliest alternatives."""

    def described(token: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(tokenizer, token, memo)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return [
        {
            **described(token, logprob),
            "top_logprobs": [described(i, v) for i, v in zip(ids[:top], values[:top], strict=True)],
        }
        for token, logprob, ids, values in scores
    ]
