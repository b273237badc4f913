"""What several test files need around a served app: the HTTP app over an in-process engine (no
Ray), and a Serve replica's process found by the title Ray gives it."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from fastapi.testclient import TestClient

from edgeacc_ray.config import ServeConfig
from edgeacc_ray.http.app import build_api
from edgeacc_ray.http.local_engine_client import LocalEngineClient


@contextlib.contextmanager
def local_app(cfg: ServeConfig, **client_kw) -> Iterator[TestClient]:
    """A TestClient on the ASGI app over an engine in this process, once /health is 200."""
    engine = LocalEngineClient(cfg.engine_config())
    try:
        with TestClient(build_api(cfg, engine, engine.model_path), **client_kw) as http:
            deadline = time.monotonic() + 30
            while http.get("/health").status_code != 200:
                assert time.monotonic() < deadline, "the app did not become healthy"
                time.sleep(0.05)
            yield http
    finally:
        engine.shutdown()


def replica_pids(app: str, deployment: str) -> list[int]:
    """The replicas' processes, found by the title Ray gives them (`ray::ServeReplica:APP:DEPLOYMENT`)."""
    title = f"ServeReplica:{app}:{deployment}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if title in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def replica_pid(app: str, deployment: str) -> int:
    """The process of a deployment's only replica."""
    pids = replica_pids(app, deployment)
    assert len(pids) == 1, pids
    return pids[0]


def serve_app(args: dict, name: str, base_url: str, route: str) -> str:
    """Deploy the EdgeAcc application `name` at `route` and return its URL once it generates."""
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(args), name=name, route_prefix=route)
    url = base_url + route
    wait_serving(url, 120)
    return url


def wait_serving(base: str, timeout: float) -> None:
    """Until the application generates a token (after a start or a replica's restart)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.post(
                base + "/generate",
                json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 1}},
                timeout=30,
            )
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the application at {base} did not come back"
        time.sleep(0.3)


def record_stream(url: str, path: str, body: dict, results: dict, key: str) -> None:
    """One streaming request: records (chunks received, None or how it ended badly: an HTTP status,
    the SSE error event, a connection error) under `key`."""
    import httpx

    tokens, error = 0, None
    try:
        with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=120) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}"
            for line in r.iter_lines():
                if line.startswith("data: ") and '"error"' in line:
                    error = line
                elif line.startswith("data: {"):
                    tokens += 1
    except httpx.HTTPError as exc:
        error = type(exc).__name__
    results[key] = (tokens, error)
