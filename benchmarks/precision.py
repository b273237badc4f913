"""Precision on a real model: how close HF's and our reduced-precision paths come to HF's float32.

    python -m benchmarks.precision                      # SmolLM2-135M-Instruct, bf16, 120 prompts x 24 tokens
    python -m benchmarks.precision --model small --dtype float16 --num-prompts 100 --new-tokens 16

Chat prompts are made deterministically from question templates. HF transformers in float32 decodes
each greedily: its tokens are the reference continuation and its logits the reference
distributions. Each system under test (HF and ours in `--dtype`; ours in float32 as a check) then
reads the prompt and is fed the reference tokens one at a time: a prefill, then one decode step per
token, as in generation (teacher forcing). At every position its next-token distribution is compared
with float32's: top-1 agreement (its argmax is float32's greedy token) and KL(fp32 || system), in
nats, averaged over all positions. `greedy =` counts free-running greedy continuations that equal
float32's exactly (a single early flip counts the whole continuation as different).

Ours runs through the engine's own scheduler and model runner (paged KV, decode workspace, packed
linears), the code that serves requests, in batches of `--batch` sequences.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

TEMPLATES = [
    (
        "What is the capital of {}?",
        [
            "France",
            "Germany",
            "Italy",
            "Spain",
            "Japan",
            "Canada",
            "Australia",
            "Brazil",
            "Egypt",
            "India",
            "Mexico",
            "Kenya",
            "Norway",
            "Greece",
            "Portugal",
            "Argentina",
        ],
    ),
    (
        "What is {}?",
        [
            "2 + 2",
            "7 times 8",
            "15 minus 9",
            "100 divided by 4",
            "the square root of 81",
            "3 squared",
            "half of 50",
            "10% of 200",
        ],
    ),
    (
        "How many legs does {} have?",
        ["a spider", "a dog", "a bird", "an insect", "an octopus", "a horse", "an ant", "a crab"],
    ),
    (
        "Give me a synonym for {}.",
        ["happy", "big", "fast", "smart", "cold", "angry", "small", "beautiful"],
    ),
    (
        "Translate '{}' into Spanish.",
        ["hello", "thank you", "good morning", "cat", "water", "friend", "book", "see you later"],
    ),
    (
        "Explain {} in one sentence.",
        [
            "photosynthesis",
            "gravity",
            "inflation",
            "democracy",
            "evolution",
            "electricity",
            "the internet",
            "vaccines",
        ],
    ),
    (
        "Write a haiku about {}.",
        ["the sea", "autumn", "a cat", "the moon", "coffee", "rain", "mountains", "winter"],
    ),
    (
        "Why {}?",
        [
            "is the sky blue",
            "do leaves change color in the fall",
            "do we need sleep",
            "is the ocean salty",
            "do birds migrate",
            "does ice float",
            "do cats purr",
            "is exercise healthy",
        ],
    ),
    (
        "Who {}?",
        [
            "wrote Romeo and Juliet",
            "painted the Mona Lisa",
            "invented the telephone",
            "discovered penicillin",
            "was the first person on the moon",
            "developed the theory of relativity",
            "composed the Fifth Symphony",
            "wrote Pride and Prejudice",
        ],
    ),
    (
        "Name three {}.",
        [
            "primary colors",
            "planets",
            "fruits",
            "programming languages",
            "musical instruments",
            "European countries",
            "mammals",
            "vegetables",
        ],
    ),
    (
        "What is the largest {}?",
        [
            "planet in the solar system",
            "ocean on Earth",
            "animal on Earth",
            "country by area",
            "desert in the world",
            "organ of the human body",
            "mountain in the world",
            "city in Europe",
        ],
    ),
    (
        "How do you {}?",
        [
            "boil an egg",
            "make a cup of tea",
            "tie a tie",
            "plant a tree",
            "change a light bulb",
            "learn to swim",
            "fold a paper airplane",
            "stay hydrated",
        ],
    ),
    (
        "Give me one tip for {}.",
        [
            "learning a new language",
            "sleeping better",
            "saving money",
            "staying focused",
            "writing clearly",
            "cooking rice",
            "running a marathon",
            "public speaking",
        ],
    ),
    (
        "{}",
        [
            "Hello",
            "Tell me a joke.",
            "What is your name?",
            "What day comes after Monday?",
            "What is the boiling point of water?",
            "Is a tomato a fruit?",
            "What color is grass?",
            "How many days are in a week?",
        ],
    ),
]


def chat_questions(n: int) -> list[str]:
    """The first n questions, taking one filler from each template in turn (so a few cover them all)."""
    columns = [[template.format(f) for f in fillers] for template, fillers in TEMPLATES]
    rows = [q for row in itertools.zip_longest(*columns) for q in row if q is not None]
    if n > len(rows):
        raise ValueError(f"at most {len(rows)} prompts are defined")
    return rows[:n]


@torch.inference_mode()
def hf_decode(
    model, prompt: list[int], n: int, forced: list[int] | None = None
) -> tuple[list[int], torch.Tensor]:
    """HF's decode of n tokens (prefill, then one cached step per token), greedy or fed `forced`:
    the tokens it picks and its logits [n, vocab]."""
    from transformers import DynamicCache

    tokens: list[int] = []
    rows = []
    ids, cache = torch.tensor([prompt]), DynamicCache()
    for step in range(n):
        row = (
            model(ids, None, None, cache, use_cache=True).logits[0, -1].float()
        )  # the cache fills in place
        rows.append(row)
        tokens.append(int(row.argmax()))
        ids = torch.tensor([[tokens[-1] if forced is None else forced[step]]])
    return tokens, torch.stack(rows)


def ours_forced(
    llm, prompts: list[list[int]], forced: list[list[int]], batch: int
) -> list[torch.Tensor]:
    """Our engine's logits [len(forced[i]), vocab] per prompt, fed the forced tokens step by step:
    the engine's scheduler and model runner, with the reference token in place of the sampled one."""
    from edgeacc_ray.engine.request import SamplingParams, Sequence

    engine = llm.engine
    results: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch):
        group = range(start, min(start + batch, len(prompts)))
        seqs = [
            Sequence(f"forced-{i}", prompts[i], SamplingParams(temperature=0.0), arrival_time=0.0)
            for i in group
        ]
        rows: dict[Sequence, list[torch.Tensor]] = {seq: [] for seq in seqs}
        for seq in seqs:
            engine.scheduler.add(seq)
        for step in range(len(forced[start])):
            while any(
                len(r) <= step for r in rows.values()
            ):  # a long prompt may take several chunks
                scheduled = engine.scheduler.schedule()
                logits, samplers = engine.runner.run(scheduled)
                for seq, n in scheduled.items:
                    seq.num_computed_tokens += n
                    engine.block_manager.commit_full_pages(seq)
                for row, seq in zip(logits, samplers):
                    rows[seq].append(row)
            for seq, i in zip(seqs, group):
                seq.token_ids.append(forced[i][step])
        for seq in seqs:
            engine.scheduler.finish(seq)
        results += [torch.stack(rows[seq]) for seq in seqs]
    return results


