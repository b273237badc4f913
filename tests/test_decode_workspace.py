"""The decode workspace follows the live sequences: it grows for long ones and shrinks after them."""

from __future__ import annotations

from edgeacc_ray import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def test_capacity_shrinks_after_a_long_request_and_output_is_unchanged(tiny_model_path):
    llm = LLM(tiny_model_path, dtype="float32")
    workspace = llm.engine.runner.workspace
    llm.generate([list(range(100, 700))], GREEDY)
    assert workspace.buffer.shape[4] >= 600
    short = [[11, 22, 33, 44]]
    after_long = llm.generate(short, GREEDY)[0].token_ids
    assert workspace.buffer.shape[4] <= 64
    fresh = LLM(tiny_model_path, dtype="float32").generate(short, GREEDY)[0].token_ids
    assert after_long == fresh


def test_rows_far_longer_than_the_rest_attend_from_pages_and_match(tiny_model_path):
    """A few long rows in a batch of short ones leave the workspace (whose capacity stays short) for
    the paged path; output equals an engine that attends every row from pages."""
    batch = [[(7 * i + k) % 7000 + 50 for k in range(12 + i)] for i in range(7)] + [
        list(range(100, 700))
    ]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    llm = LLM(tiny_model_path, dtype="float32")
    seen = []
    run = llm.engine.runner._prepare

    def spy(*args):
        out = run(*args)
        seen.append((out[2].num_decode, out[2].num_workspace))
        return out

    llm.engine.runner._prepare = spy
    got = llm.generate(batch, params)
    assert any(
        d == 8 and w == 7 for d, w in seen
    )  # seven rows in the workspace, the long one paged
    assert llm.engine.runner.workspace.buffer.shape[4] <= 64
    paged_only = LLM(tiny_model_path, dtype="float32", decode_workspace_memory_gb=0).generate(
        batch, params
    )
    assert [g.token_ids for g in got] == [p.token_ids for p in paged_only]


def test_the_default_workspace_is_twice_the_pool_whatever_the_dtype(tiny_model_path):
    """A fixed default (1 GB) held 64 SmolLM2 rows in bf16 but not in float32, and a batch that does
    not fit attends from the pages: the default follows the pool instead."""
    for dtype in ("float32", "bfloat16"):
        with LLM(tiny_model_path, dtype=dtype, num_pages=64) as llm:
            runner = llm.engine.runner
            pool_bytes = runner.kv_cache.numel() * runner.kv_cache.element_size()
            assert runner.workspace.max_bytes == 2 * pool_bytes
