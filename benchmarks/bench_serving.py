"""Serving benchmark: a concurrency sweep against one or more OpenAI-compatible servers.

    python -m benchmarks.bench_serving --base-url http://127.0.0.1:8000 --model small
    python -m benchmarks.bench_serving --model small --baseline vllm \\
        --targets edgeacc=http://127.0.0.1:8000 vllm=http://127.0.0.1:8011

For each concurrency level, each target in turn runs the same requests (a fresh sample per level,
so prefix caches do not carry over between levels). Writes results.jsonl (a record per run),
report.md (seed-style tables) and a PNG per metric into the output folder.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import time
from contextlib import nullcontext
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from benchmarks import cli
from benchmarks.client import RequestResult, make_client, served_model, stream_request
from benchmarks.datasets import (
    LengthLimits,
    Request,
    load_sharegpt,
    load_tokenizer,
    random_requests,
    requests_summary,
    sharegpt_like,
)
from benchmarks.metrics import summarize
from benchmarks.process_cpu import ProcessCPU
from benchmarks.report import append_jsonl
from benchmarks.targets import Target, running

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"max_concurrency": "16,32,64", "num_prompts": 192, "context_len": 1024},
    "seed": {"max_concurrency": "16,32,64,128,256", "num_prompts": 1000, "context_len": 2048},
}
SUMMARY_KEYS = (
    "completed",
    "failed",
    "duration_s",
    "request_throughput",
    "output_throughput",
    "total_throughput",
    "mean_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "mean_itl_ms",
    "mean_e2e_ms",
    "concurrency",
    "busy_cores_before",
    "busy_cores_after",
    "process_cores",
    "engine_busy_fraction",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags; those left unset take the --scale preset."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_common_args(p, PRESETS)
    data = p.add_argument_group("dataset")
    data.add_argument(
        "--dataset",
        choices=["sharegpt-like", "sharegpt", "random"],
        default="sharegpt-like",
        help="built-in ShareGPT-like lengths (no download), a ShareGPT JSON file, or fixed lengths",
    )
    data.add_argument(
        "--dataset-path", help="ShareGPT_V3_unfiltered_cleaned_split.json (for --dataset sharegpt)"
    )
    data.add_argument("--random-input-len", type=int, default=200)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument(
        "--context-len",
        type=int,
        help="drop ShareGPT pairs with prompt + output above this (prompt alone above 1024)",
    )
    data.add_argument("--num-prompts", type=int, help="requests per run")
    data.add_argument(
        "--api",
        choices=["completions", "chat"],
        default="completions",
        help="/v1/completions with the raw prompt, or /v1/chat/completions with it as the user turn",
    )
    load = p.add_argument_group("load")
    load.add_argument(
        "--max-concurrency", help="one level or a sweep, e.g. 16,32,64 ('inf' = no cap)"
    )
    load.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrival rate in requests/s (default inf: all at once, capped by concurrency)",
    )
    load.add_argument(
        "--one-server-at-a-time",
        action="store_true",
        help="start each launched target (cmd:) alone and run every level on it before the next, so "
        "no other server's processes share the host (default: all up, levels interleaved)",
    )
    args = p.parse_args(argv)
    cli.apply_scale(args, PRESETS)
    if args.dataset == "sharegpt" and not args.dataset_path:
        p.error("--dataset sharegpt needs --dataset-path")
    return args


def concurrency_levels(spec: str) -> list[int | None]:
    """'16,32,64' -> [16, 32, 64]; 'inf' or 0 -> None (no cap)."""
    levels = []
    for part in spec.split(","):
        part = part.strip()
        levels.append(None if part in ("inf", "0") else int(part))
    return levels


def build_requests(args: argparse.Namespace, tokenizer: Any, seed: int) -> list[Request]:
    """`--num-prompts` requests of the chosen dataset, sampled with `seed`."""
    limits = LengthLimits(context_len=args.context_len)
    if args.dataset == "sharegpt":
        reqs = load_sharegpt(
            args.dataset_path, tokenizer, args.num_prompts, random.Random(seed), limits
        )
        if not reqs:
            raise SystemExit(f"no usable conversations in {args.dataset_path}")
        return reqs
    if args.dataset == "random":
        return random_requests(
            tokenizer, args.num_prompts, args.random_input_len, args.random_output_len, seed
        )
    return sharegpt_like(tokenizer, args.num_prompts, seed, limits)


async def run_benchmark(
    target: Target,
    model: str,
    requests: Sequence[Request],
    concurrency: int | None,
    request_rate: float,
    args: argparse.Namespace,
    tokenizer: Any,
    seed: int,
) -> tuple[list[RequestResult], float, dict[str, float | None]]:
    """Check the idle machine's load, warm up, then send `requests` (Poisson arrivals, at most
    `concurrency` in flight).

    Returns the per-request results, the wall time from first send to last answer, and how busy the
    host was: cores busy just before and just after (all servers idle), and the client's own CPU
    seconds in the run.
    """
    chat = args.api == "chat"
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    arrivals = np.random.default_rng(seed)
    label = f"{target.name} c={concurrency or 'inf'}"
    busy_before = await cli.quiet_host(args.wait_quiet)
    async with make_client() as client:
        await cli.warm_up(
            client, target.url, model, tokenizer, args.warmup_requests, seed + 1_000_003, chat
        )
        with tqdm(total=len(requests), desc=label, unit="req", leave=False) as bar:

            async def one(req: Request) -> RequestResult:
                async with sem or nullcontext():
                    prompt = [{"role": "user", "content": req.prompt}] if chat else req.prompt
                    result = await stream_request(
                        client,
                        target.url,
                        model,
                        prompt,
                        req.output_len,
                        req.prompt_len,
                        args.ignore_eos,
                    )
                bar.update(1)
                return result

            engine0 = await engine_compute_seconds(client, target.url)
            processes = ProcessCPU.start() if os.path.isdir("/proc") else None
            cpu0, t0 = time.process_time(), time.perf_counter()
            tasks = []
            for req in requests:
                tasks.append(asyncio.create_task(one(req)))
                if math.isfinite(request_rate):
                    await asyncio.sleep(arrivals.exponential(1.0 / request_rate))
            results = await asyncio.gather(*tasks)
            duration = time.perf_counter() - t0
            client_cpu = time.process_time() - cpu0
            shares = processes.shares() if processes is not None else None
            engine1 = await engine_compute_seconds(client, target.url)
    host = {
        "busy_cores_before": busy_before,
        "busy_cores_after": await cli.busy_cores(settle=True),
        "client_cpu_s": client_cpu,
        "process_cores": shares,
        "engine_busy_fraction": {
            k: round((engine1[k] - v) / duration, 3) for k, v in engine0.items() if k in engine1
        }
        or None,
    }
    return list(results), duration, host


ENGINE_COMPUTE_METRICS = {
    "decode": "edgeacc:engine_compute_seconds_total",
    "prefill": "edgeacc:semi_pd_prefill_compute_seconds_total",
}


async def engine_compute_seconds(client: Any, url: str) -> dict[str, float]:
    """Seconds EdgeAcc's engines have computed so far, by role, from /metrics (empty for other servers):
    their difference over a run, divided by its wall time, is how busy each engine was."""
    try:
        text = (await client.get(url + "/metrics", timeout=10)).text
    except Exception:
        return {}
    found = {}
    for line in text.splitlines():
        for role, name in ENGINE_COMPUTE_METRICS.items():
            if line.startswith(name + "{"):
                found[role] = found.get(role, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


async def _served_model(url: str, wanted: str) -> str:
    async with make_client() as client:
        return await served_model(client, url, wanted)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the sweep; returns the records it wrote."""
    args = parse_args(argv)
    targets = cli.targets_from_args(args)
    out = cli.output_dir(args, "serving")
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    levels = concurrency_levels(args.max_concurrency)
    jsonl = out / "results.jsonl"
    records: list[dict[str, Any]] = []
    groups = [[t] for t in targets] if args.one_server_at_a_time else [targets]
    requests_by_level = [build_requests(args, tokenizer, args.seed + i) for i in range(len(levels))]
    for group in groups:
        records += _run_group(group, levels, requests_by_level, args, tokenizer, out, jsonl)
    header = (
        f"# Serving benchmark\n\n`{cli.command_line('benchmarks.bench_serving', argv)}`\n\n"
        f"dataset {args.dataset}, {args.num_prompts} prompts per run, api {args.api}, "
        f"request rate {args.request_rate}, ignore_eos {args.ignore_eos}, seed {args.seed}\n"
    )
    cli.finish(records, out, args.baseline, header)
    return records


