"""The colocated engine deployment: one native engine does prefill and decode (the baseline, like SGLang)."""
from __future__ import annotations

from typing import Any

from ray import serve

from deployments.engine_service import EngineService
from edgeacc_ray.config import ServeConfig


@serve.deployment(
    name="EngineServer",
    ray_actor_options={"num_cpus": 0},  # DESIGN §5: Ray's default of 1 CPU per replica does not fit 2 cores
    max_ongoing_requests=1024,
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=5,
)
class EngineServer(EngineService):
    def __init__(self, config: dict[str, Any]):
        super().__init__(ServeConfig.model_validate(config))
