"""What the OpenAI and SGLang request shapes share: the base model that rejects text a tokenizer
cannot take (lone surrogates), ids, timestamps and usage."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


def _find_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string holding a lone surrogate (valid JSON, not valid Unicode text)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _find_surrogate(key, path) or _find_surrogate(
            item, f"{path}.{key}" if path else str(key)
        )
        if found:
            return found
    return None


class RequestModel(BaseModel):
    """A request body. Unknown fields are ignored (as OpenAI-compatible servers do) unless a subclass
    forbids them; text must be valid Unicode (`"\\ud800"` is valid JSON but no tokenizer can take it)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _find_surrogate(data, "")
        if where is not None:
            raise ValueError(
                f"{where} holds a lone UTF-16 surrogate (such as \\ud800): text must be valid Unicode"
            )
        return data


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass(frozen=True)
class StreamUsage:
    """Where a stream carries usage: `final`, a last chunk with the totals (`include_usage`); `continuous`,
    every chunk with its choice's usage so far (vLLM's `continuous_usage_stats`, honoured on its own too)."""

    final: bool = False
    continuous: bool = False

    @classmethod
    def of(cls, req: Any) -> StreamUsage:
        """From an OpenAI request's `stream_options`."""
        opts = req.stream_options
        return cls(bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats))

    def add(
        self, chunk: dict[str, Any], prompt_tokens: int, completion_tokens: int, cached_tokens: int
    ) -> dict[str, Any]:
        """The chunk, with its usage so far when `continuous`."""
        if self.continuous:
            chunk["usage"] = usage_dict(prompt_tokens, completion_tokens, cached_tokens)
        return chunk
