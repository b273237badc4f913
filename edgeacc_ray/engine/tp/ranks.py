"""Rank 0's side of tensor parallelism: it starts ranks 1..N-1 as Ray actors in one placement group,
announces every forward to them, keeps them from timing out while idle, and tears it all down.

Rank 0 is the engine's own process (a Serve replica, or the offline `LLM`). In Serve the replica is
deployed with one bundle per rank (STRICT_PACK, `deployments/engine_server.py`): the replica sits in
bundle 0 and its ranks take bundles 1..N-1, and Serve removes the group with the replica. Elsewhere
the engine creates the placement group itself and removes it on close. The workers are owned by the
engine process, so they die with it.

A rank that dies or hangs fails the step in flight with TensorParallelFailure within the collective
timeout (a killed rank: at once, its connections close); a rank lost while the engine is idle is
found by the next heartbeat. Either way `healthy()` turns False for good: the engine replica fails
its health check and Serve replaces it, which builds a new group.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from edgeacc_ray.engine.request import TensorParallelFailure
from edgeacc_ray.engine.tp.group import TPGroup, host_store
from edgeacc_ray.engine.tp.messages import RankInfo, StepInputs, StepKind, WorkerSpec
from edgeacc_ray.models.attention import AttentionMetadata
from edgeacc_ray.models.qwen3 import CausalLM
from edgeacc_ray.models.tp_shard import wrap_row_parallel

logger = logging.getLogger(__name__)

# Ray refuses a bundle with no resource in it; engine processes account 0 CPUs (a 2-core box holds no 1-CPU replica), so each
# rank's bundle reserves a sliver of one, enough for STRICT_PACK to pack them on one node.
MIN_BUNDLE_CPU = 0.01
PLACEMENT_TIMEOUT_S = (
    120.0  # the ranks' bundles are placed within this, or the engine does not start
)
LOAD_TIMEOUT_S = 1800.0  # every rank has loaded its shard within this
MAX_HEARTBEAT_S = 2.0


def rank_bundle(
    num_cpus: float = 0.0, num_gpus: float = 0.0, resources: dict[str, float] | None = None
) -> dict[str, float]:
    """One rank's placement-group bundle: what its process asks Ray for (at least MIN_BUNDLE_CPU)."""
    bundle = {"CPU": max(float(num_cpus), MIN_BUNDLE_CPU), **(resources or {})}
    if num_gpus:
        bundle["GPU"] = float(num_gpus)
    return bundle


