"""Benchmark prompts: ShareGPT files, a built-in ShareGPT-like generator, fixed-length random prompts.

All prompts are text whose token count under the target's tokenizer is known (`Request.prompt_len`).

The built-in generator (`sharegpt_like`) needs no download. ShareGPT's first-turn lengths are
heavy-tailed: most prompts are short questions, a few are pasted documents; answers cluster around a
few hundred tokens. Both are drawn from log-normal distributions (the usual fit for text lengths):

- prompt: median 150 tokens, sigma 1.2;  answer: median 140 tokens, sigma 0.85; independent;
- then the same keep/drop rule as the ShareGPT loader (SGLang's), so both datasets are cut alike.

With SGLang's classic limits (prompt <= 1024, prompt + output <= 2048) this gives means of
213 prompt / 198 output tokens (medians 138 / 140, prompt p99 ~930), matching the per-request
averages that bench_serving runs of 1,000 ShareGPT_V3 prompts print with Llama-family tokenizers
(~215 in / ~198 out). With the CPU default context of 1024 the means are 196 / 179.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SHAREGPT_LIKE_PROMPT = (150.0, 1.2)  # (median tokens, log-normal sigma)
SHAREGPT_LIKE_OUTPUT = (140.0, 0.85)


@dataclass(frozen=True)
class Request:
    """One benchmark request: prompt text, its length in tokens, and the output length to ask for."""

    prompt: str
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class LengthLimits:
    """SGLang's keep rule for (prompt, output) pairs: drop too-short and too-long ones."""

    min_len: int = 4
    max_prompt_len: int = 1024
    context_len: int = 2048

    def keep(self, prompt_len: int, output_len: int) -> bool:
        """True when the pair is neither too short nor too long."""
        if prompt_len < self.min_len or output_len < self.min_len:
            return False
        return prompt_len <= self.max_prompt_len and prompt_len + output_len <= self.context_len


def load_tokenizer(model: str, tokenizer: str | None = None) -> Any:
    """Load the HF tokenizer for `tokenizer`, else `model` if it is a folder, else a built-in model name."""
    from transformers import AutoTokenizer

    path = tokenizer or model
    if not Path(path).is_dir():
        from edgeacc_ray.models.builtin_models import resolve_model

        path = str(resolve_model(path))
    return AutoTokenizer.from_pretrained(path)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens (what the server adds is its own business)."""
    return tokenizer.encode(text, add_special_tokens=False)


def load_sharegpt(
    path: str | Path,
    tokenizer: Any,
    num: int,
    rng: random.Random,
    limits: LengthLimits = LengthLimits(),
) -> list[Request]:
    """Sample `num` requests from a ShareGPT_V3-format JSON file the way SGLang's bench_serving does.

    Keeps the first two turns of every conversation with at least two (prompt = turn 0, reference
    output length = token count of turn 1), shuffles, and takes pairs in order that pass `limits`.
    Returns fewer than `num` if the file runs out.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    pairs = []
    for item in data:
        turns = item.get("conversations", item.get("conversation", []))
        if len(turns) >= 2:
            pairs.append((turns[0]["value"], turns[1]["value"]))
    rng.shuffle(pairs)
    out: list[Request] = []
    for prompt, completion in pairs:
        if len(out) == num:
            break
        prompt_len = len(encode(tokenizer, prompt))
        output_len = len(encode(tokenizer, completion))
        if limits.keep(prompt_len, output_len):
            out.append(Request(prompt, prompt_len, output_len))
    return out


def sharegpt_like_lengths(
    num: int, rng: np.random.Generator, limits: LengthLimits = LengthLimits()
) -> list[tuple[int, int]]:
    """Draw `num` (prompt_len, output_len) pairs from the log-normal model in the module docstring."""
    pairs: list[tuple[int, int]] = []
    while len(pairs) < num:
        batch = 2 * (num - len(pairs)) + 16
        prompts = rng.lognormal(np.log(SHAREGPT_LIKE_PROMPT[0]), SHAREGPT_LIKE_PROMPT[1], batch)
        outputs = rng.lognormal(np.log(SHAREGPT_LIKE_OUTPUT[0]), SHAREGPT_LIKE_OUTPUT[1], batch)
        for p, o in zip(np.rint(prompts).astype(int), np.rint(outputs).astype(int)):
            if limits.keep(int(p), int(o)) and len(pairs) < num:
                pairs.append((int(p), int(o)))
    return pairs


def sharegpt_like(
    tokenizer: Any, num: int, seed: int, limits: LengthLimits = LengthLimits()
) -> list[Request]:
    """`num` random-text requests whose lengths follow the ShareGPT-like distribution."""
    rng = np.random.default_rng(seed)
    return [
        Request(random_text(tokenizer, p, rng), p, o)
        for p, o in sharegpt_like_lengths(num, rng, limits)
    ]


def random_requests(
    tokenizer: Any, num: int, input_len: int, output_len: int, seed: int
) -> list[Request]:
    """`num` requests of exactly `input_len` prompt tokens, each asking for `output_len` tokens."""
    rng = np.random.default_rng(seed)
    return [
        Request(random_text(tokenizer, input_len, rng), input_len, output_len) for _ in range(num)
    ]


@lru_cache(maxsize=4)
def _word_tokens(tokenizer: Any) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Vocabulary tokens that are ' ' + ASCII letters and encode back to themselves alone."""
    ids, texts = [], []
    special = set(getattr(tokenizer, "all_special_ids", []))
    for tid in range(len(tokenizer)):
        if tid in special:
            continue
        text = tokenizer.decode([tid])
        word = text[1:]
        if text.startswith(" ") and len(word) >= 2 and word.isascii() and word.isalpha():
            ids.append(tid)
            texts.append(text)
    reencoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    keep = [i for i, enc in enumerate(reencoded) if enc == [ids[i]]]
    if len(keep) < 100:
        raise ValueError("tokenizer has too few plain word tokens to build random prompts")
    return tuple(ids[i] for i in keep), tuple(texts[i] for i in keep)


def random_text(tokenizer: Any, num_tokens: int, rng: np.random.Generator) -> str:
    """Random words that encode to exactly `num_tokens` tokens under `tokenizer`.

    Words are whole vocabulary tokens of the form ' word', so the text re-tokenizes to the same ids;
    the rare merge across words is detected and that draw is repeated.
    """
    _, texts = _word_tokens(tokenizer)
    for _ in range(20):
        picks = rng.integers(0, len(texts), num_tokens)
        text = "".join(texts[i] for i in picks)
        if len(encode(tokenizer, text)) == num_tokens:
            return text
    raise ValueError(f"could not build a prompt of exactly {num_tokens} tokens")


def requests_summary(requests: Sequence[Request]) -> dict[str, float]:
    """Count and mean prompt/output lengths of a request list (for logs and records)."""
    n = len(requests)
    return {
        "num_requests": n,
        "mean_prompt_len": sum(r.prompt_len for r in requests) / n if n else 0.0,
        "mean_output_len": sum(r.output_len for r in requests) / n if n else 0.0,
    }
