"""Multi-turn benchmark: N conversations x R rounds through /v1/chat/completions, with KV-cache hit rate.

    python -m benchmarks.bench_multiturn --base-url http://127.0.0.1:8000 --model small
    python -m benchmarks.bench_multiturn --model small --scale seed --targets ...

Every conversation opens with a user message of --first-len tokens; each later round appends the
previous answer and a new user message of --turn-len tokens. Answers are --output-len tokens
(ignore_eos). At most --max-concurrency requests are in flight. The hit rate is measured two ways:
from the server's /metrics counters (cached prompt tokens / prompt tokens, after minus before) and
from `usage.prompt_tokens_details.cached_tokens` summed over the responses; the ideal rate (every
token of the history reused) is shown next to them. Writes results.jsonl, report.md and plots.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any, Sequence

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks import cli
from benchmarks.client import (
    Messages,
    RequestResult,
    get_metrics_text,
    make_client,
    served_model,
    stream_request,
)
from benchmarks.datasets import encode, load_tokenizer, random_text
from benchmarks.metrics import (
    cache_counters,
    counter_hit_rate,
    parse_prometheus,
    summarize,
    usage_hit_rate,
)
from benchmarks.report import append_jsonl
from benchmarks.targets import Target, running

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "num_conversations": 8,
        "num_rounds": 5,
        "max_concurrency": 8,
        "first_len": 200,
        "turn_len": 48,
        "output_len": 64,
    },
    "seed": {
        "num_conversations": 32,
        "num_rounds": 20,
        "max_concurrency": 32,
        "first_len": 3150,
        "turn_len": 3150,
        "output_len": 500,
    },
}
SUMMARY_KEYS = (
    "completed",
    "failed",
    "skipped",
    "duration_s",
    "request_throughput",
    "output_throughput",
    "mean_ttft_ms",
    "mean_tpot_ms",
    "mean_e2e_ms",
    "mean_prompt_tokens",
    "hit_rate_metrics",
    "hit_rate_usage",
    "hit_rate_ideal",
    "busy_cores_before",
    "busy_cores_after",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags; those left unset take the --scale preset."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_common_args(p, PRESETS)
    p.add_argument("--num-conversations", type=int)
    p.add_argument("--num-rounds", type=int)
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    p.add_argument("--first-len", type=int, help="tokens in each conversation's first user message")
    p.add_argument("--turn-len", type=int, help="tokens in each later user message")
    p.add_argument("--output-len", type=int, help="tokens per answer")
    args = p.parse_args(argv)
    cli.apply_scale(args, PRESETS)
    return args


def make_conversations(tokenizer: Any, args: argparse.Namespace) -> list[list[str]]:
    """The user messages of every conversation (distinct random text, same for every target)."""
    rng = np.random.default_rng(args.seed)
    return [
        [
            random_text(tokenizer, args.first_len if r == 0 else args.turn_len, rng)
            for r in range(args.num_rounds)
        ]
        for _ in range(args.num_conversations)
    ]


def chat_prompt_len(tokenizer: Any, messages: Messages) -> int:
    """Prompt tokens under the tokenizer's chat template (stands in if the server reports no usage)."""
    return len(
        encode(
            tokenizer,
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        )
    )


async def run_conversations(
    client: httpx.AsyncClient,
    target: Target,
    model: str,
    conversations: Sequence[Sequence[str]],
    args: argparse.Namespace,
    tokenizer: Any,
) -> tuple[list[list[RequestResult]], float, int]:
    """Play every conversation; returns results per conversation (in round order), wall time and
    the number of rounds skipped because an earlier round of their conversation failed."""
    sem = asyncio.Semaphore(args.max_concurrency)
    skipped = 0
    total = len(conversations) * args.num_rounds
    with tqdm(total=total, desc=target.name, unit="req", leave=False) as bar:

        async def play(user_messages: Sequence[str]) -> list[RequestResult]:
            nonlocal skipped
            messages: Messages = []
            results: list[RequestResult] = []
            for r, text in enumerate(user_messages):
                messages.append({"role": "user", "content": text})
                async with sem:
                    result = await stream_request(
                        client,
                        target.url,
                        model,
                        list(messages),
                        args.output_len,
                        chat_prompt_len(tokenizer, messages),
                        args.ignore_eos,
                    )
                bar.update(1)
                results.append(result)
                if not result.success:
                    skipped += len(user_messages) - r - 1
                    bar.update(len(user_messages) - r - 1)
                    break
                messages.append({"role": "assistant", "content": result.text})
            return results

        t0 = time.perf_counter()
        per_conversation = await asyncio.gather(*(play(c) for c in conversations))
        return list(per_conversation), time.perf_counter() - t0, skipped


