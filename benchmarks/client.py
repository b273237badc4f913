"""Async streaming client for OpenAI-compatible servers (/v1/completions and /v1/chat/completions).

Timing follows SGLang's bench_serving: TTFT is the time to the first chunk with non-empty text, ITL
the gaps between later non-empty chunks, E2E the time until the stream ends. Output tokens come from
the final `usage` chunk (`stream_options.include_usage`); servers that send none are counted by chunks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

REQUEST_TIMEOUT_S = 3600.0
Messages = list[dict[str, str]]


@dataclass
class RequestResult:
    """What one streamed request measured. Times are seconds; `start` is a perf_counter value."""

    success: bool = False
    error: str = ""
    status: int = 0  # HTTP status (0: no response)
    retry_after: str | None = None  # the Retry-After header of a refusal
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int | None = None
    text: str = ""


def make_client(max_connections: int | None = None) -> httpx.AsyncClient:
    """An httpx client with no pool limit below `max_connections` and long read timeouts."""
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0))


def build_payload(
    model: str, prompt: str | Messages, max_tokens: int, ignore_eos: bool
) -> tuple[str, dict[str, Any]]:
    """The endpoint path and JSON body: greedy, streamed, usage requested."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    if isinstance(prompt, str):
        return "/v1/completions", body | {"prompt": prompt}
    return "/v1/chat/completions", body | {"messages": prompt}


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text in one streamed chunk (completions `text` or chat `delta` content)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice["text"] or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


async def stream_request(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    prompt: str | Messages,
    max_tokens: int,
    prompt_len: int,
    ignore_eos: bool = True,
) -> RequestResult:
    """Send one streaming request and time it; never raises, failures come back with `error` set.

    `prompt_len` (the client's own count) stands in for `prompt_tokens` until the server reports usage.
    """
    path, body = build_payload(model, prompt, max_tokens, ignore_eos)
    result = RequestResult(prompt_tokens=prompt_len)
    chunks: list[str] = []
    result.start = last = time.perf_counter()
    try:
        async with client.stream("POST", base_url.rstrip("/") + path, json=body) as resp:
            result.status, result.retry_after = resp.status_code, resp.headers.get("retry-after")
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:300]
                result.error = f"HTTP {resp.status_code}: {detail}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return result
                text = chunk_text(chunk)
                if text:
                    now = time.perf_counter()
                    if chunks:
                        result.itl.append(now - last)
                    else:
                        result.ttft = now - result.start
                    last = now
                    chunks.append(text)
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", prompt_len)
                    result.output_tokens = usage.get("completion_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        result.cached_tokens = int(details["cached_tokens"])
        result.latency = time.perf_counter() - result.start
    except Exception as exc:  # any failure of one request is data, not a crash of the run
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if not chunks:
        result.error = "stream ended without any generated text"
        return result
    result.text = "".join(chunks)
    result.output_tokens = result.output_tokens or len(chunks)
    result.success = True
    return result


async def get_json(client: httpx.AsyncClient, url: str) -> Any:
    """GET `url` and decode its JSON body (raises on HTTP errors)."""
    resp = await client.get(url)
    resp.raise_for_status()
    return resp.json()


async def served_model(client: httpx.AsyncClient, base_url: str, wanted: str) -> str:
    """`wanted` if the server lists it under /v1/models, else the first model it lists."""
    models = [
        m["id"] for m in (await get_json(client, base_url.rstrip("/") + "/v1/models"))["data"]
    ]
    return wanted if wanted in models else models[0]


async def get_metrics_text(client: httpx.AsyncClient, base_url: str) -> str | None:
    """The server's Prometheus /metrics text, or None when it has none."""
    try:
        resp = await client.get(base_url.rstrip("/") + "/metrics")
    except httpx.HTTPError:
        return None
    return resp.text if resp.status_code == 200 else None
