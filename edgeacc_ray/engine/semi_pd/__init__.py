"""Semi-PD: prompts run in a prefill process on the same pool and weights, the decode side (this
engine) sends them page ids and token ids and takes back first tokens. `setup` builds the shared
storage and the split; `decode_side` (over `prefill_dispatcher`) is the decode engine's end,
`prefill_worker` the other."""

from edgeacc_ray.engine.semi_pd.decode_side import DecodeSide
from edgeacc_ray.engine.semi_pd.prefill_dispatcher import PrefillDispatcher, PrefillExecutor
from edgeacc_ray.engine.semi_pd.prefill_messages import (
    PrefillBatch,
    PrefillBatchResult,
    PrefillFailed,
    PrefillReplicaTaken,
    PrefillTask,
)
from edgeacc_ray.engine.semi_pd.prefill_worker import PrefillWorker, page_sums
from edgeacc_ray.engine.semi_pd.process_prefill_executor import ProcessPrefillExecutor
from edgeacc_ray.engine.semi_pd.setup import start_semi_pd

__all__ = [
    "DecodeSide",
    "PrefillBatch",
    "PrefillBatchResult",
    "PrefillDispatcher",
    "PrefillExecutor",
    "PrefillFailed",
    "PrefillReplicaTaken",
    "PrefillTask",
    "PrefillWorker",
    "ProcessPrefillExecutor",
    "page_sums",
    "start_semi_pd",
]
