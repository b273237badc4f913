"""Cost of constrained decoding: a batch of chat prompts decoded under a JSON schema, against the same
batch unconstrained with each row's output length set to what the constrained run produced (same
batch shape at every step, so the difference is the grammar's: mask computation and application).

    python -m benchmarks.bench_structured                        # default model, bf16, batch 32
    python -m benchmarks.bench_structured --model small --batch 32 --repeat 5

Runs alternate (constrained, unconstrained) `--repeat` times; prints each pair's output tok/s and the
median ratio constrained / unconstrained (issue 11's target: >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from edgeacc_ray import LLM, SamplingParams
from edgeacc_ray.engine.request import StructuredOutput

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "city", "hobbies", "employed"],
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 5},
        "employed": {"type": "boolean"},
    },
}
PEOPLE = [
    "a retired teacher",
    "a young chef",
    "an astronaut",
    "a painter",
    "a farmer",
    "a pilot",
    "a student",
    "a nurse",
]


def run(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> tuple[float, list[int]]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, [len(o.token_ids) for o in outs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    llm = LLM(args.model, dtype=args.dtype, num_threads=args.threads, enable_prefix_caching=False)
    conversations = [
        [
            {
                "role": "user",
                "content": f"Describe {PEOPLE[i % len(PEOPLE)]} (person {i}) as JSON with "
                "name, age, city, hobbies and employed.",
            }
        ]
        for i in range(args.batch)
    ]
    prompts = [
        llm.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
        for c in conversations
    ]
    structured = StructuredOutput("json_schema", json.dumps(SCHEMA))
    constrained = [
        SamplingParams(max_tokens=args.max_tokens, temperature=0, structured=structured)
    ] * args.batch
    run(llm, prompts[:2], constrained[:2])  # warm-up: compile the grammar, fill caches
    ratios = []
    for i in range(args.repeat):
        t_c, lengths = run(llm, prompts, constrained)
        free = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
        t_u, _ = run(llm, prompts, free)
        tokens = sum(lengths)
        ratios.append(t_u / t_c)
        print(
            f"run {i}: {tokens} output tokens; constrained {tokens / t_c:.0f} tok/s, "
            f"unconstrained {tokens / t_u:.0f} tok/s, ratio {t_u / t_c:.3f}",
            flush=True,
        )
    print(
        f"median constrained/unconstrained throughput: {statistics.median(ratios):.3f} "
        f"(model {args.model}, {args.dtype}, batch {args.batch}, {args.threads} thread(s))"
    )


if __name__ == "__main__":
    main()
