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


def replica_pid(app: str, deployment: str) -> int:
    """The replica's process, found by the title Ray gives it (`ray::ServeReplica:APP:DEPLOYMENT`)."""
    title = f"ServeReplica:{app}:{deployment}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if title in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    assert len(pids) == 1, pids
    return pids[0]
