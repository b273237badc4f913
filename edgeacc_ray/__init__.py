"""EdgeAcc-Ray: LLM serving on Ray Serve with a native paged-KV engine."""

from edgeacc_ray.config import EngineConfig

__all__ = ["LLM", "EngineConfig", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy: importing the package must not pull torch into light processes (the router, the Ingress)
    if name == "LLM":
        from edgeacc_ray.llm import LLM

        return LLM
    if name == "SamplingParams":
        from edgeacc_ray.engine.request import SamplingParams

        return SamplingParams
    raise AttributeError(name)
