"""Sampling behaviour of the native engine: seeds, top-k/top-p/min-p, stop strings and tokens,
length and eos, logprobs against HF, penalties against a reference, and streamed text."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeacc_ray.config import EngineConfig
from edgeacc_ray.engine import LLMEngine
from edgeacc_ray.engine.request import SamplingParams
from edgeacc_ray.llm import LLM

EOS_IDS = {7999, 7997}
PROMPTS = [
    "The quick brown fox jumps over",
    "def main():\n    return",
    "Once upon a time, there was",
    "import os\nimport os\nimport os\n",
    "Hello, how are you today? I am",
]
REPETITIVE = "import os\nimport os\nimport os\n"  # its greedy continuation repeats " Message"


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", dtype="float32", num_pages=512)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def hf_model(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def greedy_outputs(llm):
    return llm.generate(PROMPTS, greedy(24))


def hf_log_probs(hf_model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[len(output), vocab] log-softmax of HF's fp32 logits at each generated position."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = hf_model(ids).logits[0, len(prompt) - 1 : len(prompt) + len(output) - 1].float()
    return torch.log_softmax(logits, dim=-1)


# ---- seeds and filters ------------------------------------------------------------------------------


def test_same_seed_same_output_different_seeds_differ(llm):
    prompt = PROMPTS[0]
    params = [
        SamplingParams(temperature=1.0, max_tokens=16, seed=s, ignore_eos=True)
        for s in (1, 1, 2, 3)
    ]
    a, b, c, d = llm.generate([prompt] * 4, params)
    assert a.token_ids == b.token_ids
    [again] = llm.generate(prompt, params[0])  # alone, in a later batch
    assert again.token_ids == a.token_ids
    assert len({tuple(a.token_ids), tuple(c.token_ids), tuple(d.token_ids)}) == 3


def test_seeded_output_does_not_depend_on_the_batch(llm):
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    [alone] = llm.generate(PROMPTS[1], params)
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    outs = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [others, params, others])
    assert outs[1].token_ids == alone.token_ids


def test_unseeded_sampling_is_random(llm):
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    runs = [tuple(o.token_ids) for o in llm.generate([PROMPTS[0]] * 4, params)]
    assert len(set(runs)) > 1


@pytest.mark.parametrize(
    "fields",
    [
        dict(top_k=1),
        dict(top_k=1, seed=5),
        dict(top_p=1e-9),
        dict(min_p=1.0),
        dict(temperature=0.0, top_k=50, top_p=0.5),
    ],
)
def test_degenerate_filters_equal_greedy(llm, greedy_outputs, fields):
    fields = {"temperature": 1.0, **fields}
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True, **fields))
    assert [o.token_ids for o in outs] == [g.token_ids for g in greedy_outputs]


def test_top_k_samples_only_among_the_top_k(llm):
    params = SamplingParams(
        temperature=5.0, top_k=3, max_tokens=24, ignore_eos=True, logprobs=3, seed=11
    )
    outs = llm.generate(PROMPTS, params)
    non_greedy = 0
    for out in outs:
        for lp in out.logprobs:
            top_ids = [t for t, _ in lp.top]
            assert lp.token_id in top_ids
            non_greedy += lp.token_id != top_ids[0]
    assert non_greedy > 10  # temperature 5 really samples


def test_top_p_samples_only_inside_the_nucleus(llm):
    params = SamplingParams(
        temperature=1.0, top_p=0.6, max_tokens=24, ignore_eos=True, logprobs=20, seed=3
    )
    for out in llm.generate(PROMPTS, params):
        for lp in out.logprobs:
            mass_before = sum(torch.tensor(v).exp().item() for t, v in lp.top if v > lp.logprob)
            assert mass_before <= 0.6 + 1e-6, (lp.token_id, mass_before)


# ---- stopping --------------------------------------------------------------------------------------


def test_max_tokens_gives_length(llm):
    for n in (1, 5):
        for out in llm.generate(PROMPTS, greedy(n)):
            assert (
                len(out.token_ids) == n
                and out.finish_reason == "length"
                and out.stop_reason is None
            )


def test_stop_string_across_tokens(llm, tokenizer, greedy_outputs):
    for prompt, ref in zip(PROMPTS, greedy_outputs):
        ids = ref.token_ids
        # a stop string that straddles the boundary between output tokens 5 and 6
        head, tail = tokenizer.decode(ids[:6]), tokenizer.decode(ids[6:7])
        if "\ufffd" in head + tail or len(head) < 2 or not tail:
            continue
        stop = head[-2:] + tail[:1]
        full = tokenizer.decode(ids)
        cut = full.find(stop)
        expect_tokens = next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k]))
        [out] = llm.generate(prompt, greedy(24, stop=[stop]))
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == full[:cut]
        assert stop not in out.text
        assert out.token_ids == ids[:expect_tokens]
        break
    else:
        pytest.fail("no prompt gave a usable stop string")


def test_earliest_of_several_stop_strings_wins(llm, greedy_outputs):
    ref = greedy_outputs[2]
    text = ref.text
    early, late = text[4:7], text[len(text) - 6 : len(text) - 3]
    assert text.find(early) < text.find(late)
    [out] = llm.generate(PROMPTS[2], greedy(24, stop=[late, early]))
    assert out.stop_reason == early and out.text == text[: text.find(early)]


def test_streamed_chunks_never_show_a_stop_string(llm, greedy_outputs):
    engine = llm.engine
    text = greedy_outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    engine.add_request("s", llm.tokenizer.encode(PROMPTS[0]), greedy(24, stop=[stop]))
    chunks = []
    while engine.has_unfinished():
        chunks += engine.step()
    streamed = "".join(c.text for c in chunks)
    assert streamed == text[: text.find(stop)]
    assert chunks[-1].finished and chunks[-1].stop_reason == stop
    assert not any(c.finished for c in chunks[:-1])


def test_stop_string_in_the_prompt_does_not_stop(llm, greedy_outputs):
    """The last prompt tokens are decoded as context; a stop string found only there must not count."""
    prompt = PROMPTS[4]  # "... I am"
    ref = greedy_outputs[4]
    for stop in ("I am", "today"):
        assert stop not in ref.text
        [out] = llm.generate(prompt, greedy(24, stop=stop))  # a plain string is accepted too
        assert out.finish_reason == "length" and out.text == ref.text


def test_stop_token_ids(llm, greedy_outputs):
    ref = greedy_outputs[1].token_ids
    stop_token = ref[4]
    first = ref.index(stop_token)
    [out] = llm.generate(PROMPTS[1], greedy(24, stop_token_ids=[stop_token, 7000]))
    assert out.token_ids == ref[: first + 1]  # the stop token is the last output token
    assert out.finish_reason == "stop" and out.stop_reason == stop_token


@pytest.fixture(scope="module")
def eos_prompt(hf_model) -> list[int]:
    """A one-token prompt whose greedy next token is an eos token (5395 for the built-in tiny model;
    searched for in chunks if a rebuilt model moved it)."""
    for start in [5395] + list(range(0, 7990, 500)):
        candidates = torch.arange(start, min(start + 500, 7990))[:, None]
        with torch.no_grad():
            nxt = hf_model(candidates, use_cache=False).logits[:, -1].argmax(-1)
        hits = [int(candidates[i, 0]) for i in range(len(nxt)) if int(nxt[i]) in EOS_IDS]
        if hits:
            return hits[:1]
    pytest.fail("no single-token prompt whose greedy continuation is eos")


def test_eos_ends_generation_unless_ignored(llm, eos_prompt):
    assert llm.engine.eos_token_ids == EOS_IDS  # both from generation_config.json
    [out] = llm.generate(eos_prompt, SamplingParams(temperature=0.0, max_tokens=10))
    assert len(out.token_ids) == 1 and out.token_ids[0] in EOS_IDS
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.text == ""  # special tokens skipped
    [raw] = llm.generate(
        eos_prompt, SamplingParams(temperature=0.0, max_tokens=10, skip_special_tokens=False)
    )
    assert raw.text == llm.tokenizer.decode(raw.token_ids)
    [ignored] = llm.generate(
        eos_prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    )
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 10
    assert ignored.token_ids[0] == out.token_ids[0]
    bm = llm.engine.block_manager
    assert bm.num_free_pages == bm.num_pages


def test_eos_finishes_one_request_of_a_batch(llm, eos_prompt):
    """The request that hits eos finishes (and frees its pages) while the others run on."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=6)
    engine.add_request("eos", eos_prompt, params)
    engine.add_request("other", llm.tokenizer.encode(PROMPTS[0]), greedy(6))
    first = {o.request_id: o for o in engine.step()}
    assert first["eos"].finished and first["eos"].finish_reason == "stop"
    assert not first["other"].finished
    assert "eos" not in engine.sequences and engine.stats().num_running == 1
    tokens = list(first["other"].token_ids)
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == "other"
            tokens += out.token_ids
    assert len(tokens) == 6
    assert engine.block_manager.num_free_pages == engine.block_manager.num_pages


