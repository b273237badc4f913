"""Logprob entries in each API's shape, with token texts decoded one token at a time (like vLLM)."""

from __future__ import annotations

from typing import Any

from edgeacc_ray.engine.request import TokenLogprob

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


def chat_logprobs(
    logprobs: list[TokenLogprob], token_text: TokenText, top_n: int
) -> list[dict[str, Any]]:
    out = []
    for lp in logprobs:
        tok = token_text(lp.token_id)
        out.append(
            {
                "token": tok,
                "logprob": max(lp.logprob, FLOOR),
                "bytes": list(tok.encode("utf-8", "replace")),
                "top_logprobs": [
                    {
                        "token": (t := token_text(tid)),
                        "logprob": max(v, FLOOR),
                        "bytes": list(t.encode("utf-8", "replace")),
                    }
                    for tid, v in lp.top[:top_n]
                ],
            }
        )
    return out


def completion_logprobs(
    logprobs: list[TokenLogprob], token_text: TokenText, top_n: int, text_offset: int
) -> dict[str, Any]:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for lp in logprobs:
        tok = token_text(lp.token_id)
        tokens.append(tok)
        token_logprobs.append(max(lp.logprob, FLOOR))
        tops.append(
            {token_text(tid): max(v, FLOOR) for tid, v in lp.top[:top_n]} if top_n else None
        )
        offsets.append(text_offset)
        text_offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def echo_logprobs(
    prompt_ids: list[int], entries: list[TokenLogprob | None], token_text: TokenText, top_n: int
) -> dict[str, Any]:
    """The prompt's part of an echoed completion's logprobs (offsets from 0): the first token's logprob
    and top_logprobs are null, as OpenAI and vLLM answer."""
    tokens, token_logprobs, tops, offsets, at = [], [], [], [], 0
    for tid, lp in zip(prompt_ids, entries):
        tok = token_text(tid)
        tokens.append(tok)
        token_logprobs.append(None if lp is None else max(lp.logprob, FLOOR))
        tops.append(
            None
            if lp is None or not top_n
            else {token_text(t): max(v, FLOOR) for t, v in lp.top[:top_n]}
        )
        offsets.append(at)
        at += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def join_logprobs(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """Completions logprobs of two stretches of text, one after the other."""
    return {key: first[key] + then[key] for key in first}


def vllm_prompt_logprobs(
    prompt_ids: list[int], entries: list[TokenLogprob | None] | None, token_text: TokenText
) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token null (the first) or {token id: {logprob, rank,
    decoded_token}} for the prompt token and the top alternatives."""
    out: list[dict[str, Any] | None] = []
    for tid, lp in zip(prompt_ids, entries or []):
        if lp is None:
            out.append(None)
            continue
        entry = {
            str(t): {"logprob": max(v, FLOOR), "rank": rank, "decoded_token": token_text(t)}
            for rank, (t, v) in enumerate(lp.top, start=1)
        }
        entry[str(tid)] = {
            "logprob": max(lp.logprob, FLOOR),
            "rank": lp.rank,
            "decoded_token": token_text(tid),
        }
        out.append(entry)
    return out


def sglang_input_logprobs(
    prompt_ids: list[int],
    start: int,
    entries: list[TokenLogprob | None] | None,
    token_text: TokenText | None,
    top_n: int,
) -> dict[str, Any]:
    """SGLang's `input_token_logprobs` / `input_top_logprobs`: [logprob, token id, text] for the prompt
    tokens from `start` on, the first one's logprob (and top list) null; `start` -1 (output logprobs
    only) gives just the last prompt token, null, as SGLang does."""
    text_of = token_text or (lambda _tid: None)
    if start < 0 or entries is None:
        start, entries = len(prompt_ids) - 1, [None]
    ids = prompt_ids[start:]
    return {
        "input_token_logprobs": [
            [None if lp is None else lp.logprob, tid, text_of(tid)] for tid, lp in zip(ids, entries)
        ],
        "input_top_logprobs": (
            [
                None if lp is None else [[v, t, text_of(t)] for t, v in lp.top[:top_n]]
                for lp in entries
            ]
            if top_n
            else []
        ),
    }


def sglang_logprobs(
    logprobs: list[TokenLogprob], token_text: TokenText | None, top_n: int
) -> dict[str, Any]:
    text_of = token_text or (lambda _tid: None)
    return {
        "output_token_logprobs": [
            [lp.logprob, lp.token_id, text_of(lp.token_id)] for lp in logprobs
        ],
        "output_top_logprobs": (
            [[[v, tid, text_of(tid)] for tid, v in lp.top[:top_n]] for lp in logprobs]
            if top_n
            else []
        ),
    }
