"""ShareGPT loader on a small file in the real format; built-in generator and random prompts."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from benchmarks.datasets import (
    LengthLimits,
    encode,
    load_sharegpt,
    load_tokenizer,
    random_requests,
    random_text,
    sharegpt_like,
    sharegpt_like_lengths,
)

SHAREGPT = Path(__file__).parent / "data" / "sharegpt_small.json"


class WordTokenizer:
    """One token per whitespace-separated word, so expected lengths can be counted by hand."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(range(len(text.split())))


# Prompt <= 40 words, prompt + answer <= 60, both >= 4 (the file's long entries exceed these).
LIMITS = LengthLimits(min_len=4, max_prompt_len=40, context_len=60)


def test_sharegpt_keeps_first_two_turns_and_drops_short_and_long_pairs() -> None:
    reqs = load_sharegpt(SHAREGPT, WordTokenizer(), 100, random.Random(0), LIMITS)
    got = {(r.prompt.split()[0], r.prompt_len, r.output_len) for r in reqs}
    # keep_a (3 more turns ignored), keep_b (key "conversation"), keep_c; dropped: single turn, empty,
    # 2-word prompt, 2-word answer, 45-word prompt, 30 + 35 words.
    assert got == {("How", 8, 12), ("Write", 8, 12), ("Summarize", 9, 31)}


def test_sharegpt_sampling_is_seeded_and_capped() -> None:
    first = load_sharegpt(SHAREGPT, WordTokenizer(), 2, random.Random(3), LIMITS)
    again = load_sharegpt(SHAREGPT, WordTokenizer(), 2, random.Random(3), LIMITS)
    assert len(first) == 2 and first == again
    orders = {
        tuple(
            r.prompt for r in load_sharegpt(SHAREGPT, WordTokenizer(), 3, random.Random(s), LIMITS)
        )
        for s in range(6)
    }
    assert len(orders) > 1  # shuffled


def test_sharegpt_default_limits_keep_the_long_pair() -> None:
    reqs = load_sharegpt(SHAREGPT, WordTokenizer(), 100, random.Random(0))
    assert {r.prompt_len for r in reqs} == {8, 9, 30, 45}


def test_sharegpt_like_lengths_follow_the_limits_and_documented_means() -> None:
    pairs = np.array(sharegpt_like_lengths(20000, np.random.default_rng(0)))
    assert pairs.min() >= 4 and pairs[:, 0].max() <= 1024 and pairs.sum(axis=1).max() <= 2048
    assert pairs.mean(axis=0) == pytest.approx([213, 198], rel=0.05)
    short = np.array(
        sharegpt_like_lengths(2000, np.random.default_rng(0), LengthLimits(context_len=1024))
    )
    assert short.sum(axis=1).max() <= 1024


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: str):
    return load_tokenizer(tiny_model_path)


def test_random_prompts_have_exact_token_counts(tokenizer) -> None:
    rng = np.random.default_rng(0)
    for n in (1, 7, 200, 1000):
        assert len(encode(tokenizer, random_text(tokenizer, n, rng))) == n
    reqs = random_requests(tokenizer, 4, 50, 16, seed=1)
    assert [(len(encode(tokenizer, r.prompt)), r.output_len) for r in reqs] == [(50, 16)] * 4
    assert len({r.prompt for r in reqs}) == 4
    assert reqs == random_requests(tokenizer, 4, 50, 16, seed=1)


def test_sharegpt_like_requests_match_their_lengths(tokenizer) -> None:
    reqs = sharegpt_like(tokenizer, 20, seed=5, limits=LengthLimits(context_len=1024))
    assert all(len(encode(tokenizer, r.prompt)) == r.prompt_len for r in reqs)
    assert all(r.prompt_len + r.output_len <= 1024 for r in reqs)
