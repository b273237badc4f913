"""The colocated engine deployment: one native engine does prefill and decode (the baseline, like SGLang)."""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.engine_service import ENGINE_REPLICA_OPTIONS, EngineService
from edgeacc_ray.config import ConfigError, ServeConfig


@serve.deployment(name="EngineServer", max_ongoing_requests=1024, **ENGINE_REPLICA_OPTIONS)
class EngineServer(EngineService):
    def __init__(self, config: dict[str, Any]):
        super().__init__(ServeConfig.model_validate(config))


def tensor_parallel_options(
    cfg: ServeConfig, model_path: str, actor_options: dict[str, Any]
) -> dict[str, Any]:
    """EngineServer's placement under tensor parallelism: one bundle per rank, all on one node
    (STRICT_PACK); the replica (rank 0) takes bundle 0 and starts its ranks in the others
    (edgeacc_ray/engine/tp/ranks.py). Raises ConfigError, naming tensor_parallel_size, for a model
    whose heads do not split over that many ranks (checked here, before anything is deployed)."""
    tp = cfg.tensor_parallel_size
    if tp == 1:
        return {}
    from edgeacc_ray.engine.tp import rank_bundle
    from edgeacc_ray.models.loader import read_model_args
    from edgeacc_ray.models.tp_shard import ShardingError, check_shardable

    try:
        check_shardable(read_model_args(model_path)[0], tp)
    except ShardingError as exc:
        raise ConfigError(f"invalid EdgeAcc serving config:\n  {exc.field}: {exc}") from None
    bundle = rank_bundle(
        actor_options.get("num_cpus", 0),
        actor_options.get("num_gpus", 0),
        actor_options.get("resources"),
    )
    return dict(placement_group_bundles=[bundle] * tp, placement_group_strategy="STRICT_PACK")
