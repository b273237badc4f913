"""Streaming client, target specs and launching, and both benchmark commands against a fake server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from benchmarks import bench_multiturn, bench_serving, cli
from benchmarks.client import stream_request
from benchmarks.report import read_jsonl
from benchmarks.targets import Target, parse_target, running


def sse(*chunks: dict | str) -> bytes:
    return b"".join(
        f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n".encode() for c in chunks
    )


def client_for(body: bytes, status: int = 200) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    )


def text_chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "text": text}]}


async def test_usage_counts_tokens_and_empty_chunks_do_not_start_ttft() -> None:
    body = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo there"}}]},
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": 3,
                "prompt_tokens_details": {"cached_tokens": 8},
            },
        },
        "[DONE]",
    )
    async with client_for(body) as client:
        r = await stream_request(
            client, "http://x", "m", [{"role": "user", "content": "hi"}], 3, prompt_len=5
        )
    assert r.success and r.text == "Hello there"
    assert (r.prompt_tokens, r.output_tokens, r.cached_tokens) == (12, 3, 8)
    assert len(r.itl) == 1 and 0 < r.ttft <= r.latency


async def test_without_usage_tokens_are_counted_by_chunks() -> None:
    async with client_for(
        sse(text_chunk("a"), text_chunk("b"), text_chunk("c"), "[DONE]")
    ) as client:
        r = await stream_request(client, "http://x", "m", "prompt", 3, prompt_len=5)
    assert r.success and (r.prompt_tokens, r.output_tokens, r.cached_tokens) == (5, 3, None)
    assert len(r.itl) == 2


@pytest.mark.parametrize(
    "body, status, error",
    [
        (b'{"error": "queue full"}', 429, "HTTP 429"),
        (sse({"error": {"message": "out of memory"}}), 200, "stream error"),
        (
            sse({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 0}}, "[DONE]"),
            200,
            "without any",
        ),
        (b"data: {not json\n\n", 200, "JSONDecodeError"),
    ],
)
async def test_failures_come_back_as_results(body: bytes, status: int, error: str) -> None:
    async with client_for(body, status) as client:
        r = await stream_request(client, "http://x", "m", "prompt", 3, prompt_len=5)
    assert not r.success and error in r.error


def test_target_specs() -> None:
    assert parse_target("ours=http://127.0.0.1:8000/") == Target("ours", "http://127.0.0.1:8000")
    vllm = parse_target(
        "vllm=cmd:python -m vllm.entrypoints.openai.api_server --model m --host 0.0.0.0 --port 8011"
    )
    assert vllm.url == "http://127.0.0.1:8011" and vllm.command.startswith("python -m vllm")
    assert parse_target("ours=cmd:serve run serve_config.yaml").url == "http://127.0.0.1:8000"
    both = parse_target("x=http://h:9/,cmd:run --port 9")
    assert (both.url, both.command) == ("http://h:9", "run --port 9")
    with pytest.raises(ValueError):
        parse_target("no-equals-sign")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launched_target_is_waited_for_and_stopped(tmp_path: Path) -> None:
    (tmp_path / "www" / "v1").mkdir(parents=True)
    (tmp_path / "www" / "v1" / "models").write_text('{"data": []}')
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = f"{sys.executable} -m http.server {port} --bind 127.0.0.1 --directory {tmp_path / 'www'}"
    with running([parse_target(f"web={url},cmd:{cmd}")], tmp_path):
        assert httpx.get(url + "/v1/models").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/v1/models")
    assert (tmp_path / "web.server.log").exists()


def fake_openai_app() -> Starlette:
    """Streams one ' tok' per requested token; a perfect prefix cache: chat history is 'cached'.
    Token counts are word counts; /metrics has SGLang's counters."""
    counters = {"prompt": 0, "cached": 0}

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"data": [{"id": "fake"}]})

    async def complete(request: Request) -> StreamingResponse:
        body = await request.json()
        if "messages" in body:
            words = [len(m["content"].split()) for m in body["messages"]]
            prompt, cached = sum(words), sum(words[:-1])
        else:
            prompt, cached = len(body["prompt"].split()), 0
        counters["prompt"] += prompt
        counters["cached"] += cached
        key = "delta" if "messages" in body else "text"

        async def stream() -> Iterator[str]:
            for _ in range(body["max_tokens"]):
                await asyncio.sleep(0.001)
                piece = {"content": " tok"} if key == "delta" else " tok"
                yield f"data: {json.dumps({'choices': [{'index': 0, key: piece}]})}\n\n"
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": body["max_tokens"],
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(
            f'sglang:prompt_tokens_total{{model_name="fake"}} {counters["prompt"]}\n'
            f'sglang:cached_tokens_total{{model_name="fake"}} {counters["cached"]}\n'
        )

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/completions", complete, methods=["POST"]),
            Route("/v1/chat/completions", complete, methods=["POST"]),
            Route("/metrics", metrics),
        ]
    )


