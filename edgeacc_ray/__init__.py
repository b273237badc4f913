"""EdgeAcc-Ray: LLM serving on Ray Serve with a native paged-KV engine."""
from edgeacc_ray.config.engine import EngineConfig
from edgeacc_ray.engine.request import SamplingParams

__all__ = ["LLM", "EngineConfig", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":  # lazy: importing the package must not pull torch into light processes
        from edgeacc_ray.llm import LLM

        return LLM
    raise AttributeError(name)