def ideal_hit_rate(per_conversation: Sequence[Sequence[RequestResult]]) -> float | None:
    """Share of prompt tokens a perfect prefix cache would serve: each round's history
    (previous prompt + previous answer) over all prompt tokens of successful rounds."""
    reusable = prompt = 0
    for results in per_conversation:
        for prev, cur in zip([None, *results], results):
            if not cur.success:
                continue
            prompt += cur.prompt_tokens
            if prev is not None:
                reusable += min(prev.prompt_tokens + prev.output_tokens, cur.prompt_tokens)
    return reusable / prompt if prompt else None


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def per_round_stats(
    per_conversation: Sequence[Sequence[RequestResult]], num_rounds: int
) -> list[dict[str, Any]]:
    """Completed count, mean prompt tokens, mean TTFT and mean E2E (ms) of each round (1-based)."""
    rows = []
    for r in range(num_rounds):
        ok = [c[r] for c in per_conversation if len(c) > r and c[r].success]
        rows.append(
            {
                "round": r + 1,
                "completed": len(ok),
                "mean_prompt_tokens": _mean([x.prompt_tokens for x in ok]),
                "mean_ttft_ms": _mean([1000 * x.ttft for x in ok]),
                "mean_e2e_ms": _mean([1000 * x.latency for x in ok]),
            }
        )
    return rows


async def bench_target(
    target: Target, args: argparse.Namespace, tokenizer: Any, conversations: Sequence[Sequence[str]]
) -> dict[str, Any]:
    """Warm up, snapshot /metrics, play the conversations, snapshot again; the run's record."""
    busy_before = await cli.quiet_host(args.wait_quiet)
    async with make_client() as client:
        model = await served_model(client, target.url, args.model)
        await cli.warm_up(
            client, target.url, model, tokenizer, args.warmup_requests, args.seed + 1_000_003, True
        )
        before = await get_metrics_text(client, target.url)
        per_conversation, duration, skipped = await run_conversations(
            client, target, model, conversations, args, tokenizer
        )
        after = await get_metrics_text(client, target.url)
    busy_after = await cli.busy_cores(settle=True)
    flat = [r for rs in per_conversation for r in rs]
    counters = [cache_counters(parse_prometheus(t)) if t else None for t in (before, after)]
    ok = [r for r in flat if r.success]
    return {
        "bench": "multiturn",
        "system": target.name,
        "url": target.url,
        "model": model,
        "num_conversations": args.num_conversations,
        "num_rounds": args.num_rounds,
        "max_concurrency": args.max_concurrency,
        "first_len": args.first_len,
        "turn_len": args.turn_len,
        "output_len": args.output_len,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "busy_cores_before": busy_before,
        "busy_cores_after": busy_after,
        **summarize(flat, duration),
        "skipped": skipped,
        "mean_prompt_tokens": _mean([r.prompt_tokens for r in ok]),
        "hit_rate_metrics": counter_hit_rate(*counters),
        "hit_rate_usage": usage_hit_rate(flat),
        "hit_rate_ideal": ideal_hit_rate(per_conversation),
        "cache_counters": counters,
        "per_round": per_round_stats(per_conversation, args.num_rounds),
    }


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run every target in turn; returns the records it wrote."""
    args = parse_args(argv)
    targets = cli.targets_from_args(args)
    out = cli.output_dir(args, "multiturn")
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    conversations = make_conversations(tokenizer, args)
    records = []
    with running(targets, out):
        for target in targets:
            record = asyncio.run(bench_target(target, args, tokenizer, conversations))
            append_jsonl(out / "results.jsonl", record)
            records.append(record)
            cli.print_summary(f"{target.name}, multi-turn", record, SUMMARY_KEYS)
    header = (
        f"# Multi-turn benchmark\n\n`{cli.command_line('benchmarks.bench_multiturn', argv)}`\n\n"
        f"{args.num_conversations} conversations x {args.num_rounds} rounds, max concurrency "
        f"{args.max_concurrency}, first message {args.first_len} tokens, later messages {args.turn_len}, "
        f"answers {args.output_len}, seed {args.seed}\n"
    )
    cli.finish(records, out, args.baseline, header)
    return records


if __name__ == "__main__":
    main()
