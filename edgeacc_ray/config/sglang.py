"""The `sglang:` settings of `ServeConfig` (nested, not copied), and the combinations the backend refuses.

Only what our layout decides is a setting here; any other SGLang `ServerArgs` field goes through
`extra_args` unchanged, except those the adapter depends on (`RESERVED_ARGS`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:  # config.py imports this module
    from edgeacc_ray.config import ServeConfig

# ServerArgs fields the adapter sets itself: the stream format it parses (incremental deltas, text from
# SGLang's detokenizer), the model, the parallel layout and the PD role that the placement decides.
RESERVED_ARGS = frozenset(
    {
        "model_path",
        "tokenizer_path",
        "served_model_name",
        "tp_size",
        "skip_tokenizer_init",
        "incremental_streaming_output",
        "stream_output",
        "disaggregation_mode",
        "disaggregation_bootstrap_port",
        "hicache_storage_backend",
        "hicache_storage_backend_extra_config",
        "enable_hierarchical_cache",
        "base_gpu_id",
        "host",
        "port",
    }
)


class SGLangSettings(BaseModel):
    """How the SGLang engines of a replica are set up (backend: sglang)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mem_fraction_static: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="colocated: share of each GPU's memory for weights + KV "
        "(SGLang --mem-fraction-static); null: SGLang's own choice",
    )
    prefill_gpu_share: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="semi_pd: the prefill engine's share of the GPU (its Ray num_gpus and its "
        "part of semi_pd_mem_fraction); the decode engine gets the rest",
    )
    semi_pd_mem_fraction: float = Field(
        0.85,
        gt=0,
        lt=1,
        description="semi_pd: GPU memory both engines' weights + KV may take, split by "
        "prefill_gpu_share (each engine holds its own weights)",
    )
    transfer_backend: Literal["mooncake", "nixl"] = Field(
        "mooncake",
        description="semi_pd: how SGLang moves a prompt's KV from the prefill to the decode engine "
        "(SGLang --disaggregation-transfer-backend; the package must be installed)",
    )
    hicache_size_gb: int | None = Field(
        None,
        ge=1,
        description="host (CPU) KV tier per rank in GB, below the device pool and above the "
        "kv_store tier (SGLang --hicache-size); null: SGLang's ratio of the device pool",
    )
    hicache_timeout_s: float = Field(
        1.0,
        gt=0,
        description="a kv_store call from SGLang's storage thread that "
        "takes longer counts as a miss",
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict,
        description="more SGLang ServerArgs fields, passed as they are (e.g. "
        "{chunked_prefill_size: 8192, cuda_graph_max_bs: 256})",
    )

    @field_validator("extra_args")
    @classmethod
    def _not_reserved(cls, extra: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(extra) & RESERVED_ARGS)
        if taken:
            raise ValueError(
                f"{taken} are set by EdgeAcc from its own settings (model, tensor_parallel_size, "
                "pd_mode, enable_hierarchical_cache); remove them from extra_args"
            )
        return extra


def sglang_semi_pd_default(cfg: "ServeConfig") -> bool:
    """Whether `enable_edge_acc` may pick semi_pd for SGLang: only where it can be placed (one GPU)."""
    return cfg.tensor_parallel_size == 1


def check_sglang(cfg: "ServeConfig") -> None:
    """Raise ValueError (its message starting with the field at fault) for what the backend cannot run."""
    if cfg.device == "cpu":
        raise ValueError(
            "device='cpu': the sglang backend runs on GPUs; use backend='native' on CPU nodes"
        )
    if cfg.pd_mode == "semi_pd" and cfg.tensor_parallel_size > 1:
        raise ValueError(
            f"pd_mode='semi_pd' with tensor_parallel_size={cfg.tensor_parallel_size}: Ray gives one process either a "
            "fraction of ONE GPU or whole GPUs, and SGLang's TP ranks take whole GPUs, so a prefill and a decode "
            "engine cannot share several GPUs through Ray's fractional placement; use pd_mode='colocated' (with "
            "enable_hierarchical_cache) for tensor parallelism, or tensor_parallel_size=1 for semi_pd"
        )