# ---- logprobs ---------------------------------------------------------------------------------------


def test_logprobs_match_hf(llm, hf_model, tokenizer):
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    outs = llm.generate(prompts, greedy(10, logprobs=5))
    for prompt, out in zip(prompts, outs):
        ref = hf_log_probs(hf_model, prompt, out.token_ids)
        assert len(out.logprobs) == len(out.token_ids) == 10
        for step, lp in enumerate(out.logprobs):
            assert lp.token_id == out.token_ids[step]
            assert lp.logprob == pytest.approx(ref[step, lp.token_id].item(), abs=1e-4)
            assert len(lp.top) == 5
            values = [v for _, v in lp.top]
            assert values == sorted(values, reverse=True)
            assert lp.top[0][0] == lp.token_id  # greedy picks the best
            ref_values, ref_ids = ref[step].topk(5)
            assert [t for t, _ in lp.top] == ref_ids.tolist()
            assert values == pytest.approx(ref_values.tolist(), abs=1e-4)


def test_logprobs_of_sampled_tokens_match_hf(llm, hf_model, tokenizer):
    prompt = tokenizer.encode(PROMPTS[4])
    [out] = llm.generate(
        prompt, SamplingParams(temperature=1.5, max_tokens=10, seed=4, ignore_eos=True, logprobs=0)
    )
    ref = hf_log_probs(hf_model, prompt, out.token_ids)
    for step, lp in enumerate(out.logprobs):
        assert lp.top == []
        assert lp.logprob == pytest.approx(ref[step, out.token_ids[step]].item(), abs=1e-4)


