"""Tensor-parallel ranks 1..N-1: a Ray actor each, holding its shard of the weights and the KV pool
of its own KV heads, running every forward rank 0 announces. It never samples and never schedules:
page allocation, the prefix cache and sampling are rank 0's alone, so the pool's page ids mean the
same on every rank."""

from __future__ import annotations

import torch

from edgeacc_ray.engine.hardware import configure_cpu, restore_priority
from edgeacc_ray.engine.runner import ModelRunner
from edgeacc_ray.engine.tp.group import TPGroup, connect_store
from edgeacc_ray.engine.tp.messages import RankInfo, StepInputs, StepKind, WorkerSpec
from edgeacc_ray.models.loader import load_model
from edgeacc_ray.models.tp_shard import TPShard, wrap_row_parallel


class TPWorker:
    """Created by `TensorParallelRanks` (engine/tp/ranks.py) in its placement group."""

    def __init__(self, spec: WorkerSpec) -> None:
        restore_priority()  # a Ray actor starts at nice 15; rank 0 (an engine replica) runs at 0
        self.spec = spec
        if spec.device == "cpu":
            configure_cpu(spec.num_threads)
        model, args = load_model(
            spec.model_path, spec.dtype, spec.device, shard=TPShard(spec.rank, spec.world_size)
        )
        self.runner = ModelRunner(
            model, args, spec.num_pages, spec.page_size
        )  # no workspace under TP

    def ready(self) -> RankInfo:
        """Answers once the shard is loaded (before `run`, which keeps the actor busy for good)."""
        import os

        import ray

        return RankInfo(
            self.spec.rank,
            os.getpid(),
            ray.util.get_node_ip_address(),
            tuple(int(i) for i in ray.get_gpu_ids()),
        )

    def run(self) -> None:
        """Join the group, then run forwards until rank 0 says STOP. Raises TensorParallelFailure
        when rank 0 is gone (a closed connection, or no message within the timeout)."""
        restore_priority()  # the thread Ray runs this task on may not be the one __init__ ran on
        spec = self.spec
        store = connect_store(spec.store_host, spec.store_port, spec.timeout_s)
        group = TPGroup(
            store, spec.group_name, spec.rank, spec.world_size, spec.device, spec.timeout_s
        )
        wrap_row_parallel(self.runner.model, group.all_reduce)
        try:
            self._loop(group)
        finally:
            group.close()

    @torch.inference_mode()
    def _loop(self, group: TPGroup) -> None:
        runner = self.runner
        while True:
            kind, payload = group.receive()
            if kind == StepKind.STOP:
                return
            if kind == StepKind.HEARTBEAT:
                continue
            inputs = StepInputs.unpack(payload)
            meta = inputs.metadata(runner.device, runner.page_size)
            runner.model(
                inputs.input_ids.to(runner.device),
                inputs.positions.to(runner.device),
                runner.kv_caches,
                meta,
            )
