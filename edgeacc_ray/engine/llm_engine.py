"""The synchronous engine: requests in, one scheduled forward per `step()`, output chunks out."""

from __future__ import annotations

import concurrent.futures as cf
import time
from typing import Any

import torch

from edgeacc_ray.config import EngineConfig
from edgeacc_ray.engine.builder import build_parts
from edgeacc_ray.engine.request import (
    EngineOverloaded,
    EngineStats,
    EngineUnavailable,
    GrammarCompiler,
    IncrementalDetokenizer,
    InvalidRequest,
    LatencyMetrics,
    RequestOutput,
    SamplingParams,
    Sequence,
    SequenceStatus,
    next_token_mask,
    validate_request,
)
from edgeacc_ray.engine.sampling import sample
from edgeacc_ray.engine.scheduling import BatchForecast, ScheduledBatch
from edgeacc_ray.engine.semi_pd import DecodeSide, PrefillExecutor, PrefillFailed
from edgeacc_ray.engine.tp import TensorParallelRanks


class LLMEngine:
    def __init__(
        self, config: EngineConfig, prefill_executor: PrefillExecutor | None = None
    ) -> None:
        """With `config.semi_pd`, the weights and the pool go into a shared segment (`pd.spec`) and
        prompts run on `prefill_executor` (a process that maps it); this engine only decodes.
        The parts are built by `engine.builder.build_parts`."""
        self.config = config
        parts = build_parts(config, prefill_executor)
        self.plan, self.device, self.model_path, self.tokenizer = (
            parts.plan,
            parts.device,
            parts.model_path,
            parts.tokenizer,
        )
        self.args, self.dtype, self.max_model_len, self.limits = (
            parts.args,
            parts.dtype,
            parts.max_model_len,
            parts.limits,
        )
        self.pd: DecodeSide | None = parts.decode_side  # Semi-PD's end here (None: colocated)
        self.tp: TensorParallelRanks | None = parts.tp_ranks  # the other ranks (None: one rank)
        self.runner, self.block_manager, self.tier = parts.runner, parts.block_manager, parts.tier
        self.running_bound, self.queue_bounds, self.step_time = (
            parts.running_bound,
            parts.queue_bounds,
            parts.step_time,
        )
        self.scheduler, self.eos_token_ids = parts.scheduler, parts.eos_token_ids
        self.grammars = GrammarCompiler(self.tokenizer)
        self._masks = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeacc-grammar")
        self.sequences: dict[str, Sequence] = {}
        self.failures: dict[
            str, EngineUnavailable
        ] = {}  # requests that failed outside a step's outputs
        self.counters = dict(
            prompt=0,
            generation=0,
            cached=0,
            host_cached=0,
            finished=0,
            aborted=0,
            rejected=0,
            queue_timeouts=0,
        )
        self._num_admitted = 0  # scheduler.num_admitted at the last step (for the drain rate)
        self.compute_seconds = (
            0.0  # in forwards and sampling: the rest of the wall time this engine idled
        )
        self._last_decode_at: float | None = None
        self.latency = LatencyMetrics()
        torch.manual_seed(config.seed)

    # -- requests -------------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest saying why this engine cannot run the request."""
        validate_request(prompt_token_ids, params, self.limits)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        matcher: Any = None,
    ) -> None:
        """Queue a request. A constrained one (`params.structured`) brings its grammar matcher, built
        off the step loop (`grammars.matcher`), or gets one built here. Raises InvalidRequest (it cannot
        run as asked) or EngineOverloaded (too many wait, or the wait to start is too long)."""
        if request_id in self.sequences:
            raise InvalidRequest("request_id", f"request id {request_id!r} is already running")
        self.check_request(prompt_token_ids, params)
        seq = Sequence(
            request_id, [int(t) for t in prompt_token_ids], params, arrival_time=time.monotonic()
        )
        try:
            self.queue_bounds.check_arrival(
                len(self.scheduler.waiting), BatchForecast(self.scheduler, self.step_time, seq)
            )
        except EngineOverloaded:
            self.counters["rejected"] += 1
            raise
        if params.structured is not None and matcher is None:
            matcher = self.grammars.matcher(params.structured)
        seq.matcher, seq.eos_token_ids = matcher, frozenset(self.eos_token_ids)
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_token_ids, params.stop, params.skip_special_tokens
        )
        self.sequences[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is; its pages return at once. None if it is unknown or done."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return None
        if (
            seq.status != SequenceStatus.PREFILLING
        ):  # else its pages are freed when the prefill returns
            self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        self.counters["aborted"] += 1
        return self._output(seq, [], [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def healthy(self) -> bool:
        """False once a tensor-parallel rank is lost (found by a step or, while idle, a heartbeat)."""
        return self.tp is None or self.tp.healthy()

    # -- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule -> run (one forward) -> sample -> postprocess; returns a chunk for
        every sequence that advanced."""
        outputs, batch = self._schedule()
        if not batch.items:
            return outputs
        started = time.perf_counter()
        logits, samplers = self._run(batch)
        if samplers:
            tokens, logprobs = sample(logits, samplers)
            outputs += self._postprocess(batch, samplers, tokens, logprobs, started)
        self.compute_seconds += time.perf_counter() - started
        return outputs

    def _schedule(self) -> tuple[list[RequestOutput], ScheduledBatch]:
        """The next batch. Semi-PD: first merge the prompts the prefill process finished (their first
        tokens are the outputs returned here), then hand it new ones."""
        outputs = self._merge_prefills() if self.pd is not None else []
        if self.tier is not None:
            self.tier.write_reused()  # before schedule() can reuse a freed page
        budget = self.pd.token_budget() if self.pd is not None else 0
        scheduled_at = time.monotonic()
        self._expire_waiting(scheduled_at)
        batch = self.scheduler.schedule(budget)
        sched = self.scheduler
        self.queue_bounds.drain.observe(
            scheduled_at, sched.num_admitted - self._num_admitted, len(sched.waiting)
        )
        self._num_admitted = sched.num_admitted
        if self.pd is not None:
            self.pd.hand_over(
                batch.prefills,
                bool(sched.waiting or sched.prefilling),
                bool(sched.running),
                self._set_bitmask,
            )
        if not batch.num_decode:
            self._last_decode_at = None  # a gap in decoding is not time per output token
        return outputs, batch

    def _run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        """One forward over the batch (the constrained rows' masks are computed meanwhile); then the
        pages it filled are keyed, and the reused ones written to the tier. Returns the logits of the rows that sample."""
        masks = (
            self._masks.submit(self._fill_masks, batch)
            if any(s.matcher for s, _ in batch.items)
            else None
        )
        logits, samplers = self.runner.run(batch)
        if masks is not None:
            masks.result()  # computed while the forward ran
        for seq, n in batch.items:
            seq.num_computed_tokens += n
            self.block_manager.commit_full_pages(seq)
        if self.tier is not None:
            self.tier.write_reused()  # the pages schedule() just matched
        return logits, samplers

    def _postprocess(
        self,
        batch: ScheduledBatch,
        samplers: list[Sequence],
        tokens: list[int],
        logprobs: list,
        started: float,
    ) -> list[RequestOutput]:
        """Append the sampled tokens (finishing the sequences that stop) and time the decode step."""
        now = time.monotonic()
        outputs = [
            self._append_token(seq, token, logprob, now)
            for seq, token, logprob in zip(samplers, tokens, logprobs)
        ]
        if batch.num_decode:
            self._observe_decode(now, batch.num_decode, time.perf_counter() - started)
        return outputs

    def _fill_masks(self, batch) -> None:
        """Next-token bitmasks of the constrained rows that sample this step (in a helper thread:
        llguidance releases the GIL, so this overlaps the forward)."""
        for seq, n in batch.items:
            if seq.matcher is not None and seq.num_computed_tokens + n >= seq.num_tokens:
                self._set_bitmask(seq)

    def _set_bitmask(self, seq: Sequence) -> None:
        """The tokens seq's grammar allows next, for the sampler (here or in the prefill process)."""
        seq.grammar_mask = next_token_mask(
            seq.matcher,
            self.grammars.tokenizer.vocab_size,
            seq.params.structured,
            seq.eos_token_ids,
        )

    def waiting_on_io(self) -> bool:
        """Nothing to compute here until the prefill process returns a batch or a tier read comes back."""
        sched = self.scheduler
        if sched.running or (sched.loading and not sched.loads_pending()):
            return False
        if self.pd is not None and self.pd.waiting():
            return True
        return sched.loads_pending() and (sched.blocked or not sched.waiting)

    def wait_io(self, timeout: float | None = None) -> None:
        """Block until a prefill batch or a tier read comes back (or the timeout passes)."""
        futures = [
            seq.prefix_load.future for seq in self.scheduler.loading if seq.prefix_load is not None
        ]
        if self.pd is not None:
            futures += self.pd.futures()
        if futures:
            cf.wait(futures, timeout=timeout, return_when=cf.FIRST_COMPLETED)

    def take_failures(self) -> dict[str, EngineUnavailable]:
        """Requests that ended outside a step's outputs (lost prefill, queue timeout), with their error."""
        failures, self.failures = self.failures, {}
        return failures

    def _observe_decode(self, now: float, num_decode: int, seconds: float) -> None:
        """TPOT (time since the previous decode step) for the running bound and Semi-PD's split."""
        tpot = None
        if self._last_decode_at is not None:
            tpot = now - self._last_decode_at
            self.step_time.observe(tpot)
            active = len(self.scheduler.running) + len(self.scheduler.prefilling)
            self.running_bound.observe(now, tpot, active)
        if self.pd is not None:
            self.pd.observe_decode(tpot, num_decode, seconds)
        self._last_decode_at = now

    def _expire_waiting(self, now: float) -> None:
        """Drop the requests that waited past queue_timeout_s without starting; their callers get
        QueueTimeout through take_failures."""
        expired = self.queue_bounds.expired(self.scheduler.waiting, now)
        if not expired:
            return
        self.scheduler.drop_waiting(expired)
        error = self.queue_bounds.timeout_error(len(self.scheduler.waiting))
        for seq in expired:
            seq.finish_reason = "abort"
            self.sequences.pop(seq.request_id, None)
            self.failures[seq.request_id] = error
            self.counters["queue_timeouts"] += 1

    def _merge_prefills(self) -> list[RequestOutput]:
        outputs = []
        for flight, result in self.pd.returned():
            if isinstance(result, BaseException):
                self._fail(flight.seqs, result)
                continue
            by_id = {r.request_id: r for r in result.results}
            now = time.monotonic()
            for seq in flight.seqs:
                if seq.finish_reason == "abort":  # aborted while its prompt was in flight
                    self.scheduler.finish(seq)
                    continue
                r = by_id[seq.request_id]
                if r.generator_state is not None:
                    seq.generator.set_state(r.generator_state)
                seq.prompt_logprobs.extend(r.prompt_logprobs)
                self.scheduler.prefill_done(seq)
                if seq.first_token_time is None:
                    self.pd.observe_ttft(now - seq.arrival_time)
                outputs.append(self._append_token(seq, r.token_id, r.logprob, now))
        return outputs

    def _fail(self, seqs: list[Sequence], error: BaseException) -> None:
        """A prefill batch was lost: its requests end with an error and their pages return."""
        reason = (
            error
            if isinstance(error, PrefillFailed)
            else PrefillFailed(f"the prefill process failed: {type(error).__name__}")
        )
        for seq in seqs:
            self.scheduler.finish(seq)
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                self.sequences.pop(seq.request_id, None)
                self.failures[seq.request_id] = reason
                self.counters["aborted"] += 1

    def _append_token(self, seq: Sequence, token: int, logprob, now: float) -> RequestOutput:
        self.latency.token(seq.arrival_time, seq.first_token_time, seq.last_token_time, now)
        seq.last_token_time = now
        first = seq.first_token_time is None
        if first:
            seq.first_token_time = now
            self.counters["prompt"] += seq.num_prompt_tokens
            self.counters["cached"] += seq.num_cached_tokens
            self.counters["host_cached"] += seq.num_host_cached_tokens
        seq.token_ids.append(token)
        if seq.matcher is not None:
            seq.grammar_mask = None
            seq.matcher.consume_token(token)  # the token came from the matcher's own mask
        self.counters["generation"] += 1
        if logprob is not None:
            seq.logprobs.append(logprob)
        seq.detokenizer.add(token)
        self._check_finished(seq, token)
        if seq.finish_reason is not None:
            self.sequences.pop(seq.request_id, None)
            self.scheduler.finish(seq)
            self.scheduler.admission.finished(seq)
            self.counters["finished"] += 1
            self.latency.finished(
                seq.arrival_time, seq.first_token_time, seq.num_output_tokens, now
            )
        return self._output(
            seq,
            [token],
            [logprob] if logprob is not None else [],
            seq.prompt_logprobs if first and seq.params.prompt_logprobs is not None else None,
        )

    def _check_finished(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if seq.detokenizer.matched_stop is not None:
            seq.finish_reason, seq.stop_reason = "stop", seq.detokenizer.matched_stop
        elif token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif seq.matcher is not None and (seq.matcher.is_stopped() or seq.matcher.is_error()):
            seq.finish_reason = "stop"  # the grammar is complete (or cannot continue)
        elif not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    def _output(
        self, seq: Sequence, tokens: list[int], logprobs: list, prompt_logprobs: list | None = None
    ) -> RequestOutput:
        finished = seq.finish_reason is not None
        return RequestOutput(
            request_id=seq.request_id,
            token_ids=tokens,
            text=seq.detokenizer.emit(finished),
            finished=finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=logprobs if seq.params.logprobs is not None else None,
            prompt_logprobs=prompt_logprobs,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
        )

    # -- introspection --------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm, c = self.block_manager, self.counters
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_loading=len(self.scheduler.loading),
            host_cached_prompt_tokens_total=c["host_cached"],
            hicache=self.tier.stats() if self.tier is not None else None,
            num_free_pages=bm.num_free_pages,
            num_total_pages=bm.num_pages,
            page_size=bm.page_size,
            num_cached_pages=bm.num_cached_pages,
            prompt_tokens_total=c["prompt"],
            generation_tokens_total=c["generation"],
            cached_prompt_tokens_total=c["cached"],
            requests_finished_total=c["finished"],
            requests_aborted_total=c["aborted"],
            pd_mode="semi_pd" if self.pd is not None else "colocated",
            num_prefilling=len(self.scheduler.prefilling),
            split=self.pd.stats() if self.pd is not None else None,
            latency=self.latency.snapshot(),
            running_bound=self.running_bound.value,
            reserved_pages=bm.num_pages - bm.num_free_pages + self.scheduler.committed_pages(),
            new_token_ratio=self.scheduler.admission.ratio,
            retractions_total=self.scheduler.num_preemptions,
            rejected_total=c["rejected"],
            queue_timeouts_total=c["queue_timeouts"],
            drain_rate=self.queue_bounds.drain.per_s or 0.0,
            compute_seconds_total=self.compute_seconds,
            targets=[self.running_bound.target()]
            + (self.pd.targets() if self.pd is not None else []),
        )

    def flush_cache(self) -> bool:
        self.block_manager.flush()
        return True

    def close(self) -> None:
        """Send the tier what is queued for it, release the shared segment (Semi-PD) and stop the
        tensor-parallel ranks; the engine is unusable afterwards."""
        self._masks.shutdown(wait=False)
        if self.tp is not None:
            self.tp.close()
            self.tp = None
        if self.tier is not None:
            self.tier.close()
            self.tier = None
        if self.pd is not None:
            self.pd.close(self.config.compute_threads)
            self.pd = None

    @property
    def model_info(self) -> dict:
        return dict(
            model_path=str(self.model_path),
            architecture=self.args.architecture,
            max_model_len=self.max_model_len,
            vocab_size=self.args.vocab_size,
            eos_token_ids=sorted(self.eos_token_ids),
            page_size=self.config.page_size,
            num_pages=self.block_manager.num_pages,
            dtype=str(self.dtype).removeprefix("torch."),
            device=self.device,
        )