def ours_greedy(llm, prompts: list[list[int]], n: int) -> list[list[int]]:
    from edgeacc_ray.engine.request import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    return [o.token_ids for o in outs]


def compare(reference: list[torch.Tensor], logits: list[torch.Tensor]) -> tuple[float, float]:
    """Top-1 agreement with the reference and mean KL(reference || logits), over every position."""
    ref, test = torch.cat(reference).double(), torch.cat(logits).double()
    log_p, log_q = torch.log_softmax(ref, dim=-1), torch.log_softmax(test, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return (ref.argmax(-1) == test.argmax(-1)).double().mean().item(), kl.mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="SmolLM2-135M-Instruct", help="built-in name, HF folder or .gguf file"
    )
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="precision under test"
    )
    parser.add_argument("--num-prompts", type=int, default=120)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument(
        "--batch", type=int, default=8, help="sequences our engine decodes together"
    )
    parser.add_argument("--num-threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--show", type=int, default=4, help="print this many continuations per system"
    )
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeacc_ray.llm import LLM
    from edgeacc_ray.models.builtin_models import resolve_model

    torch.set_num_threads(args.num_threads)
    path = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(path)
    questions = chat_questions(args.num_prompts)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    n = args.new_tokens
    started = time.perf_counter()

    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reference = [hf_decode(fp32, p, n) for p in prompts]
    ref_tokens, ref_logits = [t for t, _ in reference], [lg for _, lg in reference]
    del fp32
    low = getattr(torch, args.dtype)
    hf_low = AutoModelForCausalLM.from_pretrained(path, dtype=low).eval()
    systems: dict[str, tuple[list[torch.Tensor], list[list[int]]]] = {
        f"HF {args.dtype}": (
            [hf_decode(hf_low, p, n, forced=t)[1] for p, t in zip(prompts, ref_tokens)],
            [hf_decode(hf_low, p, n)[0] for p in prompts],
        )
    }
    del hf_low
    for dtype in (args.dtype, "float32"):
        with LLM(
            path, dtype=dtype, num_threads=args.num_threads, max_num_seqs=max(args.batch, 8)
        ) as llm:
            systems[f"ours {dtype}"] = (
                ours_forced(llm, prompts, ref_tokens, args.batch),
                ours_greedy(llm, prompts, n),
            )

    print(
        f"model={args.model} prompts={len(prompts)} new_tokens={n} positions={len(prompts) * n} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    print("| system | top-1 agreement with fp32 | mean KL(fp32 ‖ system), nats | greedy = fp32 |")
    print("|---|---|---|---|")
    for name, (logits, greedy) in systems.items():
        agree, kl = compare(ref_logits, logits)
        same = sum(g == r for g, r in zip(greedy, ref_tokens))
        print(f"| {name} | {agree:.2%} | {kl:.2e} | {same}/{len(prompts)} |")
    for i in range(min(args.show, len(prompts))):
        print(f"\n{questions[i]!r}\n  HF float32: {tokenizer.decode(ref_tokens[i])!r}")
        for name, (_, greedy) in systems.items():
            print(f"  {name}: {tokenizer.decode(greedy[i])!r}")


if __name__ == "__main__":
    sys.exit(main())
