"""Shared fixtures: built-in model folders and one Ray cluster for the whole test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from edgeacc_ray.builtin_models import resolve_model

    return str(resolve_model("tiny"))