@pytest.fixture(autouse=True)
def fast_host_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Look at the host's CPU for 10 ms instead of seconds around each run."""
    monkeypatch.setattr(cli, "HOST_SAMPLE_S", 0.01)
    monkeypatch.setattr(cli, "HOST_SETTLE_S", 0.0)


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(fake_openai_app(), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


def test_sweep_with_two_targets_writes_records_table_and_plots(
    fake_url: str, tiny_model_path: str, tmp_path: Path
) -> None:
    bench_serving.main(
        [
            "--targets",
            f"a={fake_url}",
            f"b={fake_url}",
            "--baseline",
            "b",
            "--model",
            "fake",
            "--tokenizer",
            tiny_model_path,
            "--dataset",
            "random",
            "--random-input-len",
            "20",
            "--random-output-len",
            "5",
            "--num-prompts",
            "6",
            "--max-concurrency",
            "2,4",
            "--request-rate",
            "200",
            "--output-dir",
            str(tmp_path),
        ]
    )
    records = read_jsonl([tmp_path / "results.jsonl"])
    assert [(r["system"], r["max_concurrency"]) for r in records] == [
        ("a", 2),
        ("b", 2),
        ("a", 4),
        ("b", 4),
    ]
    assert all(
        r["completed"] == 6 and r["failed"] == 0 and r["total_output_tokens"] == 30 for r in records
    )
    report = (tmp_path / "report.md").read_text()
    assert "| Concurrency | b | a | a / b |" in report and "### Mean TPOT (ms)" in report
    assert {p.name for p in tmp_path.glob("*.png")} >= {
        "output_throughput.png",
        "ttft.png",
        "tpot.png",
        "e2e.png",
    }


def test_multiturn_measures_hit_rate_both_ways(
    fake_url: str, tiny_model_path: str, tmp_path: Path
) -> None:
    [record] = bench_multiturn.main(
        [
            "--base-url",
            fake_url,
            "--name",
            "fake",
            "--model",
            "fake",
            "--tokenizer",
            tiny_model_path,
            "--num-conversations",
            "3",
            "--num-rounds",
            "3",
            "--max-concurrency",
            "2",
            "--first-len",
            "30",
            "--turn-len",
            "10",
            "--output-len",
            "4",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert (record["completed"], record["failed"], record["skipped"]) == (9, 0, 0)
    # Word counts: round prompts 30, 44, 58 per conversation; history 0, 34, 48.
    assert record["hit_rate_usage"] == pytest.approx(82 / 132)
    assert record["hit_rate_metrics"] == pytest.approx(82 / 132)
    assert record["hit_rate_ideal"] == pytest.approx(82 / 132)
    assert [row["mean_prompt_tokens"] for row in record["per_round"]] == [30, 44, 58]
    assert "### Mean E2E latency per round (ms)" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "multiturn_e2e.png").exists()


async def test_quiet_host_reports_busy_cores() -> None:
    busy = await cli.quiet_host(max_busy=float(os.cpu_count() or 1), timeout=5.0)
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 0.01
