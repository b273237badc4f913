"""One rank's end of the tensor-parallel process group: the step messages and the all-reduces.

The groups are standalone torch.distributed backend objects over a TCPStore that rank 0 hosts, not
`init_process_group`'s global default group: an engine process may hold several engines over its
life (tests, a restart in place), and a group whose peer died must be dropped without touching any
process-wide state. Every collective is bounded by `timeout_s` (the backends' own timeout), so a
dead or stuck rank surfaces as `TensorParallelFailure`, never as a hang; after the first failure
the group refuses all further use.

Messages (header, then the packed `StepInputs`) always go over a gloo group on the CPU; the
all-reduces go over NCCL on CUDA and over the same gloo group on the CPU. NCCL enforces its timeout
in its watchdog, which by default ends the process (TORCH_NCCL_ASYNC_ERROR_HANDLING): for rank 0,
a Serve replica, that too ends in a restart of the whole group rather than a hang.
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

from edgeacc_ray.engine.request import TensorParallelFailure
from edgeacc_ray.engine.tp.messages import StepKind

logger = logging.getLogger(__name__)


def host_store(host: str, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous, on a free port (`.port`) of `host`."""
    return dist.TCPStore(
        host,
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


class TPGroup:
    """Joining blocks until all `world_size` ranks have joined (bounded by `timeout_s`)."""

    def __init__(
        self,
        store: dist.Store,
        group_name: str,
        rank: int,
        world_size: int,
        device: str,
        timeout_s: float,
    ) -> None:
        self.rank, self.world_size = rank, world_size
        timeout = datetime.timedelta(seconds=timeout_s)
        self.broken: TensorParallelFailure | None = None
        try:
            self._cpu = dist.ProcessGroupGloo(
                dist.PrefixStore(f"{group_name}/gloo", store), rank, world_size, timeout
            )
            self._device = self._cpu
            if device == "cuda":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                self._device = dist.ProcessGroupNCCL(
                    dist.PrefixStore(f"{group_name}/nccl", store), rank, world_size, options
                )
        except RuntimeError as exc:
            raise TensorParallelFailure(
                f"tensor-parallel rank {rank} could not join its group ({type(exc).__name__})",
                code="tp_join_failed",
            ) from exc

    # -- rank 0 -----------------------------------------------------------------------------------
    def send(self, kind: StepKind, payload: torch.Tensor | None = None) -> None:
        """Broadcast a header (kind, payload length) and the payload (an int64 CPU tensor)."""
        header = torch.tensor(
            [int(kind), 0 if payload is None else payload.numel()], dtype=torch.long
        )
        self._broadcast(header)
        if payload is not None:
            self._broadcast(payload)

    # -- ranks 1..N-1 -----------------------------------------------------------------------------
    def receive(self) -> tuple[StepKind, torch.Tensor | None]:
        """The next message from rank 0 (waits at most `timeout_s`: rank 0 sends heartbeats when idle)."""
        header = torch.zeros(2, dtype=torch.long)
        self._broadcast(header)
        kind, size = StepKind(int(header[0])), int(header[1])
        if not size:
            return kind, None
        payload = torch.empty(size, dtype=torch.long)
        self._broadcast(payload)
        return kind, payload

    # -- every rank -------------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place."""
        self._run(lambda: self._device.allreduce([tensor]).wait(), "all-reduce")

    def close(self) -> None:
        """Drop the connections; a peer still waiting on this rank fails at once."""
        for group in {id(self._cpu): self._cpu, id(self._device): self._device}.values():
            try:
                group.abort()
            except RuntimeError:  # already torn down by a failure
                pass
        if self.broken is None:
            self.broken = TensorParallelFailure(
                "the tensor-parallel group was closed", code="tp_closed"
            )

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._run(lambda: self._cpu.broadcast([tensor], options).wait(), "broadcast")

    def _run(self, op, what: str) -> None:
        if self.broken is not None:
            raise self.broken
        try:
            op()
        except RuntimeError as exc:  # gloo: a peer closed its connection, or the timeout passed
            logger.error("tensor-parallel rank %d: %s failed: %s", self.rank, what, exc)
            self.broken = TensorParallelFailure(
                "a tensor-parallel rank of the engine stopped answering", code="tp_rank_lost"
            )
            raise self.broken from exc
