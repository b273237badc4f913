"""What a request is to the engine: its sampling parameters and grammar, the one check of it, the
typed errors that can end it, its state while it runs (`Sequence`) and the chunks and stats that
come out. Every other engine package builds on these."""

from edgeacc_ray.engine.request.combined_stats import combine_stats
from edgeacc_ray.engine.request.detokenizer import IncrementalDetokenizer
from edgeacc_ray.engine.request.errors import (
    EngineOverloaded,
    EngineUnavailable,
    InvalidRequest,
    QueueTimeout,
    TensorParallelFailure,
)
from edgeacc_ray.engine.request.latency_metrics import (
    HistogramSnapshot,
    LatencyMetrics,
    LatencySnapshot,
)
from edgeacc_ray.engine.request.outputs import (
    CompletionOutput,
    EngineStats,
    HiCacheStats,
    RequestOutput,
    SplitStats,
    TokenLogprob,
    merge_outputs,
)
from edgeacc_ray.engine.request.sampling_params import SamplingParams
from edgeacc_ray.engine.request.sequence import Sequence, SequenceStatus
from edgeacc_ray.engine.request.slo_targets import LatencyTarget, TargetStats
from edgeacc_ray.engine.request.structured_output import (
    ANY_JSON_SCHEMA,
    GrammarCompiler,
    GrammarMask,
    StructuredOutput,
    apply_bitmasks,
    next_token_mask,
)
from edgeacc_ray.engine.request.validation import RequestLimits, validate_request

__all__ = [
    "ANY_JSON_SCHEMA",
    "CompletionOutput",
    "EngineOverloaded",
    "EngineStats",
    "EngineUnavailable",
    "GrammarCompiler",
    "GrammarMask",
    "HiCacheStats",
    "HistogramSnapshot",
    "IncrementalDetokenizer",
    "InvalidRequest",
    "LatencyMetrics",
    "LatencySnapshot",
    "LatencyTarget",
    "QueueTimeout",
    "RequestLimits",
    "RequestOutput",
    "SamplingParams",
    "Sequence",
    "SequenceStatus",
    "SplitStats",
    "StructuredOutput",
    "TargetStats",
    "TensorParallelFailure",
    "TokenLogprob",
    "apply_bitmasks",
    "combine_stats",
    "merge_outputs",
    "next_token_mask",
    "validate_request",
]
