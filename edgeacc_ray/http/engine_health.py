"""Whether the engine side can serve, as the HTTP layer tells clients: not ready until the engine
has loaded the model; down from the moment the client finds it gone (a lost stream, a dead replica)
until a probe reaches it again. While not serving, generation requests and /health get 503 with
Retry-After at once instead of queueing silently behind a restart."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from edgeacc_ray.http.engine_interface import EngineClient
from edgeacc_ray.http.errors import unavailable

logger = logging.getLogger("ray.serve")

PROBE_TIMEOUT_S = (
    2.0  # a call that takes longer finds no engine (Serve queues calls to a missing replica)
)
FIRST_PROBE_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 5.0  # the first model_info waits for the model to load


class EngineHealth:
    def __init__(self, client: EngineClient) -> None:
        self.client = client
        self.info: dict[str, Any] | None = (
            None  # the model's facts, once the engine was first reached
        )
        self.down = False
        self._probe: asyncio.Task | None = None
        client.on_unavailable(self.mark_down)

    def start(self) -> None:
        """Begin waiting for the engine (at app start-up)."""
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._wait_until_up(FIRST_PROBE_TIMEOUT_S))

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)

    def mark_down(self) -> None:
        """The engine side was found gone: answer 503 until a probe reaches it again."""
        if self.info is None or self.down:
            return
        logger.warning("the engine side is unavailable; answering 503 until it is back")
        self.down = True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._wait_until_up(PROBE_TIMEOUT_S))

    async def _wait_until_up(self, timeout: float) -> None:
        delay = 0.2
        while True:
            try:
                info = await asyncio.wait_for(self.client.model_info(), timeout=timeout)
                await self.client.start()
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # not placed yet, loading, restarting
                logger.info("engine not reachable yet (%s)", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if self.info is None:
            logger.info("engine ready: %s", info)
        elif self.down:
            logger.info("the engine side is back")
        self.info, self.down = info, False

    def require(self) -> dict[str, Any]:
        """The model's facts, or the 503 that says why the engine cannot serve now."""
        if self.info is None:
            raise unavailable(
                "the server is not ready yet: the engine is still starting (loading the model)",
                code="not_ready",
            )
        if self.down:
            raise unavailable("the engine is restarting; retry shortly")
        return self.info

    async def check(self) -> None:
        """/health: reach the engine now (bounded), so an outage shows even before a request finds it."""
        self.require()
        try:
            await asyncio.wait_for(self.client.model_info(), timeout=HEALTH_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except (
            Exception
        ):  # slow under load is not dead: only the client's own findings mark it down
            raise unavailable("the engine did not answer; retry shortly") from None
