"""The engine client for an engine in this process: the HTTP app over an `AsyncLLMEngine` without
Ray (fast tests of the HTTP layer, and single-process use)."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from edgeacc_ray.config import EngineConfig
from edgeacc_ray.engine import AsyncLLMEngine
from edgeacc_ray.engine.request import EngineStats, RequestOutput, SamplingParams


class LocalEngineClient:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = AsyncLLMEngine(config)

    @property
    def model_path(self) -> str:
        return self.engine.model_info["model_path"]

    async def model_info(self) -> dict[str, Any]:
        return dict(self.engine.model_info)

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        return self.engine.generate(request_id, prompt_token_ids, params)

    async def stats(self) -> EngineStats:
        return self.engine.stats()

    async def flush_cache(self) -> None:
        await asyncio.to_thread(self.engine.flush_cache)

    def on_unavailable(self, callback: Callable[[], None]) -> None:
        """An engine in this process does not come and go."""

    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """The engine outlives the app (`shutdown()` ends it)."""

    def shutdown(self) -> None:
        self.engine.shutdown()
