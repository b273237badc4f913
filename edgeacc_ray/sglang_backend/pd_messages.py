"""What crosses between the SGLang decode and prefill deployments (semi_pd). SGLang's PD disaggregation
pairs the two halves of a request by a bootstrap address (the prefill engine's host and
--disaggregation-bootstrap-port) and a room number both engines are given; the KV itself moves between
the engines (mooncake / nixl), never through Ray."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any


def new_room() -> int:
    """A bootstrap room: SGLang keys a request's KV transfer by it, so it must not repeat among live requests."""
    return random.getrandbits(63)


@dataclass(frozen=True)
class PrefillRequest:
    """A prompt for the prefill engine; `sampling` is SGLang's sampling_params dict, as the decode side sends it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    room: int = field(default_factory=new_room)


@dataclass(frozen=True)
class BootstrapAddress:
    """Where the prefill engine that took a request serves its KV: the decode engine connects here."""

    host: str
    port: int
