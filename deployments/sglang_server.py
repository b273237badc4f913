"""The engine-side deployments of `backend: sglang`, and where Ray places them.

- colocated: `SGLangEngineServer`, one SGLang engine per replica over `tensor_parallel_size` GPUs. The
  replica's placement group is its own bundle plus one {GPU: 1} bundle per TP rank, STRICT_PACK (one
  node); SGLang's `RayEngine` starts each rank as a Ray actor in its bundle (SGLANG_RAY_BUNDLE_INDICES).
- semi_pd (tensor_parallel_size 1): `SGLangDecodeServer` + `SGLangPrefillServer`, SGLang engines in
  disaggregation modes decode / prefill, each on a fraction of one GPU (`num_gpus`: prefill_gpu_share and
  the rest, so a one-GPU node holds both) with its memory fraction set to match. The decode replica sends
  each prompt to a prefill replica, learns its bootstrap address, and streams the decode engine's output;
  SGLang moves the KV between them (sglang.transfer_backend). TP > 1 cannot be placed this way (Ray gives
  one process a fraction of one GPU or whole GPUs): the config refuses it.

The Ingress talks to either exactly as to the native engine servers: they are `EngineService`s whose engine
is an `SGLangEngine`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.engine_service import ENGINE_REPLICA_OPTIONS, EngineService
from edgeacc_ray.config import ConfigError, ServeConfig
from edgeacc_ray.engine.hardware import restore_priority
from edgeacc_ray.engine.request import EngineUnavailable
from edgeacc_ray.engine.semi_pd import PrefillExecutor
from edgeacc_ray.engine.tp import rank_bundle
from edgeacc_ray.sglang_backend.engine import INSTALL_HINT, SGLangEngine
from edgeacc_ray.sglang_backend.pd_messages import BootstrapAddress, PrefillRequest
from edgeacc_ray.sglang_backend.server_args import Role

logger = logging.getLogger("ray.serve")


def require_sglang() -> None:
    """At build time: SGLang must be installed where the application is built (and on the GPU nodes)."""
    if importlib.util.find_spec("sglang") is None:
        raise ConfigError(
            f"invalid EdgeAcc serving config:\n  backend: 'sglang' needs SGLang, which is not "
            f"installed here; {INSTALL_HINT}, or use backend='native'"
        )


def placement(cfg: ServeConfig, role: Role) -> dict[str, Any]:
    """Serve options placing one replica of `role`: its actor's resources and, for colocated, the placement
    group whose bundles 1..tp hold the TP ranks."""
    resources = dict(cfg.engine_resources)
    if role == "colocated":
        replica = rank_bundle(cfg.engine_num_cpus, 0, resources)
        return dict(
            ray_actor_options={
                "num_cpus": cfg.engine_num_cpus,
                "num_gpus": 0,
                **({"resources": resources} if resources else {}),
            },
            placement_group_bundles=[replica] + [{"GPU": 1.0}] * cfg.tensor_parallel_size,
            placement_group_strategy="STRICT_PACK",
        )
    share = cfg.sglang.prefill_gpu_share if role == "prefill" else 1 - cfg.sglang.prefill_gpu_share
    return dict(
        ray_actor_options={
            "num_cpus": cfg.engine_num_cpus,
            "num_gpus": round(share, 4),
            **({"resources": resources} if resources else {}),
        }
    )


def bind_sglang_engine(
    cfg: ServeConfig, model_path: str, serve_options: dict[str, Any]
) -> Application:
    """The engine side of the application for backend sglang; `serve_options` are the engine deployment's
    (router, replicas, max_ongoing_requests), as for the native servers."""
    config = cfg.model_dump()
    if cfg.pd_mode == "semi_pd":
        prefill = SGLangPrefillServer.options(
            **placement(cfg, "prefill"), num_replicas=cfg.engine_replicas.min_replicas
        ).bind(config, model_path)
        return SGLangDecodeServer.options(**placement(cfg, "decode"), **serve_options).bind(
            config, model_path, prefill
        )
    return SGLangEngineServer.options(**placement(cfg, "colocated"), **serve_options).bind(
        config, model_path
    )


@serve.deployment(name="SGLangEngineServer", max_ongoing_requests=1024, **ENGINE_REPLICA_OPTIONS)
class SGLangEngineServer(EngineService):
    """Colocated: one SGLang engine, its TP ranks in bundles 1..tp of this replica's placement group."""

    def __init__(self, config: dict[str, Any], model_path: str):
        self.model_path = model_path
        super().__init__(ServeConfig.model_validate(config))

    def make_engine(
        self, cfg: ServeConfig, prefill_executor: PrefillExecutor | None
    ) -> SGLangEngine:
        return SGLangEngine(
            cfg,
            self.model_path,
            "colocated",
            rank_bundles=list(range(1, cfg.tensor_parallel_size + 1)),
        )


