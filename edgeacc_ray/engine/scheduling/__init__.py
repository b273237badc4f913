"""Which sequences compute in the next step: continuous batching with chunked prefill, admission
against page reservations and the running bound (which follows the TPOT target), and the bounds on
the waiting queue (length, forecast wait, timeout)."""

from edgeacc_ray.engine.scheduling.admission import AdmissionPolicy
from edgeacc_ray.engine.scheduling.queue_bounds import QueueBounds
from edgeacc_ray.engine.scheduling.running_bound import RunningBound
from edgeacc_ray.engine.scheduling.scheduler import ScheduledBatch, Scheduler
from edgeacc_ray.engine.scheduling.start_forecast import BatchForecast, StepTime

__all__ = [
    "AdmissionPolicy",
    "BatchForecast",
    "QueueBounds",
    "RunningBound",
    "ScheduledBatch",
    "Scheduler",
    "StepTime",
]
