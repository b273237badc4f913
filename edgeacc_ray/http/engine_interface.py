"""What the HTTP layer needs from the engine side, whatever runs it: a Ray deployment
(`deployments/engine_client.py`) or an engine in this process (`local_engine_client.py`)."""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Protocol

from edgeacc_ray.engine.request import EngineStats, RequestOutput, SamplingParams


class EngineClient(Protocol):
    async def model_info(self) -> dict[str, Any]:
        """The served model's facts (max_model_len, vocab_size, ...); raises while the engine is not up."""

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """The request's output chunks. Raises `InvalidRequest` (refused) or `EngineUnavailable`;
        closing the iterator early aborts the request in the engine."""

    async def stats(self) -> EngineStats: ...

    async def flush_cache(self) -> None: ...

    def on_unavailable(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever the client finds the engine side gone (so health can say so at once)."""

    async def start(self) -> None:
        """Open whatever the client keeps open to the engine side (once the engine is up)."""

    async def close(self) -> None: ...
