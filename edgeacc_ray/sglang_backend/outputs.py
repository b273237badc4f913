"""SGLang's `Engine.async_generate(..., stream=True)` items -> our `RequestOutput` chunks.

The shape parsed here is SGLang 0.5.23's `TokenizerManager._handle_batch_output` (managers/tokenizer_manager.py),
with `incremental_streaming_output=True` (server_args.py always sets it), for a request given as input_ids:

    {"text": <new text>, "output_ids": [<new token ids>],
     "meta_info": {"id": rid, "finish_reason": None | {"type": "stop", "matched": str | int}
                                                | {"type": "length", "length": int}
                                                | {"type": "abort", "message": str, "status_code": int | None, ...},
                   "prompt_tokens": int, "completion_tokens": int (so far), "cached_tokens": int,
                   # with return_logprob, sliced to this item's tokens (_slice_streaming_output_meta_info):
                   "output_token_logprobs": [(logprob, token_id, None), ...],
                   "output_top_logprobs": [[(logprob, token_id, None), ...] | None, ...], ...}}

Several queued items reach the caller coalesced into one (`_coalesce_streaming_chunks`: ids and text
concatenated, logprob lists joined, the rest from the last). A finish_reason of type "abort" with an HTTP
status (`_handle_abort_finish_reason`: a refused request, the queue full) is a typed error here; one
without a status is an abort we asked for.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Mapping

from edgeacc_ray.engine.request import (
    EngineOverloaded,
    EngineUnavailable,
    InvalidRequest,
    RequestOutput,
    TokenLogprob,
)

OVERLOAD_STATUSES = frozenset({HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE})
OVERLOAD_RETRY_AFTER_S = 1  # SGLang says nothing about when: retry soon


def abort_error(reason: Mapping[str, Any]) -> Exception | None:
    """The typed error for an abort SGLang answered with an HTTP status; None for a plain abort."""
    status, message = reason.get("status_code"), str(reason.get("message") or "aborted by SGLang")
    if status is None:
        return None
    status = int(status)
    if (
        status in OVERLOAD_STATUSES
    ):  # "The request queue is full." (Scheduler._abort_on_queued_limit): 503
        return EngineOverloaded(
            message, retry_after_s=OVERLOAD_RETRY_AFTER_S, code="sglang_overloaded"
        )
    if HTTPStatus.BAD_REQUEST <= status < HTTPStatus.INTERNAL_SERVER_ERROR:
        return InvalidRequest("request", message, code="sglang_rejected")
    return EngineUnavailable(message, code="sglang_error")


def _logprobs(meta: Mapping[str, Any]) -> list[TokenLogprob] | None:
    chosen = meta.get("output_token_logprobs")
    if chosen is None:
        return None
    top = meta.get("output_top_logprobs") or [None] * len(chosen)
    return [
        TokenLogprob(
            token_id=int(token),
            logprob=float(logprob),
            top=[(int(t), float(lp)) for lp, t, *_ in (alternatives or [])],
        )
        for (logprob, token, *_), alternatives in zip(chosen, top)
    ]


class SGLangStream:
    """One request's adapter: call `chunk(item)` for each item of its stream, in order."""

    def __init__(self, request_id: str, stop_token_ids: list[int]) -> None:
        self.request_id = request_id
        self._stop_token_ids = frozenset(stop_token_ids)

    def chunk(self, item: Mapping[str, Any]) -> RequestOutput:
        """This item as a RequestOutput; raises the typed error of a refused or failed request."""
        meta = item["meta_info"]
        reason = meta.get("finish_reason")
        finish_reason = stop_reason = None
        if reason is not None:
            finish_reason = reason["type"]
            if finish_reason == "abort":
                error = abort_error(reason)
                if error is not None:
                    raise error
            elif finish_reason == "stop":
                stop_reason = self._stop_reason(reason.get("matched"))
        return RequestOutput(
            request_id=self.request_id,
            token_ids=list(item.get("output_ids") or []),
            text=item.get("text") or "",
            finished=reason is not None,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            logprobs=_logprobs(meta),
            num_prompt_tokens=int(meta.get("prompt_tokens", 0)),
            num_cached_tokens=int(meta.get("cached_tokens", 0)),
            num_output_tokens=int(meta.get("completion_tokens", 0)),
        )

    def _stop_reason(self, matched: Any) -> str | int | None:
        """As the native engine reports it: the stop string, or the stop token the request named; None
        for EOS (SGLang reports the EOS id it matched)."""
        if isinstance(matched, str):
            return matched
        if isinstance(matched, int) and matched in self._stop_token_ids:
            return matched
        return None
