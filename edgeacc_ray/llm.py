"""Offline API in the style of vLLM/SGLang: `LLM(model).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
from typing import Any
from typing import Sequence as Seq

from edgeacc_ray.config import EngineConfig
from edgeacc_ray.engine import LLMEngine
from edgeacc_ray.engine.hardware import resolve_device
from edgeacc_ray.engine.request import (
    CompletionOutput,
    EngineOverloaded,
    RequestOutput,
    SamplingParams,
    merge_outputs,
)
from edgeacc_ray.engine.semi_pd import ProcessPrefillExecutor
from edgeacc_ray.engine.split import prefill_mps_share

Prompt = str | list[int]

# Offline, the prompts given are the work: none is refused or dropped for waiting, and the batch is
# as large as max_num_seqs and the pool allow (no TPOT target). Passing these settings turns them on.
OFFLINE_DEFAULTS = dict(
    max_queued_requests=-1, max_queue_wait_s=None, queue_timeout_s=None, tpot_slo_ms=None
)


class LLM:
    """Runs a batch of prompts to completion with continuous batching, in this process."""

    def __init__(self, model: str = "tiny", **engine_args: Any) -> None:
        """`semi_pd=SemiPDConfig(...)` runs prompts in a spawned prefill process on a shared pool.
        `enable_hierarchical_cache=True` needs `ray.init()` first (the tier's store is a Ray actor).
        Queue bounds and the TPOT-driven running bound are off unless given (`OFFLINE_DEFAULTS`)."""
        config = EngineConfig(model=model, **{**OFFLINE_DEFAULTS, **engine_args})
        mps_share = (
            prefill_mps_share()
            if config.semi_pd and resolve_device(config.device) == "cuda"
            else None
        )
        self.prefill_process = (
            ProcessPrefillExecutor(config.max_num_batched_tokens, mps_share)
            if config.semi_pd
            else None
        )
        try:
            self.engine = LLMEngine(config, self.prefill_process)
        except BaseException:
            self.close()
            raise
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the prefill process, release the shared segment (Semi-PD) and send the KV tier its
        queued pages."""
        if self.prefill_process is not None:
            self.prefill_process.shutdown()
            self.prefill_process = None
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        token_lists = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for tokens, p in zip(token_lists, params_list):  # all or nothing: check before queuing any
            self.engine.check_request(tokens, p)
        request_ids = [f"offline-{next(self._ids)}" for _ in prompts]
        try:
            for request_id, tokens, p in zip(request_ids, token_lists, params_list):
                self.engine.add_request(request_id, tokens, p)
        except EngineOverloaded:  # queue bounds asked for: take back what was queued
            self._abort(request_ids)
            raise
        merged: dict[str, RequestOutput | None] = dict.fromkeys(request_ids)
        while self.engine.has_unfinished():
            if self.engine.waiting_on_io():
                self.engine.wait_io()
            outputs = self.engine.step()
            failures = self.engine.take_failures()
            if failures:  # a lost prefill or a queue timeout: the whole call fails
                self._abort(request_ids)
                raise next(iter(failures.values()))
            for out in outputs:
                merged[out.request_id] = merge_outputs(merged[out.request_id], out)
        return [
            _completion(rid, tokens, merged[rid]) for rid, tokens in zip(request_ids, token_lists)
        ]

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)

    def chat(
        self,
        conversations: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
    ) -> list[CompletionOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params)


def _completion(
    request_id: str, prompt_token_ids: list[int], out: RequestOutput | None
) -> CompletionOutput:
    """A finished request's merged chunks as `generate` returns them."""
    if out is None:
        return CompletionOutput(request_id, prompt_token_ids, [], "", None)
    return CompletionOutput(
        request_id,
        prompt_token_ids,
        list(out.token_ids),
        out.text,
        out.finish_reason,
        out.stop_reason,
        logprobs=out.logprobs,
        num_cached_tokens=out.num_cached_tokens,
        prompt_logprobs=out.prompt_logprobs,
    )
