"""Everything that is not generation: the model list, health, server and model info (SGLang),
the prefix cache flush and /metrics."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

import edgeacc_ray
from edgeacc_ray.engine.request import SamplingParams
from edgeacc_ray.http import metrics
from edgeacc_ray.http.context import ApiContext
from edgeacc_ray.http.engine_request import EngineRequest
from edgeacc_ray.http.errors import APIError, unavailable
from edgeacc_ray.http.protocol.common import new_id

HEALTH_GENERATE_TIMEOUT_S = 30.0


def router(ctx: ApiContext) -> APIRouter:
    api = APIRouter()

    def model_card() -> dict[str, Any]:
        info = ctx.health.info or {}
        return {
            "id": ctx.model_name,
            "object": "model",
            "created": ctx.created,
            "owned_by": "edgeacc-ray",
            "root": info.get("model_path", ctx.config.model),
            "parent": None,
            "max_model_len": info.get("max_model_len"),
        }

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        ctx.pre.check_model(model_id)
        return model_card()

    @api.get("/health")
    async def health() -> Response:
        """200 while the engine side can serve; 503 (with Retry-After) while it cannot."""
        await ctx.health.check()
        return Response(status_code=200)

    @api.get("/health_generate")
    async def health_generate() -> Response:
        """Generate one token through the whole path (SGLang's deep health check)."""
        ctx.health.require()
        ids = ctx.pre.tokenizer.encode("ping", add_special_tokens=True) or [0]
        req = EngineRequest(
            ctx.client, new_id("health"), ids, SamplingParams(max_tokens=1, temperature=0.0), {}
        )
        try:
            await asyncio.wait_for(_run(req), timeout=HEALTH_GENERATE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise unavailable(
                "the engine did not generate a token in time", code="unhealthy"
            ) from None
        except APIError as exc:
            if exc.status == 429:  # busy serving others: its refusal came from a live engine
                return Response(status_code=200)
            raise unavailable(
                f"the engine did not generate: {exc.message}", code="unhealthy"
            ) from None
        return Response(status_code=200)

    @api.get("/get_model_info")
    async def get_model_info() -> dict[str, Any]:
        info = ctx.health.require()
        return {
            "model_path": info.get("model_path"),
            "tokenizer_path": ctx.pre.tokenizer_path,
            "is_generation": True,
            "preferred_sampling_params": ctx.pre.sampling_defaults.from_model() or None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "served_model_name": ctx.model_name,
            "max_model_len": info.get("max_model_len"),
            "model_info": info,
        }

    @api.get("/get_server_info")
    async def get_server_info() -> dict[str, Any]:
        info = ctx.health.require()
        stats = await ctx.stats()
        internal = {}
        if stats is not None:
            internal = {
                "num_running_reqs": stats.num_running,
                "num_queue_reqs": stats.num_waiting,
                "token_usage": min(max(stats.kv_usage, 0.0), 1.0),
                "cache_hit_rate": stats.cache_hit_rate,
                "num_free_pages": stats.num_free_pages,
                "num_total_pages": stats.num_total_pages,
                "num_cached_pages": stats.num_cached_pages,
                "requests_finished_total": stats.requests_finished_total,
                "requests_aborted_total": stats.requests_aborted_total,
                "num_prefilling_reqs": stats.num_prefilling,
                "semi_pd_split": dataclasses.asdict(stats.split)
                if stats.split is not None
                else None,
                "slo_targets": {t.name: dataclasses.asdict(t) for t in stats.targets},
            }
        return {
            **ctx.config.public_dict(),
            "served_model_name": ctx.model_name,
            "model_info": info,
            "default_sampling_params": ctx.pre.sampling_defaults.from_model(),
            "internal_states": [internal],
            "version": edgeacc_ray.__version__,
            "mode": ctx.config.pd_mode,
        }

    @api.get("/flush_cache")
    @api.post("/flush_cache")
    async def flush_cache() -> Response:
        """Drop the unreferenced prefix-cache pages (pages of running requests stay)."""
        ctx.health.require()
        try:
            await ctx.client.flush_cache()
        except Exception:
            raise unavailable("could not reach the engine; retry shortly") from None
        return PlainTextResponse("Cache flushed.\n", status_code=200)

    @api.get("/metrics")
    async def prometheus_metrics() -> Response:
        body = metrics.render(ctx.model_name, await ctx.stats(), ctx.http_in_flight)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    return api


async def _run(req: EngineRequest) -> None:
    await req.start()
    await req.collect()