class TensorParallelRanks:
    """Use `start`; `model` is the sharded model as the engine's ModelRunner drives it."""

    def __init__(
        self,
        workers: list[Any],
        infos: list[RankInfo],
        loops: list[Any],
        group: TPGroup,
        placement: Any,
        owns_placement: bool,
        store: Any,
        timeout_s: float,
    ) -> None:
        self.workers, self.infos, self._loops, self.group = workers, infos, loops, group
        self.placement, self._owns_placement, self._store = placement, owns_placement, store
        self._lock = threading.Lock()  # one message sequence at a time: a step's, or a heartbeat
        self._last_sent = time.monotonic()
        self._interval = min(MAX_HEARTBEAT_S, timeout_s / 4)
        self._stopped = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._beat, name="edgeacc-tp-heartbeat", daemon=True
        )
        self._heartbeat.start()

    @classmethod
    def start(cls, model: CausalLM, spec: WorkerSpec) -> "TensorParallelRanks":
        """Place and start ranks 1..N-1 (`spec` with rank 0: each worker gets its own rank), join the
        group with them and make `model`'s row-parallel layers all-reduce over it. Raises
        TensorParallelFailure (after cleaning up) if the ranks cannot be placed, loaded or joined."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from edgeacc_ray.engine.tp.worker import TPWorker

        if not ray.is_initialized():
            raise TensorParallelFailure(
                "tensor_parallel_size > 1 needs a Ray cluster (ranks 1.. are Ray actors): "
                "call ray.init() before starting the engine",
                code="tp_no_ray",
            )
        placement, owned = _placement(spec)
        store, workers, loops = None, [], []
        try:
            store = host_store(spec.store_host, spec.timeout_s)
            spec = _with(spec, store_port=store.port)
            actor = ray.remote(TPWorker)
            for rank in range(1, spec.world_size):
                strategy = PlacementGroupSchedulingStrategy(
                    placement, placement_group_bundle_index=rank
                )
                workers.append(
                    actor.options(
                        num_cpus=0,
                        num_gpus=1 if spec.device == "cuda" else 0,
                        max_restarts=0,
                        scheduling_strategy=strategy,
                    ).remote(_with(spec, rank=rank))
                )
            infos = _wait_ready(workers)
            if spec.device == "cuda":
                report_peer_access([_own_gpu()] + [info.gpu_ids[0] for info in infos])
            loops = [w.run.remote() for w in workers]
            group = TPGroup(store, spec.group_name, 0, spec.world_size, spec.device, spec.timeout_s)
        except BaseException as exc:
            cause = _first_failure(loops) if loops else None
            for w in workers:
                ray.kill(w, no_restart=True)
            if owned:
                ray.util.remove_placement_group(placement)
            if isinstance(exc, TensorParallelFailure) or not isinstance(exc, Exception):
                raise exc from cause
            raise TensorParallelFailure(
                f"the tensor-parallel ranks did not start ({type(exc).__name__}: {exc})",
                code="tp_start_failed",
            ) from exc
        wrap_row_parallel(model, group.all_reduce)
        logger.info(
            "tensor parallelism: %d ranks (rank 0 here, pid %d; the others %s), %s",
            spec.world_size,
            os.getpid(),
            [(i.rank, i.node_ip, i.pid) for i in infos],
            "NCCL" if spec.device == "cuda" else "gloo",
        )
        return cls(workers, infos, loops, group, placement, owned, store, spec.timeout_s)

    @contextmanager
    def step(self, inputs: StepInputs) -> Iterator[None]:
        """Announce a forward to the other ranks; run rank 0's inside (its all-reduces pair with theirs)."""
        with self._lock:
            self.group.send(StepKind.STEP, inputs.pack())
            self._last_sent = time.monotonic()
            yield

    def healthy(self) -> bool:
        return self.group.broken is None

    def close(self) -> None:
        """Stop the ranks (STOP if they still listen), kill their actors and remove the placement
        group this engine created."""
        import ray

        self._stopped.set()
        self._heartbeat.join(timeout=5)
        if self._lock.acquire(timeout=5):
            try:
                if self.group.broken is None:
                    self.group.send(StepKind.STOP)
            except TensorParallelFailure:
                pass
            finally:
                self._lock.release()
        self.group.close()
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        if self._owns_placement:
            ray.util.remove_placement_group(self.placement)
        self._store = None

    def _beat(self) -> None:
        """Every interval: a heartbeat if no step was sent lately, and a look at the workers' loops."""
        import ray

        while not self._stopped.wait(self._interval):
            if self.group.broken is not None:
                return
            if self._lock.acquire(blocking=False):
                try:
                    if time.monotonic() - self._last_sent >= self._interval:
                        self.group.send(StepKind.HEARTBEAT)
                        self._last_sent = time.monotonic()
                except TensorParallelFailure:
                    return  # logged by the group; healthy() is False from now on
                finally:
                    self._lock.release()
            done, _ = ray.wait(self._loops, num_returns=1, timeout=0)
            if done and self.group.broken is None:
                logger.error("a tensor-parallel rank's loop ended: %r", _first_failure(done))
                self.group.broken = TensorParallelFailure(
                    "a tensor-parallel rank of the engine is gone", code="tp_rank_lost"
                )