def test_logprobs_off_by_default(llm):
    [out] = llm.generate(PROMPTS[0], greedy(3))
    assert out.logprobs is None


# ---- penalties --------------------------------------------------------------------------------------


def penalized_reference(
    hf_model,
    prompt: list[int],
    n: int,
    presence: float = 0.0,
    frequency: float = 0.0,
    repetition: float = 1.0,
) -> list[int]:
    """Greedy decoding with OpenAI presence/frequency penalties (on output tokens) and the HF/vLLM
    repetition penalty (on prompt and output tokens), step by step with HF's fp32 logits."""
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + out])).logits[0, -1].float()
        if repetition != 1.0:
            seen = torch.tensor(sorted(set(prompt + out)))
            v = logits[seen]
            logits[seen] = torch.where(v > 0, v / repetition, v * repetition)
        if out:
            counts = torch.bincount(torch.tensor(out), minlength=logits.shape[0]).float()
            logits -= frequency * counts + presence * (counts > 0).float()
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("fields", [dict(presence=1.5), dict(frequency=1.0), dict(repetition=1.3)])
def test_penalties_change_output_as_the_reference_does(llm, hf_model, tokenizer, fields):
    prompt = tokenizer.encode(REPETITIVE)
    n = 16
    [plain] = llm.generate(prompt, greedy(n))
    assert len(set(plain.token_ids)) < n - 3  # the unpenalized output repeats itself
    params = greedy(
        n,
        presence_penalty=fields.get("presence", 0.0),
        frequency_penalty=fields.get("frequency", 0.0),
        repetition_penalty=fields.get("repetition", 1.0),
    )
    [out] = llm.generate(prompt, params)
    assert out.token_ids != plain.token_ids
    assert out.token_ids == penalized_reference(hf_model, prompt, n, **fields)


def test_repetition_penalty_equals_hf_generate(llm, hf_model, tokenizer):
    prompt = tokenizer.encode(REPETITIVE)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hf = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            repetition_penalty=1.3,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    [out] = llm.generate(prompt, greedy(12, repetition_penalty=1.3))
    assert out.token_ids == hf


def test_penalized_request_does_not_disturb_its_batch(llm, greedy_outputs):
    params = [greedy(24), greedy(24, frequency_penalty=2.0, repetition_penalty=2.0), greedy(24)]
    outs = llm.generate([PROMPTS[0], PROMPTS[3], PROMPTS[2]], params)
    assert outs[0].token_ids == greedy_outputs[0].token_ids
    assert outs[2].token_ids == greedy_outputs[2].token_ids
    assert outs[1].token_ids != greedy_outputs[3].token_ids


# ---- streamed text ----------------------------------------------------------------------------------


def test_streamed_text_equals_decode(tiny_model_path, tokenizer):
    engine = LLMEngine(EngineConfig(model="tiny", dtype="float32", num_pages=512))
    texts = PROMPTS + [
        "Un café très chaud, s'il vous plaît: ",
        "日本語のテキスト",
        "emoji 🎉🎉 and more",
    ]
    for i, text in enumerate(texts):
        engine.add_request(
            f"r{i}", tokenizer.encode(text), SamplingParams(temperature=0.8, seed=i, max_tokens=20)
        )
    chunks: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            chunks.setdefault(out.request_id, []).append(out)
    compared = 0
    for rid, outs in chunks.items():
        ids = [t for o in outs for t in o.token_ids]
        streamed = "".join(o.text for o in outs)
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert outs[-1].finished and outs[-1].num_output_tokens == len(ids)
        if decoded.endswith("\ufffd"):  # ends inside a character: that part is never handed out
            assert decoded.startswith(streamed) and not decoded[len(streamed) :].strip("\ufffd")
            continue
        assert streamed == decoded, rid
        compared += 1
    assert compared >= 5


def test_offline_text_equals_decode(llm, tokenizer, greedy_outputs):
    compared = 0
    for out in greedy_outputs:
        decoded = tokenizer.decode(out.token_ids, skip_special_tokens=True)
        if not decoded.endswith("\ufffd"):
            assert out.text == decoded
            compared += 1
    assert compared >= 3
