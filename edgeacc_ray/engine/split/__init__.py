"""Semi-PD's compute split between the prefill and decode processes: CPU cores (`core_split`) or
shares of the GPU's SMs (`sm_split`), published through a shared control block and moved by
`SplitController` to meet the TTFT and TPOT targets."""

from edgeacc_ray.engine.split.core_split import ControlBlock, CoreSplitFollower
from edgeacc_ray.engine.split.sm_split import (
    SM_UNITS,
    SmSplitFollower,
    SmSplitReport,
    green_contexts_supported,
    mps_pipe_directory,
    mps_running,
    prefill_mps_share,
    set_mps_share,
    start_follower,
)
from edgeacc_ray.engine.split.split_controller import (
    MIN_SAMPLES,
    SplitController,
    p90,
    window_closes,
)

__all__ = [
    "ControlBlock",
    "CoreSplitFollower",
    "MIN_SAMPLES",
    "SM_UNITS",
    "SmSplitFollower",
    "SmSplitReport",
    "SplitController",
    "green_contexts_supported",
    "mps_pipe_directory",
    "mps_running",
    "p90",
    "prefill_mps_share",
    "set_mps_share",
    "start_follower",
    "window_closes",
]
