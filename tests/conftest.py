"""Shared fixtures: built-in model folders and one Ray cluster for the whole test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from edgeacc_ray.models.builtin_models import resolve_model

    return str(resolve_model("tiny"))


# ---- Ray cluster and the served application (shared by every test that needs them) ---------------

SERVE_TEST_ARGS = {
    "model": "tiny",
    "served_model_name": "tiny",
    "kv_cache_memory_gb": 0.25,
    "num_threads": 1,
    "stream_interval": 4,
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (2 CPUs, 1 declared GPU for placement tests)."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=1,
            include_dashboard=False,
            namespace="edgeacc_tests",
            log_to_driver=False,
        )
        started = True
    yield ray
    if started:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def serve_http_url(ray_cluster) -> str:
    """Start Ray Serve's proxy on a free local port; returns its base URL (no application yet)."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def serve_app_url(serve_http_url) -> str:
    """The EdgeAcc application (Ingress -> colocated EngineServer) serving the built-in tiny model as
    "tiny" at the returned base URL (OpenAI API under /v1)."""
    import time

    import httpx
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(SERVE_TEST_ARGS), name="edgeacc", route_prefix="/")
    deadline = time.monotonic() + 120
    while True:  # the Ingress answers 503 until the engine has loaded the model
        try:
            if httpx.get(serve_http_url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the EdgeAcc application did not become healthy in 120 s")
        time.sleep(0.2)
    yield serve_http_url
    serve.delete("edgeacc")
