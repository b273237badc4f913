"""`build_app(args)`: the application `serve_config.yaml` imports (`deployments.app:build_app`).

    serve run serve_config.yaml                      # args from the YAML, then the environment
    serve run deployments.app:build_app model=small  # args on the command line
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from ray.serve import Application

from deployments.decode_server import DecodeServer
from deployments.engine_server import EngineServer
from deployments.prefill_server import PrefillServer
from deployments.ingress import Ingress
from edgeacc_ray.config import ConfigError, ServeConfig

logger = logging.getLogger("ray.serve")


def resolve_model_path(model: str) -> str:
    """An HF folder as given, or the folder of a built-in model, the default SmolLM2 or a .gguf file
    (fetched, built or converted on first use, then cached)."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    from edgeacc_ray.builtin_models import resolve_model

    from edgeacc_ray.smollm2 import ModelFetchError

    try:
        return str(resolve_model(model))
    except (ValueError, FileNotFoundError, ModelFetchError) as exc:  # unknown name, bad GGUF, no registry
        raise ConfigError(f"invalid EdgeAcc serving config:\n  model: {model!r}: {exc}") from None


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    """Validate the settings (args over environment) and bind Ingress -> EngineServer (colocated) or
    Ingress -> DecodeServer -> PrefillServer (semi_pd)."""
    cfg = ServeConfig.from_sources(args)
    model_path = resolve_model_path(cfg.model)
    if cfg.enable_edge_acc:
        logger.info("enable_edge_acc=True: pd_mode=%s, enable_hierarchical_cache=%s (KV offload tier, %.1f GB), "
                    "dynamic running bound (tpot_slo_ms=%s)", cfg.pd_mode, cfg.enable_hierarchical_cache,
                    cfg.kv_cache_offload_memory_gb, cfg.tpot_slo_ms)
    config = cfg.model_dump()
    actor_options = {"num_cpus": cfg.engine_num_cpus, "num_gpus": cfg.engine_num_gpus,
                     **({"resources": dict(cfg.engine_resources)} if cfg.engine_resources else {})}
    serve_options = dict(max_ongoing_requests=cfg.engine_max_ongoing_requests)
    if cfg.pd_mode == "semi_pd":
        prefill = PrefillServer.options(ray_actor_options=actor_options).bind(config)
        engine = DecodeServer.options(ray_actor_options=actor_options, **serve_options).bind(config, prefill)
    else:
        engine = EngineServer.options(ray_actor_options=actor_options, **serve_options).bind(config)
    return Ingress.options(
        num_replicas=cfg.ingress_num_replicas,
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(config, engine, model_path)
