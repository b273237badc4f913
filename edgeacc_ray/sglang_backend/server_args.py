"""ServeConfig -> the keyword arguments of `sglang.Engine(**kwargs)` (SGLang's `ServerArgs` fields), per role.

A pure function of the settings, so every mapped field is checked on CPU. Field names are SGLang 0.5's
(`python/sglang/srt/arg_groups/fields/*.py` in the 0.5.23 wheel: `schedule.py` mem_fraction_static,
max_running_requests, max_queued_requests, chunked_prefill_size, page_size, schedule_conservativeness;
`memory.py` disable_radix_cache, enable_hierarchical_cache, hicache_size, hicache_storage_backend,
hicache_storage_backend_extra_config; `disagg.py` disaggregation_mode, disaggregation_transfer_backend,
disaggregation_bootstrap_port; `serving.py` stream_interval, incremental_streaming_output, served_model_name;
`model.py` context_length, dtype; `parallel.py` tp_size; `device.py` random_seed).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from edgeacc_ray.config import ServeConfig

Role = Literal["colocated", "prefill", "decode"]

# Our tier as SGLang's `dynamic` HiCache storage backend (kv_store/sglang_backend.py).
HICACHE_MODULE, HICACHE_CLASS = "kv_store.sglang_backend", "HiCacheRayStore"
DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's default --disaggregation-bootstrap-port
SGLANG_INIT_NEW_TOKEN_RATIO = (
    0.7  # SGLANG_INIT_NEW_TOKEN_RATIO (environ.py), scaled by schedule_conservativeness
)


def hicache_extra_config(cfg: "ServeConfig") -> dict[str, Any]:
    """What `--hicache-storage-backend dynamic` loads (module_path, class_name) and what HiCacheRayStore reads
    from the same dict: the node store's byte budget and its call timeout."""
    return {
        "backend_name": "edgeacc_ray",
        "module_path": HICACHE_MODULE,
        "class_name": HICACHE_CLASS,
        "kv_cache_offload_memory_gb": cfg.kv_cache_offload_memory_gb,
        "timeout_s": cfg.sglang.hicache_timeout_s,
    }


def mem_fraction(cfg: "ServeConfig", role: Role) -> float | None:
    """Each engine's share of GPU memory for weights + KV: semi_pd splits semi_pd_mem_fraction by
    prefill_gpu_share (the two engines sit on one GPU); colocated takes `sglang.mem_fraction_static`."""
    s = cfg.sglang
    if role == "prefill":
        return round(s.semi_pd_mem_fraction * s.prefill_gpu_share, 4)
    if role == "decode":
        return round(s.semi_pd_mem_fraction * (1 - s.prefill_gpu_share), 4)
    return s.mem_fraction_static


def server_args(
    cfg: "ServeConfig", model_path: str, role: Role, bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT
) -> dict[str, Any]:
    """`sglang.Engine` kwargs for one engine of a replica. The stream format is fixed (incremental deltas,
    text detokenized by SGLang), because `outputs.SGLangStream` parses exactly that."""
    args: dict[str, Any] = {
        "model_path": model_path,
        "served_model_name": cfg.model_name,
        "tp_size": cfg.tensor_parallel_size,
        "dtype": cfg.dtype,  # the same words: auto, bfloat16, float16, float32
        "random_seed": cfg.seed,
        "page_size": cfg.page_size,  # also the page of the Ingress's prefix routing and of stats()
        "stream_interval": cfg.stream_interval,
        "incremental_streaming_output": True,
        "skip_tokenizer_init": False,
        "disable_radix_cache": not cfg.enable_prefix_caching,
        # Structured output as the native engine does it: llguidance, compact JSON; Lark goes in as `ebnf`.
        "grammar_backend": "llguidance",
        "constrained_json_disable_any_whitespace": True,
    }
    # Our defaults are sized for the CPU engine: on GPUs SGLang's own apply unless these were changed (by value:
    # the settings reach the replicas as a full dump, so "set" cannot be told from "default" there).
    chosen = {
        name
        for name in ("max_num_seqs", "max_num_batched_tokens", "new_token_ratio_init")
        if getattr(cfg, name) != type(cfg).model_fields[name].default
    }
    if "max_num_seqs" in chosen:
        args["max_running_requests"] = cfg.max_num_seqs
    if "max_num_batched_tokens" in chosen:
        args["chunked_prefill_size"] = cfg.max_num_batched_tokens
    if (
        "new_token_ratio_init" in chosen
    ):  # SGLang's initial ratio is 0.7 x schedule_conservativeness
        args["schedule_conservativeness"] = round(
            cfg.new_token_ratio_init / SGLANG_INIT_NEW_TOKEN_RATIO, 6
        )
    if cfg.max_model_len is not None:
        args["context_length"] = cfg.max_model_len
    if cfg.max_queued_requests != -1 and role == "colocated":  # SGLang ignores it in PD mode
        args["max_queued_requests"] = cfg.max_queued_requests
    fraction = mem_fraction(cfg, role)
    if fraction is not None:
        args["mem_fraction_static"] = fraction
    if role != "colocated":
        args.update(
            disaggregation_mode=role,
            disaggregation_transfer_backend=cfg.sglang.transfer_backend,
            disaggregation_bootstrap_port=bootstrap_port,
        )
        if role == "decode":  # the decode engine keeps its own prefix cache of what it received
            args["disaggregation_decode_enable_radix_cache"] = cfg.enable_prefix_caching
    if (
        cfg.enable_hierarchical_cache and role != "decode"
    ):  # the tier serves prompts: prefill or colocated
        args.update(
            enable_hierarchical_cache=True,
            hicache_storage_backend="dynamic",
            hicache_storage_backend_extra_config=json.dumps(hicache_extra_config(cfg)),
        )
        if cfg.sglang.hicache_size_gb is not None:
            args["hicache_size"] = cfg.sglang.hicache_size_gb
    args.update(cfg.sglang.extra_args)
    return args
