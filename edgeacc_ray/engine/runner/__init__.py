from edgeacc_ray.engine.runner.model_runner import ModelRunner, kv_page_bytes, kv_pool_shape

__all__ = ["ModelRunner", "kv_page_bytes", "kv_pool_shape"]
