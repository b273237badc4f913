"""Semi-PD in the engine, without Ray: the prefill runs in a spawned child process that maps the
decode side's segment (weights + KV pool). Greedy and seeded output equal the colocated engine's
token for token in fp32 (chunked prefill, prefix hits, repeated prompts, preemption); the memory is
really shared and the handoff carries no KV; aborts and a killed prefill process return every page."""

from __future__ import annotations

import os
import pickle
import re
import signal

import pytest

from edgeacc_ray.config import SemiPDConfig
from edgeacc_ray.engine.request import SamplingParams
from edgeacc_ray.engine.runner import kv_page_bytes
from edgeacc_ray.engine.semi_pd import PrefillBatch, PrefillFailed, PrefillTask
from edgeacc_ray.llm import LLM
from tests.test_engine_correctness import OPTIMISTIC, TEXT, assert_pool_idle

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ENGINE = dict(dtype="float32", max_num_batched_tokens=96)


def prompts(tokenizer) -> list[list[int]]:
    ids = tokenizer.encode(TEXT)
    return [ids[:5], ids[:40], ids[:40], ids[:300], ids[100:117], ids[:41], [7], ids[:33]]


@pytest.fixture(scope="module")
def colocated():
    llm = LLM("tiny", **ENGINE)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def semi_pd():
    llm = LLM("tiny", semi_pd=SemiPDConfig(prefill_batch_tokens=64), **ENGINE)
    yield llm
    llm.close()


def test_greedy_equals_colocated_with_chunks_and_prefix_hits(colocated, semi_pd):
    batch = prompts(colocated.tokenizer)
    expected = colocated.generate(batch, GREEDY)
    first = semi_pd.generate(batch, GREEDY)
    again = semi_pd.generate(batch, GREEDY)  # second round: prompts come from the prefix cache
    for e, a, b in zip(expected, first, again):
        assert a.token_ids == e.token_ids and b.token_ids == e.token_ids
    assert sum(o.num_cached_tokens for o in again) >= 300  # the long prompt hit, and more
    assert (
        semi_pd.engine.pd.dispatcher.batches_total >= 3
    )  # 300-token prompt > batch budget: several batches
    assert_pool_idle(semi_pd)


def test_seeded_sampling_and_logprobs_cross_the_handoff(colocated, semi_pd):
    batch = prompts(colocated.tokenizer)[:4]
    params = [
        SamplingParams(
            temperature=0.9, top_p=0.95, seed=11 + i, max_tokens=10, ignore_eos=True, logprobs=2
        )
        for i in range(len(batch))
    ]
    expected = colocated.generate(batch, params)
    got = semi_pd.generate(batch, params)
    for e, g in zip(expected, got):
        assert g.token_ids == e.token_ids
        assert [lp.token_id for lp in g.logprobs] == g.token_ids
        assert [round(lp.logprob, 4) for lp in g.logprobs] == [
            round(lp.logprob, 4) for lp in e.logprobs
        ]


def test_preempted_sequences_go_back_to_prefill_and_match():
    with LLM("tiny", num_pages=12, page_size=8, **ENGINE) as small_colocated:
        tokenizer = small_colocated.tokenizer
        batch = [tokenizer.encode(TEXT)[i * 7 : i * 7 + 20] for i in range(6)]
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        expected = small_colocated.generate(batch, params)
    with LLM(
        "tiny", num_pages=12, page_size=8, semi_pd=SemiPDConfig(), **ENGINE, **OPTIMISTIC
    ) as llm:
        got = llm.generate(batch, params)
        assert llm.engine.scheduler.num_preemptions > 0
        assert_pool_idle(llm)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]


def test_abort_while_the_prompt_is_in_the_prefill_process(semi_pd):
    engine = semi_pd.engine
    ids = semi_pd.tokenizer.encode(TEXT)[:200]
    engine.add_request("gone", ids, GREEDY)
    engine.add_request("stays", ids[:50], GREEDY)
    engine.step()  # dispatches both prompts
    assert engine.scheduler.prefilling
    assert engine.abort("gone").finish_reason == "abort"
    tokens = []
    while engine.has_unfinished():
        if engine.waiting_on_io():
            engine.wait_io()
        tokens += [t for out in engine.step() if out.request_id == "stays" for t in out.token_ids]
    assert len(tokens) == GREEDY.max_tokens
    assert_pool_idle(semi_pd)


