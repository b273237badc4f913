"""Command-line pieces shared by bench_serving and bench_multiturn: targets, presets, warm-up, output."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import httpx

from benchmarks.client import stream_request
from benchmarks.datasets import random_requests
from benchmarks.report import write_report
from benchmarks.targets import Target, parse_target

QUIET_TIMEOUT_S = 600.0
HOST_SAMPLE_S = 1.0  # how long each look at the host's CPU lasts
HOST_SETTLE_S = 1.0  # pause after a run before looking (the server winds down)


def add_common_args(
    parser: argparse.ArgumentParser, presets: Mapping[str, Mapping[str, Any]]
) -> None:
    """Target selection, model/tokenizer, sampling, warm-up, seed, output folder and --scale."""
    where = parser.add_argument_group("targets")
    where.add_argument("--base-url", help="one server, e.g. http://127.0.0.1:8000")
    where.add_argument("--name", default="server", help="its name in tables (with --base-url)")
    where.add_argument(
        "--targets",
        nargs="+",
        metavar="SPEC",
        help="several servers, run interleaved: NAME=URL, NAME=cmd:COMMAND or NAME=URL,cmd:COMMAND",
    )
    where.add_argument(
        "--baseline", help="system the ratios are against (default: the first target)"
    )
    parser.add_argument(
        "--model",
        required=True,
        help="model name sent to the server (the first one it lists if it does not list this "
        "one); also the tokenizer when it is a folder or a built-in model name",
    )
    parser.add_argument("--tokenizer", help="HF tokenizer folder (default: from --model)")
    parser.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generate exactly the requested output length (default: on)",
    )
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=2,
        help="short requests sent to each target before each measured run",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        metavar="CORES",
        help=f"before each run, wait (up to {QUIET_TIMEOUT_S:.0f} s) until other processes keep at "
        "most this many cores busy, e.g. 0.2 on a shared box",
    )
    parser.add_argument("--output-dir", type=Path, help="default: bench_results/<kind>-<time>")
    choices = ", ".join(
        f"{k}: " + " ".join(f"--{a.replace('_', '-')} {v}" for a, v in p.items())
        for k, p in presets.items()
    )
    parser.add_argument(
        "--scale",
        choices=list(presets),
        default=next(iter(presets)),
        help=f"defaults for the flags not given ({choices})",
    )


def apply_scale(args: argparse.Namespace, presets: Mapping[str, Mapping[str, Any]]) -> None:
    """Fill every flag left at None from the chosen --scale preset."""
    for key, value in presets[args.scale].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def targets_from_args(args: argparse.Namespace) -> list[Target]:
    """The targets named by --targets, or the single --base-url one."""
    if bool(args.targets) == bool(args.base_url):
        raise SystemExit("give exactly one of --base-url and --targets")
    if args.targets:
        targets = [parse_target(spec) for spec in args.targets]
    else:
        targets = [Target(args.name, args.base_url.rstrip("/"))]
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise SystemExit(f"target names must differ: {names}")
    if args.baseline is not None and args.baseline not in names:
        raise SystemExit(f"--baseline {args.baseline} is not one of {names}")
    return targets


def output_dir(args: argparse.Namespace, kind: str) -> Path:
    """The run's output folder, created."""
    path = args.output_dir or Path("bench_results") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that ran `module` with `argv` (default: this process's arguments), shell-quoted."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m", module, *map(shlex.quote, args)])


async def warm_up(
    client: httpx.AsyncClient, url: str, model: str, tokenizer: Any, num: int, seed: int, chat: bool
) -> None:
    """Send `num` concurrent short requests (64 tokens in, 16 out); raise if every one fails."""
    if num <= 0:
        return
    reqs = random_requests(tokenizer, num, 64, 16, seed)
    results = await asyncio.gather(
        *(
            stream_request(
                client,
                url,
                model,
                [{"role": "user", "content": r.prompt}] if chat else r.prompt,
                r.output_len,
                r.prompt_len,
            )
            for r in reqs
        )
    )
    if not any(r.success for r in results):
        raise RuntimeError(f"warm-up failed against {url}: {results[0].error}")


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


async def busy_cores(settle: bool = False) -> float | None:
    """How many cores the machine keeps busy over HOST_SAMPLE_S, after HOST_SETTLE_S if `settle`
    (None off Linux). Taken while the servers under test are idle, it shows what else is running."""
    if not os.path.exists("/proc/stat"):
        return None
    await asyncio.sleep(HOST_SETTLE_S if settle else 0.0)
    busy0, total0 = _cpu_jiffies()
    await asyncio.sleep(HOST_SAMPLE_S)
    busy1, total1 = _cpu_jiffies()
    return (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)


async def quiet_host(max_busy: float | None, timeout: float = QUIET_TIMEOUT_S) -> float | None:
    """Cores busy on the host now; with `max_busy`, first wait (up to `timeout`) until at most that."""
    deadline = time.monotonic() + timeout
    busy = await busy_cores()
    while (
        max_busy is not None
        and busy is not None
        and busy > max_busy
        and time.monotonic() < deadline
    ):
        busy = await busy_cores()
    return busy


def finish(
    records: Sequence[Mapping[str, Any]], out: Path, baseline: str | None, header: str
) -> None:
    """Write report.md and the plots for the run's records, and print the report."""
    report = write_report(records, out, baseline, header)
    print(report.read_text(encoding="utf-8"))
    print(f"results in {out.resolve()}")


def print_summary(title: str, record: Mapping[str, Any], keys: Sequence[str]) -> None:
    """A short block of `key: value` lines for one run."""
    print(f"--- {title} ---")
    for key in keys:
        value = record.get(key)
        print(f"  {key:<22} {value:.2f}" if isinstance(value, float) else f"  {key:<22} {value}")
    if record.get("errors"):
        print(f"  errors: {record['errors']}")
