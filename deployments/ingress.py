"""The HTTP entry deployment: the FastAPI app of `edgeacc_ray.http` over the engine side.

Thin by design: the routes live in `edgeacc_ray.http`; this class only wires the app to Ray Serve and
to a `ServeEngineClient`, so the Ingress does not change with the engine side's layout (a colocated
`EngineServer`, or Semi-PD's `DecodeServer` with its `PrefillServer`). With `http_server: ingress`
the replica is also the HTTP endpoint itself (`deployments/http_listener.py`), and Serve's proxy is
off.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.engine_client import ServeEngineClient
from deployments.http_listener import HttpListener
from edgeacc_ray.config import ServeConfig
from edgeacc_ray.http.app import build_api


@serve.deployment(
    name="Ingress",
    ray_actor_options={
        "num_cpus": 0
    },  # Ray's default of 1 CPU per replica does not fit a 2-core box
    max_ongoing_requests=1024,
    graceful_shutdown_timeout_s=5,
)
@serve.ingress()
class Ingress:
    async def __init__(self, config: dict[str, Any], engine: DeploymentHandle, tokenizer_path: str):
        cfg = ServeConfig.model_validate(config)
        self.api = build_api(cfg, ServeEngineClient(engine, cfg.engine_stream_mode), tokenizer_path)
        self.listener = (
            HttpListener(self.api, cfg.host, cfg.port, cfg.access_log)
            if cfg.http_server == "ingress"
            else None
        )

    def __serve_build_asgi_app__(self):
        return self.api

    def record_autoscaling_stats(self) -> dict[str, float]:
        """HTTP requests in flight here: what `IngressScalingPolicy` scales on."""
        return {"http_requests": float(self.api.state.in_flight.value)}

    def __del__(self):
        listener = getattr(self, "listener", None)
        if listener is not None:
            listener.close()
