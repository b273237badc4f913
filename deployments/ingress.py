"""The HTTP entry deployment: FastAPI (OpenAI + SGLang-native routes) over the engine side.

Thin by design: the routes live in `edgeacc_ray.api_server.ApiServer`; this class only wires it to
Ray Serve and to an `EngineClient`, so the Ingress does not change when the engine side is laid out
differently (colocated today; Semi-PD prefill/decode servers and admission later).
"""
from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.engine_client import EngineClient
from edgeacc_ray.api_server import ApiServer
from edgeacc_ray.config import ServeConfig


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0},  # DESIGN §5
    max_ongoing_requests=1024,
    graceful_shutdown_timeout_s=5,
)
@serve.ingress()
class Ingress:
    def __init__(self, config: dict[str, Any], engine: DeploymentHandle, tokenizer_path: str):
        self.config = ServeConfig.model_validate(config)
        self.server = ApiServer(self.config, EngineClient(engine, self.config.engine_stream_mode), tokenizer_path)

    def __serve_build_asgi_app__(self):
        return self.server.app