def _run_group(
    targets: Sequence[Target],
    levels: list[int | None],
    requests_by_level: list[list[Request]],
    args: argparse.Namespace,
    tokenizer: Any,
    out: Any,
    jsonl: Any,
) -> list[dict[str, Any]]:
    """Every level on `targets`, which are up together (levels outer, targets inner)."""
    records: list[dict[str, Any]] = []
    with running(targets, out):
        models = {t.name: asyncio.run(_served_model(t.url, args.model)) for t in targets}
        for i, concurrency in enumerate(levels):
            requests = requests_by_level[i]
            for target in targets:
                results, duration, host = asyncio.run(
                    run_benchmark(
                        target,
                        models[target.name],
                        requests,
                        concurrency,
                        args.request_rate,
                        args,
                        tokenizer,
                        args.seed + i,
                    )
                )
                record = {
                    "bench": "serving",
                    "system": target.name,
                    "url": target.url,
                    "model": models[target.name],
                    "dataset": args.dataset,
                    "api": args.api,
                    "max_concurrency": concurrency,
                    "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
                    "ignore_eos": args.ignore_eos,
                    "seed": args.seed + i,
                    **requests_summary(requests),
                    **host,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    **summarize(results, duration),
                }
                append_jsonl(jsonl, record)
                records.append(record)
                cli.print_summary(
                    f"{target.name}, max concurrency {concurrency or 'inf'}", record, SUMMARY_KEYS
                )
    return records


if __name__ == "__main__":
    main()
