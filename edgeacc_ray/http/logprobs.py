"""Logprob entries in each API's shape, with token texts decoded one token at a time (like vLLM)."""
from __future__ import annotations

from typing import Any

from edgeacc_ray.engine.outputs import TokenLogprob

FLOOR = -9999.0  # -inf is not JSON


class TokenText:
    """Token id -> its text, cached."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self.cache) < 200_000:
                self.cache[token_id] = text
        return text


def chat_logprobs(logprobs: list[TokenLogprob], token_text: TokenText, top_n: int) -> list[dict[str, Any]]:
    out = []
    for lp in logprobs:
        tok = token_text(lp.token_id)
        out.append({
            "token": tok,
            "logprob": max(lp.logprob, FLOOR),
            "bytes": list(tok.encode("utf-8", "replace")),
            "top_logprobs": [
                {"token": (t := token_text(tid)), "logprob": max(v, FLOOR), "bytes": list(t.encode("utf-8", "replace"))}
                for tid, v in lp.top[:top_n]
            ],
        })
    return out


def completion_logprobs(logprobs: list[TokenLogprob], token_text: TokenText, top_n: int,
                        text_offset: int) -> dict[str, Any]:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for lp in logprobs:
        tok = token_text(lp.token_id)
        tokens.append(tok)
        token_logprobs.append(max(lp.logprob, FLOOR))
        tops.append({token_text(tid): max(v, FLOOR) for tid, v in lp.top[:top_n]} if top_n else None)
        offsets.append(text_offset)
        text_offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def sglang_logprobs(logprobs: list[TokenLogprob], token_text: TokenText | None, top_n: int) -> dict[str, Any]:
    text_of = token_text or (lambda _tid: None)
    return {
        "input_token_logprobs": [],
        "input_top_logprobs": [],
        "output_token_logprobs": [[lp.logprob, lp.token_id, text_of(lp.token_id)] for lp in logprobs],
        "output_top_logprobs": ([[[v, tid, text_of(tid)] for tid, v in lp.top[:top_n]] for lp in logprobs]
                                if top_n else []),
    }
