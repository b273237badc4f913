"""Which replicas of each deployment the request routers of this process see, for callers that must
reach every replica (stats, cache flushes, lease renewals), not just the one a call is routed to; and how
many of this process's requests each replica is running, for the routers' load.

Its own module because Serve ships a custom router class to the caller's process by value
(cloudpickle), module globals included: a registry defined next to the router would be a private
copy there. This module is imported by reference, so router and callers share it.
"""

from __future__ import annotations

import threading

_lock = (
    threading.Lock()
)  # routers run on Serve's router thread, callers on the replica's event loop
_replicas: dict[tuple[str, str], frozenset[str]] = {}
_in_flight: dict[str, int] = {}  # replica unique id -> requests of this process it runs


def update(app_name: str, deployment_name: str, replica_ids: frozenset[str]) -> frozenset[str]:
    """Record the running replicas of a deployment; returns those that are gone since the last update."""
    with _lock:
        before = _replicas.get((app_name, deployment_name), frozenset())
        _replicas[(app_name, deployment_name)] = replica_ids
    return before - replica_ids


def known_replicas(app_name: str, deployment_name: str) -> list[str]:
    """Unique ids of a deployment's running replicas, as this process's routers last saw them."""
    with _lock:
        return sorted(_replicas.get((app_name, deployment_name), ()))


def drop(app_name: str, deployment_name: str, replica_id: str) -> None:
    """Forget a replica whose actor died, before the controller's next update says so."""
    with _lock:
        key = (app_name, deployment_name)
        _replicas[key] = _replicas.get(key, frozenset()) - {replica_id}


def gone(app_name: str, deployment_name: str, replica_id: str) -> bool:
    """Has a router of this process listed the deployment's replicas, without this one? (False before
    any router has seen the deployment: nothing is known yet.)"""
    with _lock:
        replicas = _replicas.get((app_name, deployment_name))
    return replicas is not None and replica_id not in replicas


def track(replica_id: str, delta: int) -> None:
    """A request of this process started (+1) or ended (-1) on a replica."""
    with _lock:
        count = _in_flight.get(replica_id, 0) + delta
        if count > 0:
            _in_flight[replica_id] = count
        else:
            _in_flight.pop(replica_id, None)


def in_flight(replica_id: str) -> int:
    with _lock:
        return _in_flight.get(replica_id, 0)
