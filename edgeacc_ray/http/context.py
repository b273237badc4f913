"""What every route shares: the settings, the engine client, the preprocessor, the engine's health,
and the steps every generation endpoint takes (start the engine requests, stream the answer)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi.responses import StreamingResponse

from edgeacc_ray.config import ServeConfig
from edgeacc_ray.engine.request import EngineStats
from edgeacc_ray.http.engine_health import EngineHealth
from edgeacc_ray.http.engine_interface import EngineClient
from edgeacc_ray.http.engine_request import EngineRequest, start_all
from edgeacc_ray.http.preprocess import Prepared, Preprocessor
from edgeacc_ray.http.protocol.common import now
from edgeacc_ray.http.sse import stream_response

STATS_TIMEOUT_S = 5.0


class ApiContext:
    def __init__(self, config: ServeConfig, client: EngineClient, tokenizer_path: str) -> None:
        self.config = config
        self.client = client
        self.pre = Preprocessor(config, tokenizer_path)
        self.health = EngineHealth(client)
        self.model_name = config.model_name
        self.created = now()
        self.http_in_flight = 0

    def max_model_len(self) -> int:
        return self.health.require()["max_model_len"]

    async def start(self, prepared: Prepared, base_id: str) -> list[EngineRequest]:
        """Start the engine requests of an API request; all of them, or none (the first error raised)."""
        self.health.require()
        reqs = [
            EngineRequest(self.client, rid, ids, params, prepared.param_names)
            for rid, ids, params in prepared.engine_requests(base_id)
        ]
        await start_all(reqs)
        return reqs

    def stream(self, events: AsyncIterator[str]) -> StreamingResponse:
        def opened() -> None:
            self.http_in_flight += 1

        def closed() -> None:
            self.http_in_flight -= 1

        return stream_response(events, opened, closed)

    async def stats(self) -> EngineStats | None:
        """The engine's stats, or None when it cannot be reached now."""
        if self.health.info is None or self.health.down:
            return None
        try:
            return await asyncio.wait_for(self.client.stats(), timeout=STATS_TIMEOUT_S)
        except Exception:
            return None
