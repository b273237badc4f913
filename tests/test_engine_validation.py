"""Bad requests are refused with a ValueError that says what is wrong, and leave the engine usable."""

from __future__ import annotations

import pytest

from edgeacc_ray.engine.request import SamplingParams
from edgeacc_ray.llm import LLM

VOCAB = 8000
MAX_MODEL_LEN = 128
GOOD = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", dtype="float32", num_pages=64, page_size=4, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def reference(llm) -> list[int]:
    [out] = llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    return out.token_ids


def assert_usable(llm: LLM, reference: list[int]) -> None:
    """Nothing was queued, every page is free, and a normal request still gives the usual answer."""
    engine, bm = llm.engine, llm.engine.block_manager
    assert not engine.has_unfinished() and not engine.sequences
    assert bm.num_free_pages == bm.num_pages and sum(bm.ref_count) == 0
    [out] = llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert out.token_ids == reference and out.finish_reason == "length"
    assert bm.num_free_pages == bm.num_pages and not engine.sequences


BAD_PROMPTS = [
    ([], "empty"),
    (list(range(100, 100 + MAX_MODEL_LEN)), "max_model_len"),
    (list(range(100, 100 + 3 * MAX_MODEL_LEN)), "context"),
    ([1, 2, -1, 3], "outside the vocabulary"),
    ([1, 2, VOCAB], "outside the vocabulary"),
    ([1, 2, 10**9], "outside the vocabulary"),
    ([1, 2.5, 3], "outside the vocabulary"),
]

BAD_PARAMS = [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[VOCAB]), "stop_token_ids"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
]


@pytest.mark.parametrize("prompt,message", BAD_PROMPTS)
def test_bad_prompt_via_engine(llm, reference, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("bad", prompt, SamplingParams(max_tokens=4))
    assert_usable(llm, reference)


@pytest.mark.parametrize("prompt,message", BAD_PROMPTS)
def test_bad_prompt_via_offline_api(llm, reference, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], SamplingParams(max_tokens=4))
    assert_usable(llm, reference)


@pytest.mark.parametrize("fields,message", BAD_PARAMS)
def test_bad_sampling_params(llm, reference, fields, message):
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("bad", GOOD, SamplingParams(**fields))
    with pytest.raises(ValueError, match=message):
        llm.generate(GOOD, SamplingParams(**fields))
    assert_usable(llm, reference)


def test_error_messages_name_the_limit(llm):
    with pytest.raises(ValueError) as info:
        llm.generate([list(range(100, 100 + MAX_MODEL_LEN))], SamplingParams(max_tokens=1))
    assert str(MAX_MODEL_LEN) in str(info.value) and str(MAX_MODEL_LEN - 1) in str(info.value)
    with pytest.raises(ValueError) as info:
        llm.generate([[3, VOCAB + 5]], SamplingParams(max_tokens=1))
    assert str(VOCAB + 5) in str(info.value) and str(VOCAB) in str(info.value)


def test_longest_allowed_prompt_runs(llm, reference):
    [out] = llm.generate(
        [list(range(100, 100 + MAX_MODEL_LEN - 1))],
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
    )
    assert (
        len(out.token_ids) == 1 and out.finish_reason == "length"
    )  # the context is full after one token
    assert_usable(llm, reference)


def test_empty_text_prompt(llm, reference):
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", SamplingParams(max_tokens=4))
    assert_usable(llm, reference)


def test_one_bad_prompt_queues_none_of_the_batch(llm, reference):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([GOOD, [1, -5], GOOD], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="temperature"):
        llm.generate([GOOD, GOOD], [SamplingParams(max_tokens=4), SamplingParams(temperature=-1.0)])
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate([GOOD, GOOD], [SamplingParams(max_tokens=4)])
    assert_usable(llm, reference)


def test_duplicate_request_id(llm, reference):
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request("dup", GOOD, params)
    engine.step()
    with pytest.raises(ValueError, match="already"):
        engine.add_request("dup", [9, 9, 9], params)
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == "dup"
            tokens += out.token_ids
    assert len(tokens) == 3  # the first one ran on undisturbed (one token came from the step above)
    assert_usable(llm, reference)


def test_duplicate_request_id_while_waiting(llm, reference):
    engine = llm.engine
    engine.add_request("w", GOOD, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already"):
        engine.add_request("w", GOOD, SamplingParams(max_tokens=2))
    assert engine.stats().num_waiting == 1
    assert engine.abort("w").finish_reason == "abort"
    assert_usable(llm, reference)
