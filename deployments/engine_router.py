"""The request router of the engine deployments (`EngineServer`, `DecodeServer`): a Ray Serve custom
request router that runs inside each caller's process (the Ingress replicas).

Two jobs:
- **Pinned calls.** A call that names its replica (`replica=<unique id>` keyword: an Ingress's output
  stream, lease renewals and aborts, which belong to the replica that runs the requests) goes to that
  replica and nowhere else. Without this, a second engine replica would receive subscriptions and
  aborts meant for the first.
- **Cache-aware placement** of new requests (`submit`, `generate`): the replica that most recently took
  the longest prefix of the prompt, in the prefix cache's own page keys, gets it while its load stays
  within `imbalance` requests of the least-loaded replica; otherwise the least-loaded replica does
  (SGLang's cache-aware router does the same with a radix tree per worker). Serve skips a replica whose
  queue-length probe misses its deadline (0.1 s at first, doubling per attempt), which a busy 2-core box
  does now and then; so the first `AFFINE_ATTEMPTS` attempts offer only that replica, and the rest after.

Load is the larger of what each engine last reported through `record_routing_stats` (running + waiting +
prefilling + loading) and the requests of this process it runs now (`replica_registry.in_flight`, kept by
the ServeEngineClient from submit to finish), plus the requests sent to it in the last `RECENT_SEND_S`, whose
submit has not returned yet: Serve's own queue length counts handle calls, and a multiplexed `submit`
returns at once. The reports can be many seconds old (Serve pulls them on its reconcile loop); counting
every request sent since the last one made a replica look busier with each sequential request, until a
shared prefix left it after 8 (the CI failure of 2026-12-04).
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict, deque
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

import deployments.replica_registry as registry
from edgeacc_ray.prefix_keys import full_page_keys

PIN_KWARG = "replica"  # the keyword a pinned call names its replica's unique id with
MAX_UNROUTED = 4096
RECENT_SEND_S = (
    0.25  # a request sent this recently may not be in this process's in-flight count yet
)
AFFINE_ATTEMPTS = (
    3  # routing attempts that offer only the prefix's replica before the others may take it
)
PLACED_METHODS = frozenset(
    {"submit", "generate"}
)  # calls that start a request: (caller, request_id, prompt, ...)


class PrefixAffinity:
    """Page-key chains of recent prompts -> the replica that took them, in LRU order and bounded."""

    def __init__(self, page_size: int, max_pages: int, capacity: int) -> None:
        self.page_size, self.max_pages, self.capacity = page_size, max_pages, capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def keys(self, prompt_token_ids: list[int]) -> list[bytes]:
        """The prefix cache's keys of the prompt's full pages (at most `max_pages`)."""
        full = min(len(prompt_token_ids) // self.page_size, self.max_pages)
        return list(full_page_keys(prompt_token_ids, self.page_size, 0, full))

    def longest_owner(self, keys: list[bytes], alive: set[str]) -> tuple[str | None, int]:
        """The live replica that took the deepest of `keys`, and how many pages deep."""
        for depth in range(len(keys), 0, -1):
            owner = self._owner.get(keys[depth - 1])
            if owner is not None and owner in alive:
                return owner, depth
        return None, 0

    def record(self, keys: list[bytes], replica: str) -> None:
        for key in keys:
            self._owner[key] = replica
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def forget(self, replica: str) -> None:
        for key in [k for k, owner in self._owner.items() if owner == replica]:
            del self._owner[key]


class EngineRouter(RequestRouter):
    """See the module docstring. Configured through `RequestRouterConfig.request_router_kwargs`."""

    def initialize_state(
        self,
        page_size: int = 16,
        imbalance: int = 8,
        prefix_affinity: bool = True,
        max_prefix_pages: int = 256,
        capacity: int = 200_000,
        **_: Any,
    ) -> None:
        self.imbalance = imbalance
        self.affinity = (
            PrefixAffinity(page_size, max_prefix_pages, capacity) if prefix_affinity else None
        )
        self._recent: dict[
            str, deque[float]
        ] = {}  # replica -> when requests were sent to it, RECENT_SEND_S back
        self._keys: OrderedDict[str, list[bytes]] = (
            OrderedDict()
        )  # request id -> its prompt's keys, until routed
        self._attempts: dict[str, int] = {}  # request id -> routing attempts so far, until routed

    # ---- replica set ----
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        dep = self._deployment_id
        gone = registry.update(
            dep.app_name, dep.name, frozenset(r.replica_id.unique_id for r in replicas)
        )
        for replica in gone:
            self._recent.pop(replica, None)
            if self.affinity is not None:
                self.affinity.forget(replica)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Serve saw the actor die: callers pinned to it must see it gone now (a call pinned to a replica
        the router no longer lists would wait for it), not at the controller's next update."""
        super().on_replica_actor_died(replica_id)
        dep = self._deployment_id
        registry.drop(dep.app_name, dep.name, replica_id.unique_id)

    # ---- load ----
    def load(self, replica: RunningReplica) -> int:
        """See the module docstring."""
        rid = replica.replica_id.unique_id
        reported = int((replica.routing_stats or {}).get("load", 0))
        recent = self._recent.get(rid)
        horizon = time.monotonic() - RECENT_SEND_S
        while recent and recent[0] < horizon:
            recent.popleft()
        return max(reported, registry.in_flight(rid)) + (len(recent) if recent else 0)

    # ---- routing ----
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = (
                True  # one ranking per attempt; back off between
            )
        if not candidate_replicas:
            return []
        pin = pending_request.kwargs.get(PIN_KWARG) if pending_request is not None else None
        if pin is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == pin]]
        by_load = sorted(candidate_replicas, key=lambda r: (self.load(r), random.random()))
        preferred = self._affine(by_load, pending_request)
        if preferred is None:
            return [[r] for r in by_load]
        request_id = pending_request.metadata.internal_request_id
        attempt = self._attempts[request_id] = self._attempts.get(request_id, 0) + 1
        if attempt <= AFFINE_ATTEMPTS:
            return [[preferred]]
        return [[preferred], [r for r in by_load if r is not preferred]]

    def _affine(
        self, by_load: list[RunningReplica], pending: PendingRequest | None
    ) -> RunningReplica | None:
        """The replica holding the longest prefix of a new request's prompt, if it is not overloaded."""
        if (
            self.affinity is None
            or pending is None
            or pending.metadata.call_method not in PLACED_METHODS
        ):
            return None
        if len(pending.args) < 3 or not isinstance(pending.args[2], list):
            return None
        keys = self.affinity.keys(pending.args[2])
        self._keys[pending.metadata.internal_request_id] = keys
        while len(self._keys) > MAX_UNROUTED:  # requests cancelled before they were routed
            self._attempts.pop(self._keys.popitem(last=False)[0], None)
        alive = {r.replica_id.unique_id: r for r in by_load}
        owner, _ = self.affinity.longest_owner(keys, set(alive))
        if owner is None:
            return None
        replica = alive[owner]
        return replica if self.load(replica) - self.load(by_load[0]) <= self.imbalance else None

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        if pending_request.metadata.call_method not in PLACED_METHODS:
            return
        rid = replica_id.unique_id
        self._recent.setdefault(rid, deque()).append(time.monotonic())
        self._attempts.pop(pending_request.metadata.internal_request_id, None)
        keys = self._keys.pop(pending_request.metadata.internal_request_id, None)
        if keys and self.affinity is not None:
            self.affinity.record(keys, rid)
