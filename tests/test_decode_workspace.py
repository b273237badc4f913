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
