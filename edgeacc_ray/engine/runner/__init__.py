"""One forward over a scheduled batch: batch -> tensors -> model (`model_runner`), the CPU decode
workspace and the CUDA decode graphs it may use."""

from edgeacc_ray.engine.runner.model_runner import ModelRunner, kv_page_bytes, kv_pool_shape

__all__ = ["ModelRunner", "kv_page_bytes", "kv_pool_shape"]
