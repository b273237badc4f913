"""Overload: N streaming clients at once against each target (loopback only), each sending one request
(with --retry, again after the server's Retry-After until it is served or the time limit passes).

    RAY_AUTH_MODE=disabled serve run benchmarks/overload.yaml &
    python -m benchmarks.bench_overload --model small --clients 256,1024,2048 --max-tokens 256 \\
        --targets admission=http://127.0.0.1:8000/admission no_admission=http://127.0.0.1:8000/no_admission

Per target and client count it prints the status mix (complete 200s; 429 and 503 with and without
Retry-After; other 4xx; 5xx; streams broken after a 200; connection errors), goodput (output tokens
of completed requests per second of the run), TTFT and TPOT percentiles of the completed requests,
the peak RSS of the application's Serve replica processes, and the KV pages still in use 30 s later.
Targets run one after the other at each client count (the idle one computes nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from benchmarks.client import RequestResult, get_json, make_client, served_model, stream_request

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Outcome:
    target: str
    clients: int
    wall_s: float
    results: list[RequestResult]
    peak_rss_mb: float
    pages_in_use_after: int | None
    attempts: int = 0
    mix: dict[str, int] = field(default_factory=dict)


def classify(r: RequestResult) -> str:
    if r.success:
        return "complete"
    if r.status in (429, 503):
        return f"{r.status}{'' if r.retry_after else ' (no Retry-After)'}"
    if r.status == 200:
        return "broken stream"
    if 400 <= r.status < 500:
        return f"other {r.status}"
    if r.status >= 500:
        return f"{r.status}"
    return "connection error"


def replica_rss_mb(app: str) -> float:
    """Summed RSS of this application's Serve replica processes (`ray::ServeReplica:<app>:*`)."""
    total = 0
    title = f"ServeReplica:{app}:".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if title not in f.read():
                    continue
            with open(f"/proc/{pid}/status") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


async def pages_in_use(client, base: str, wait_s: float = 30.0) -> int | None:
    """KV pages held by live requests once the server has settled (None if it does not answer)."""
    deadline = time.monotonic() + wait_s
    used = None
    while time.monotonic() < deadline:
        try:
            s = (await get_json(client, base + "/get_server_info"))["internal_states"][0]
        except Exception:
            await asyncio.sleep(1)
            continue
        used = s["num_total_pages"] - s["num_free_pages"]
        if used == 0 and s["num_running_reqs"] == 0 and s["num_queue_reqs"] == 0:
            return 0
        await asyncio.sleep(1)
    return used


async def one_client(
    client, base: str, model: str, prompt: str, args, deadline: float
) -> tuple[RequestResult, int]:
    attempts = 0
    while True:
        attempts += 1
        r = await stream_request(client, base, model, prompt, args.max_tokens, args.prompt_len)
        if r.success or not args.retry or r.status not in (429, 503) or time.monotonic() > deadline:
            return r, attempts
        await asyncio.sleep(min(float(r.retry_after or 1), max(0.0, deadline - time.monotonic())))


async def run_level(name: str, base: str, app: str, clients: int, args) -> Outcome:
    async with make_client(max_connections=clients + 16) as client:
        model = await served_model(client, base, args.model)
        rng = random.Random(clients)
        words = "alpha beta gamma delta river stone cloud light paper glass".split()
        prompts = [
            " ".join(rng.choice(words) for _ in range(args.prompt_len)) for _ in range(clients)
        ]
        peak = 0.0
        done = asyncio.Event()

        async def watch_rss() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, replica_rss_mb(app))
                await asyncio.sleep(0.5)

        watcher = asyncio.ensure_future(watch_rss())
        start = time.perf_counter()
        deadline = time.monotonic() + args.time_limit
        tasks = [
            asyncio.ensure_future(one_client(client, base, model, p, args, deadline))
            for p in prompts
        ]
        finished, pending = await asyncio.wait(tasks, timeout=args.time_limit + 60)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - start
        done.set()
        await watcher
        results = [t.result()[0] for t in finished]
        results += [RequestResult(error="client time limit") for _ in pending]
        attempts = sum(t.result()[1] for t in finished)
        used = await pages_in_use(client, base)
    out = Outcome(name, clients, wall, results, peak, used, attempts)
    for r in results:
        out.mix[classify(r)] = out.mix.get(classify(r), 0) + 1
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def report(o: Outcome) -> dict:
    ok = [r for r in o.results if r.success]
    tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    row = {
        "target": o.target,
        "clients": o.clients,
        "wall_s": round(o.wall_s, 1),
        "attempts": o.attempts,
        "mix": o.mix,
        "goodput_tok_s": round(tokens / o.wall_s, 1),
        "ttft_p50_s": round(pct([r.ttft for r in ok], 50), 3),
        "ttft_p99_s": round(pct([r.ttft for r in ok], 99), 3),
        "tpot_p50_ms": round(1000 * pct(tpots, 50), 1),
        "tpot_p99_ms": round(1000 * pct(tpots, 99), 1),
        "peak_rss_mb": round(o.peak_rss_mb),
        "pages_in_use_after": o.pages_in_use_after,
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--targets", nargs="+", required=True, help="name=http://127.0.0.1:PORT/ROUTE ..."
    )
    parser.add_argument("--model", default="small")
    parser.add_argument("--clients", default="256,1024,2048", help="client counts, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32, help="words per prompt")
    parser.add_argument(
        "--time-limit", type=float, default=300.0, help="seconds per level (clients give up after)"
    )
    parser.add_argument(
        "--retry", action="store_true", help="retry 429/503 after Retry-After until the time limit"
    )
    parser.add_argument("--output", help="write the rows as JSON lines here")
    args = parser.parse_args(argv)
    targets = []
    for spec in args.targets:
        name, _, url = spec.partition("=")
        host = urlparse(url).hostname
        if host not in LOOPBACK:
            parser.error(f"{url}: overload runs are for loopback servers only")
        app = urlparse(url).path.strip("/") or "edgeacc"
        targets.append((name, url.rstrip("/"), app))
    rows = []
    for clients in (int(c) for c in args.clients.split(",")):
        for name, url, app in targets:
            rows.append(report(asyncio.run(run_level(name, url, app, clients, args))))
    for name, *_ in targets:
        best = max(r["goodput_tok_s"] for r in rows if r["target"] == name)
        for r in rows:
            if r["target"] == name:
                print(
                    f"{name} clients={r['clients']}: goodput {r['goodput_tok_s']} tok/s = "
                    f"{r['goodput_tok_s'] / best:.2f} of its best; mix {r['mix']}"
                )
    if args.output:
        with open(args.output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(
        "median goodput per target:",
        {
            name: statistics.median(r["goodput_tok_s"] for r in rows if r["target"] == name)
            for name, *_ in targets
        },
    )
    return rows


if __name__ == "__main__":
    main()
