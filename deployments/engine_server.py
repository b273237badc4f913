"""The colocated engine deployment: one native engine does prefill and decode (the baseline, like SGLang)."""
from __future__ import annotations

from typing import Any

from ray import serve

from deployments.engine_service import ENGINE_REPLICA_OPTIONS, EngineService
from edgeacc_ray.config import ServeConfig


@serve.deployment(name="EngineServer", max_ongoing_requests=1024, **ENGINE_REPLICA_OPTIONS)
class EngineServer(EngineService):
    def __init__(self, config: dict[str, Any]):
        super().__init__(ServeConfig.model_validate(config))
