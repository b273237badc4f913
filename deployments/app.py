"""`build_app(args)`: the application `serve_config.yaml` imports (`deployments.app:build_app`).

serve run serve_config.yaml                      # args from the YAML, then the environment
serve run deployments.app:build_app model=small  # args on the command line
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from deployments.decode_server import DecodeServer
from deployments.engine_server import EngineServer, tensor_parallel_options
from deployments.ingress import Ingress
from deployments.prefill_server import PrefillServer
from deployments.sglang_server import bind_sglang_engine, require_sglang
from edgeacc_ray.config import ConfigError, ServeConfig
from edgeacc_ray.http.inflight import FULL_RETRY_AFTER_S

logger = logging.getLogger("ray.serve")

ROUTING_STATS_PERIOD_S = 1.0  # how often each engine replica reports its load to the routers


def resolve_model_path(model: str) -> str:
    """An HF folder as given, or the folder of a built-in model, the default SmolLM2 or a .gguf file
    (fetched, built or converted on first use, then cached)."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    from edgeacc_ray.models.builtin_models import resolve_model
    from edgeacc_ray.models.smollm2 import ModelFetchError

    try:
        return str(resolve_model(model))
    except (
        ValueError,
        FileNotFoundError,
        ModelFetchError,
    ) as exc:  # unknown name, bad GGUF, no registry
        raise ConfigError(f"invalid EdgeAcc serving config:\n  model: {model!r}: {exc}") from None


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    """Validate the settings (args over environment) and bind Ingress -> EngineServer (colocated) or
    Ingress -> DecodeServer -> PrefillServer (semi_pd)."""
    cfg = ServeConfig.from_sources(args)
    model_path = resolve_model_path(cfg.model)
    if cfg.enable_edge_acc:
        logger.info(
            "enable_edge_acc=True: pd_mode=%s, enable_hierarchical_cache=%s (KV offload tier, %.1f GB), "
            "running bound (tpot_slo_ms=%s)",
            cfg.pd_mode,
            cfg.enable_hierarchical_cache,
            cfg.kv_cache_offload_memory_gb,
            cfg.tpot_slo_ms,
        )
    config = cfg.model_dump()
    actor_options = {
        "num_cpus": cfg.engine_num_cpus,
        "num_gpus": cfg.engine_num_gpus,
        **({"resources": dict(cfg.engine_resources)} if cfg.engine_resources else {}),
    }
    serve_options = dict(
        max_ongoing_requests=cfg.engine_max_ongoing_requests,
        request_router_config=engine_router(cfg),
        **cfg.engine_replicas.serve_options(cfg.ttft_slo_ms / 1000 if cfg.ttft_slo_ms else None),
    )
    if (
        cfg.backend == "sglang"
    ):  # SGLang engines behind the same interface (deployments/sglang_server.py)
        require_sglang()
        engine = bind_sglang_engine(cfg, model_path, serve_options)
    elif cfg.pd_mode == "semi_pd":
        # As many PrefillServers as DecodeServers (fixed: the config refuses autoscaled pairs); each decode
        # replica claims one prefill replica and pins its batches there (deployments/prefill_server.py).
        prefill = PrefillServer.options(
            ray_actor_options=actor_options,
            request_router_config=engine_router(cfg),
            num_replicas=cfg.engine_replicas.min_replicas,
        ).bind(config)
        engine = DecodeServer.options(ray_actor_options=actor_options, **serve_options).bind(
            config, prefill
        )
    else:
        engine = EngineServer.options(
            ray_actor_options=actor_options,
            **serve_options,
            **tensor_parallel_options(cfg, model_path, actor_options),
        ).bind(config)
    return Ingress.options(
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        max_queued_requests=cfg.ingress_max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=FULL_RETRY_AFTER_S),
        ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": cfg.access_log},
        **cfg.ingress_replicas.serve_options(),
    ).bind(config, engine, model_path)


def engine_router(cfg: ServeConfig) -> RequestRouterConfig:
    """`EngineRouter` for the engine deployment: pins each Ingress's streams to their replica, and places new
    requests by prefix (cache_aware) or load (least_loaded)."""
    return RequestRouterConfig(
        request_router_class="deployments.engine_router:EngineRouter",
        request_router_kwargs={
            "page_size": cfg.page_size,
            "imbalance": cfg.router_imbalance,
            "prefix_affinity": cfg.request_router == "cache_aware" and cfg.enable_prefix_caching,
        },
        request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
        request_routing_stats_timeout_s=5,
    )