class ServePrefillLink:
    """The decode replica's `PrefillLink` over the prefill deployment: one streaming call per request, whose
    first item is the bootstrap address and whose end is the prefill's end."""

    def __init__(self, prefill: DeploymentHandle) -> None:
        self._handle = prefill.options(stream=True)
        self._calls: dict[str, DeploymentResponseGenerator] = {}

    async def start(self, request: PrefillRequest) -> BootstrapAddress:
        call = self._handle.prefill.remote(request)
        try:
            address = await call.__anext__()
        except Exception as exc:  # the prefill replica died or refused: this request fails cleanly
            logger.warning(
                "prefill of %s failed to start: %s", request.request_id, type(exc).__name__
            )
            raise EngineUnavailable(
                "the prefill server failed; retry the request", code="prefill_failed"
            ) from None
        self._calls[request.request_id] = call
        asyncio.ensure_future(self._drain(request.request_id, call))
        return address

    async def _drain(self, request_id: str, call: DeploymentResponseGenerator) -> None:
        try:
            async for _ in call:
                pass
        except (
            Exception
        ) as exc:  # the decode engine's transfer fails the request with SGLang's own abort
            logger.warning("prefill of %s ended with %s", request_id, type(exc).__name__)
        finally:
            self._calls.pop(request_id, None)

    def cancel(self, request_id: str) -> None:
        call = self._calls.pop(request_id, None)
        if call is not None:
            call.cancel()


@serve.deployment(name="SGLangDecodeServer", max_ongoing_requests=1024, **ENGINE_REPLICA_OPTIONS)
class SGLangDecodeServer(EngineService):
    """semi_pd: the SGLang decode engine; the Ingress streams from it as from any engine server."""

    def __init__(self, config: dict[str, Any], model_path: str, prefill: DeploymentHandle):
        self.model_path, self.link = model_path, ServePrefillLink(prefill)
        super().__init__(ServeConfig.model_validate(config))

    def make_engine(
        self, cfg: ServeConfig, prefill_executor: PrefillExecutor | None
    ) -> SGLangEngine:
        return SGLangEngine(cfg, self.model_path, "decode", prefill=self.link)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@serve.deployment(name="SGLangPrefillServer", max_ongoing_requests=1024, **ENGINE_REPLICA_OPTIONS)
class SGLangPrefillServer:
    """semi_pd: the SGLang prefill engine; its bootstrap server listens on a port of its own, so several
    prefill replicas can share a node."""

    def __init__(self, config: dict[str, Any], model_path: str):
        import ray

        restore_priority()
        port = _free_port()
        self.address = BootstrapAddress(ray.util.get_node_ip_address(), port)
        self.engine = SGLangEngine(
            ServeConfig.model_validate(config), model_path, "prefill", bootstrap_port=port
        )

    async def prefill(self, request: PrefillRequest) -> AsyncIterator[BootstrapAddress]:
        """Yield where the KV will be served, then run the prompt; cancelling the call aborts it."""
        yield self.address
        await self.engine.run_prefill(request, self.address)

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError("the SGLang prefill engine has stopped")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