class Rank0Model:
    """The sharded model as rank 0 runs it: every forward is first announced to the other ranks with
    its inputs; everything else (`logits`, the weights ModelRunner reads) is the model's own."""

    def __init__(self, model: CausalLM, ranks: TensorParallelRanks) -> None:
        self.inner, self.ranks = model, ranks

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        with self.ranks.step(StepInputs.from_forward(input_ids, positions, meta)):
            return self.inner(input_ids, positions, kv_caches, meta)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def new_group_name() -> str:
    """A fresh prefix for a group's keys, so a restarted group never reads a previous one's."""
    return f"edgeacc-tp-{uuid.uuid4().hex[:12]}"


def node_address() -> str:
    """This node's address, where rank 0 hosts the rendezvous (its ranks are on the same node)."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def report_peer_access(gpu_ids: list[int]) -> list[list[bool]]:
    """Log (and return) `torch.cuda.can_device_access_peer` between the ranks' GPUs, rank by rank.
    Each rank's process sees only its own GPU, so the check runs in a child that sees them all."""
    if len(set(gpu_ids)) < len(gpu_ids):
        raise TensorParallelFailure(
            f"tensor-parallel ranks share a GPU (physical ids {gpu_ids}); each rank needs its own",
            code="tp_shared_gpu",
        )
    script = (
        "import json, torch; n = torch.cuda.device_count(); print(json.dumps([[i == j or "
        "torch.cuda.can_device_access_peer(i, j) for j in range(n)] for i in range(n)]))"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpu_ids))}
    try:
        out = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        matrix = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        logger.warning(
            "tensor parallelism: could not check peer access between GPUs %s: %s", gpu_ids, exc
        )
        return []
    missing = [(a, b) for a in range(len(matrix)) for b in range(len(matrix)) if not matrix[a][b]]
    logger.info(
        "tensor parallelism: GPUs %s (rank order), peer access %s%s",
        gpu_ids,
        matrix,
        f"; no P2P between ranks {missing}: NCCL goes through host memory"
        if missing
        else ": all pairs",
    )
    return matrix


def _placement(spec: WorkerSpec) -> tuple[Any, bool]:
    """The placement group of the Serve replica this engine runs in, or a new one (owned=True)."""
    import ray
    from ray.util.placement_group import get_current_placement_group, placement_group

    current = get_current_placement_group()
    if current is not None and len(current.bundle_specs) >= spec.world_size:
        return current, False
    bundle = rank_bundle(num_gpus=1 if spec.device == "cuda" else 0)
    pg = placement_group(
        [bundle] * spec.world_size, strategy="STRICT_PACK"
    )  # bundle 0 stands for rank 0
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise TensorParallelFailure(
            f"the {spec.world_size} tensor-parallel ranks' bundles ({bundle} each, on one "
            f"node) could not be placed within {PLACEMENT_TIMEOUT_S:.0f} s",
            code="tp_unplaceable",
        ) from None
    return pg, True


def _wait_ready(workers: list[Any]) -> list[RankInfo]:
    """Wait until every worker has loaded its shard; what they report, in rank order."""
    import ray

    try:
        return ray.get([w.ready.remote() for w in workers], timeout=LOAD_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise TensorParallelFailure(
            f"the tensor-parallel ranks did not load within {LOAD_TIMEOUT_S:.0f} s",
            code="tp_start_failed",
        ) from None


def _first_failure(loops: list[Any]) -> BaseException | None:
    import ray

    done, _ = ray.wait(loops, num_returns=len(loops), timeout=0)
    for ref in done:
        try:
            ray.get(ref)
        except Exception as exc:  # the loop's own error, or the actor's death
            return exc
    return None


def _own_gpu() -> int:
    import ray

    ids = ray.get_gpu_ids()
    if ids:
        return int(ids[0])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return int(visible.split(",")[0]) if visible else torch.cuda.current_device()


def _with(spec: WorkerSpec, **changes: Any) -> WorkerSpec:
    return dataclasses.replace(spec, **changes)