def _mapping(pid: int, path: str) -> tuple[int, int]:
    """(Rss, Pss) in kB of the mapping of `path` in process `pid`."""
    rss = pss = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif inside and line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss, pss


def test_weights_and_pool_exist_once_and_the_handoff_moves_no_kv(semi_pd):
    engine = semi_pd.engine
    ids = semi_pd.tokenizer.encode(TEXT)[:250]
    semi_pd.generate([ids], GREEDY)
    manifest = engine.pd.storage.arena.manifest
    child = semi_pd.prefill_process.pid
    # Both processes map the same file, and the decode side's tensors live inside it.
    child_rss, child_pss = _mapping(child, manifest.path)
    own_rss, own_pss = _mapping(os.getpid(), manifest.path)
    assert child_rss > 0 and own_rss > 0
    # Pages both touched are counted once between them: one copy, not two.
    assert own_pss + child_pss <= manifest.nbytes // 1024 + 64
    assert own_pss + child_pss < own_rss + child_rss
    arena = engine.pd.storage.arena.tensors
    weight = engine.runner.model.model.embed_tokens.weight
    assert weight.data_ptr() == arena["model.embed_tokens.weight"].data_ptr()
    assert engine.runner.kv_cache.data_ptr() == arena["kv_cache"].data_ptr()
    # What crosses to the prefill process for a 250-token prompt: ids and page numbers, no KV.
    seq_pages = list(range(16))
    task = PrefillTask("r", ids, len(ids), 0, seq_pages, GREEDY)
    handoff = len(pickle.dumps(PrefillBatch(engine.pd.spec, [task])))
    kv_bytes = len(ids) * kv_page_bytes(engine.args, 1, engine.dtype)
    assert handoff < kv_bytes / 20


def test_prefill_writes_land_in_the_decode_side_pool(semi_pd):
    """The decode process never computes the prompt, yet its pool holds the prompt's keys afterwards."""
    engine = semi_pd.engine
    engine.flush_cache()
    engine.runner.kv_cache.zero_()
    ids = semi_pd.tokenizer.encode(TEXT)[:64]
    engine.add_request("peek", ids, SamplingParams(temperature=0.0, max_tokens=1))
    engine.step()
    pages = list(engine.sequences["peek"].page_table)
    engine.pd.dispatcher.wait()
    engine.step()
    assert engine.runner.kv_cache[:, 0, :, pages].abs().sum() > 0
    assert_pool_idle(semi_pd)


def test_a_killed_prefill_process_fails_its_requests_and_returns_their_pages():
    affinity = os.sched_getaffinity(0)
    with LLM("tiny", semi_pd=SemiPDConfig(), **ENGINE) as llm:
        engine = llm.engine
        engine.add_request("a", llm.tokenizer.encode(TEXT)[:300], GREEDY)
        engine.step()
        os.kill(llm.prefill_process.pid, signal.SIGKILL)
        with pytest.raises(PrefillFailed):
            llm.generate(llm.tokenizer.encode(TEXT)[:20], GREEDY)
        while engine.has_unfinished():
            engine.step()
        assert_pool_idle(llm)
        assert engine.stats().requests_aborted_total >= 1
    assert os.sched_getaffinity(0) == affinity  # the split pinned this process; closing undoes it


def test_the_split_moves_with_the_load_and_is_published(semi_pd):
    engine = semi_pd.engine
    moves = engine.pd.split.moves_total
    semi_pd.generate(prompts(semi_pd.tokenizer), GREEDY)
    stats = engine.stats()
    assert stats.pd_mode == "semi_pd" and stats.split.moves_total > moves
    _, published = engine.pd._control.read()
    assert (list(published.prefill), list(published.decode)) == (
        stats.split.prefill_cores,
        stats.split.decode_cores,
    )
    assert set(published.prefill) | set(published.decode) <= set(engine.pd.split.cores)
