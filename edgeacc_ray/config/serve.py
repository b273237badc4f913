"""The serving settings: one pydantic model, read from the YAML `args` and the environment.

Precedence, lowest first: defaults < environment variables < `args` (serve_config.yaml or `build_app`).
The environment understands the EdgeAcc-SGLang image's variables (`MODEL_PATH`, `SERVED_MODEL_NAME`,
`SERVER_HOST`, `SERVER_PORT`, `TENSOR_PARALLEL_SIZE`, `ENABLE_EDGE_ACC`) and `EDGEACC_<FIELD>` for
every field (e.g. `EDGEACC_API_KEY`, `EDGEACC_STREAM_INTERVAL`). Unknown keys are errors, every error
names the field (and the variable it came from), and an `EDGEACC_*` variable that names no setting
gets a warning with the closest one. The engine's tunables are `EngineSettings`, inherited.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from typing import Any, Literal, Mapping

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeacc_ray.config.engine import (
    EngineConfig,
    EngineSettings,
    SemiPDConfig,
    SemiPDSettings,
    tensor_parallel_refusal,
)
from edgeacc_ray.config.replicas import EngineScaling, IngressScaling
from edgeacc_ray.config.sglang import SGLangSettings, check_sglang, sglang_semi_pd_default

# Variables of the EdgeAcc-SGLang Docker image -> fields.
IMAGE_ENV_VARS: dict[str, str] = {
    "MODEL_PATH": "model",
    "SERVED_MODEL_NAME": "served_model_name",
    "SERVER_HOST": "host",
    "SERVER_PORT": "port",
    "TENSOR_PARALLEL_SIZE": "tensor_parallel_size",
    "ENABLE_EDGE_ACC": "enable_edge_acc",
}
ENV_PREFIX = "EDGEACC_"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# EDGEACC_* variables that are not serving settings (read elsewhere).
OTHER_ENV_VARS = frozenset({"EDGEACC_CACHE_DIR", "EDGEACC_SMOLLM2_WHEEL"})

logger = logging.getLogger("ray.serve")


class ConfigError(ValueError):
    """Invalid serving settings; the message names each bad field and where it came from."""


class ServeConfig(EngineSettings, SemiPDSettings):
    """Everything `build_app` needs: what to serve, how to expose it, engine knobs, Ray placement."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # What to serve.
    model: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="HF folder, .gguf file, or a built-in name: "
        f"{DEFAULT_MODEL!r} (the default, fetched from PyPI once), 'tiny', 'small' (tests, benchmarks)",
    )
    served_model_name: str | None = Field(
        None, description="name clients use in `model`; default: `model`"
    )
    backend: Literal["native", "sglang"] = Field(
        "native",
        description="native: the PyTorch engine (CPU, CUDA); sglang: SGLang engines on GPU nodes (the `sglang` "
        "extra), set up by `sglang`",
    )
    sglang: SGLangSettings = Field(
        default_factory=SGLangSettings, description="backend sglang: its engines' settings"
    )

    # HTTP. host/port: where the Ingress replicas listen (http_server="ingress"), or the Serve proxy's
    # address for `python -m deployments.launch` (`serve run` takes the proxy's from `http_options`).
    http_server: Literal["proxy", "ingress"] = Field(
        "proxy",
        description="proxy: HTTP enters through Serve's proxy actor, which forwards every request and "
        "every streamed chunk to an Ingress replica over Ray; ingress: each Ingress replica serves "
        "HTTP itself on host:port (SO_REUSEPORT: replicas of a node share the port), one process hop "
        "and its CPU fewer; needs Serve's proxy off (`proxy_location: Disabled`, as serve_config.yaml)",
    )
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = Field(
        None, description="when set, requests need `Authorization: Bearer <key>`"
    )
    max_request_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_n: int = Field(
        16, ge=1, description="largest `n` (choices per prompt) a request may ask for"
    )
    max_request_choices: int | None = Field(
        None,
        ge=1,
        description="most engine requests one HTTP request may start (prompts x n); "
        "default: an eighth of max_num_seqs, so no request holds more than a small share of the batch",
    )

    # Parallelism and the EdgeAcc feature set.
    # tensor_parallel_size is an engine setting (EngineSettings): the native engine's ranks, or SGLang's.
    enable_edge_acc: bool = Field(
        False,
        description="the recommended set: pd_mode semi_pd and "
        "enable_hierarchical_cache (each unless set explicitly)",
    )
    pd_mode: Literal["colocated", "semi_pd"] = Field(
        "colocated",
        description="colocated: one engine does both phases; semi_pd: prefill and decode deployments "
        "on shares of the same device, one pool and one copy of the weights",
    )

    # Semi-PD (pd_mode semi_pd): its tunables are `SemiPDSettings`, inherited. On CPU the pair
    # splits engine_cpu_cores (default: every core).

    # Engine (the tunables themselves are `EngineSettings`, inherited).
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # Ray placement and Serve options.
    engine_num_gpus: float = Field(
        0.0, ge=0, description="GPUs per engine replica; fractions share a device"
    )
    engine_num_cpus: float = Field(
        0.0, ge=0, description="CPUs Ray accounts per engine replica (0: fits any box)"
    )
    engine_cpu_cores: list[int] | None = Field(
        None, description="pin the engine process to these cores"
    )
    engine_resources: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources"
    )
    engine_max_ongoing_requests: int = Field(1024, ge=1)
    engine_replicas: EngineScaling = Field(
        default_factory=EngineScaling,
        description="engine replicas (semi_pd: "
        "pairs); autoscaled on waiting requests, KV and TTFT when max > min",
    )
    ingress_replicas: IngressScaling = Field(
        default_factory=IngressScaling,
        description="HTTP replicas; autoscaled on requests in flight when max > min",
    )
    ingress_max_ongoing_requests: int = Field(
        512, ge=1, description="HTTP requests one Ingress replica serves at once"
    )
    ingress_max_queued_requests: int = Field(
        1024,
        ge=-1,
        description="HTTP requests the proxy holds while every Ingress replica is full; one more gets "
        "429 + Retry-After before it reaches a replica (-1: unbounded)",
    )
    access_log: bool = Field(
        True,
        description="Serve's access log line for every HTTP request (the engine "
        "deployments never log their internal calls)",
    )
    request_router: Literal["cache_aware", "least_loaded"] = Field(
        "cache_aware",
        description="how new requests pick an engine replica: the one holding the longest prefix of "
        "the prompt unless it is router_imbalance requests busier than the least loaded, or always the least loaded",
    )
    router_imbalance: int = Field(
        8, ge=0, description="cache_aware: extra load a prefix-holding replica may carry"
    )
    engine_stream_mode: Literal["multiplexed", "per_request"] = Field(
        "multiplexed",
        description="one output stream per Ingress replica for all its requests, or one per request",
    )

    @field_validator("engine_cpu_cores")
    @classmethod
    def _cores_exist(cls, cores: list[int] | None) -> list[int] | None:
        if cores is None:
            return None
        available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        if not cores:
            raise ValueError("must name at least one core or be null")
        if available is not None and any(c not in available for c in cores):
            raise ValueError(
                f"cores {cores} are not all available on this machine (available: {available})"
            )
        return sorted(set(cores))

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        if self.enable_edge_acc and "pd_mode" not in self.model_fields_set:
            self.pd_mode = (
                "semi_pd"
                if self.backend == "native" or sglang_semi_pd_default(self)
                else "colocated"
            )
        if self.enable_edge_acc and "enable_hierarchical_cache" not in self.model_fields_set:
            self.enable_hierarchical_cache = (
                self.enable_prefix_caching
            )  # the tier needs the prefix keys
        if self.backend == "sglang":
            check_sglang(self)
        elif self.pd_mode == "semi_pd" and self.engine_device() != "cpu":
            raise ValueError(
                "pd_mode='semi_pd' runs on CPU nodes in this build (the CUDA path, IPC handles and "
                "an MPS split, is not implemented yet); use pd_mode='colocated' on GPUs"
            )
        if self.pd_mode == "semi_pd" and self.engine_replicas.autoscaled:
            raise ValueError(
                "engine_replicas: semi_pd pairs are not autoscaled in this build (the prefill and decode "
                "deployments would scale apart); set min_replicas == max_replicas"
            )
        if self.backend == "native" and self.tensor_parallel_size > 1:
            # checked here too, before engine_config(), so the error names where the setting came from
            refusal = tensor_parallel_refusal(
                self.tensor_parallel_size, self.pd_mode == "semi_pd", self.enable_hierarchical_cache
            )
            if refusal is not None:
                raise ValueError(refusal)
            if self.engine_device() == "cuda" and self.engine_num_gpus != 1:
                raise ValueError(
                    f"tensor_parallel_size={self.tensor_parallel_size}: each rank needs a whole GPU; "
                    f"set engine_num_gpus=1 (got {self.engine_num_gpus})"
                )
        if self.device == "cuda" and self.engine_num_gpus <= 0:
            raise ValueError(
                "device='cuda' needs engine_num_gpus > 0 so Ray gives the engine a GPU"
            )
        if self.engine_num_gpus > 1 and self.engine_num_gpus != int(self.engine_num_gpus):
            raise ValueError(f"engine_num_gpus={self.engine_num_gpus}: fractions must be <= 1")
        if self.max_model_len is not None and self.num_pages is not None:
            if self.num_pages * self.page_size < self.max_model_len:
                raise ValueError(
                    f"num_pages*page_size={self.num_pages * self.page_size} tokens cannot hold one sequence of "
                    f"max_model_len={self.max_model_len} tokens"
                )
        return self

    # ---- derived ----------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The name clients pass as `model` (SGLang: --served-model-name, default the model path)."""
        return self.served_model_name or self.model

    def engine_device(self) -> str:
        if self.device != "auto":
            return self.device
        if self.engine_num_gpus > 0:
            try:
                import torch

                if torch.cuda.is_available():
                    return "cuda"
            except Exception:  # pragma: no cover - torch always present in practice
                pass
        return "cpu"

    def engine_config(self) -> EngineConfig:
        """The engine's settings: the inherited tunables, the device resolved, Semi-PD's from pd_mode."""
        semi_pd = SemiPDConfig(
            **self.model_dump(include=set(SemiPDSettings.model_fields)),
            cores=tuple(self.engine_cpu_cores or ()),
            tpot_slo_ms=self.tpot_slo_ms,
        )
        return EngineConfig(
            **self.model_dump(include=set(EngineSettings.model_fields)),
            model=self.model,
            device=self.engine_device(),
            semi_pd=semi_pd if self.pd_mode == "semi_pd" else None,
        )

    @property
    def request_choices_limit(self) -> int:
        return self.max_request_choices or max(1, self.max_num_seqs // 8)

    def public_dict(self) -> dict[str, Any]:
        """The settings as /get_server_info shows them (the API key hidden)."""
        data = self.model_dump()
        if data.get("api_key"):
            data["api_key"] = "***"
        return data

    # ---- loading ----------------------------------------------------------------------------

    @classmethod
    def from_sources(
        cls, args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> "ServeConfig":
        """Defaults < environment < args. Raise ConfigError naming each invalid field and its source."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        source: dict[str, str] = {}
        fields = cls.model_fields
        _warn_unknown_env(env, fields)
        for name in fields:
            var = ENV_PREFIX + name.upper()
            if env.get(var, "") != "":
                values[name] = _env_value(name, env[var])
                source[name] = f"env {var}={env[var]!r}"
        for var, name in IMAGE_ENV_VARS.items():  # the image's names win over EDGEACC_* duplicates
            if env.get(var, "") != "":
                values[name] = _env_value(name, env[var])
                source[name] = f"env {var}={env[var]!r}"
        for key, value in dict(args or {}).items():
            values[key] = value
            source[key] = "args"
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, source)) from None


def _warn_unknown_env(env: Mapping[str, str], fields: Mapping[str, Any]) -> None:
    """An EDGEACC_* variable that names no setting is most likely a typo: say so and suggest one."""
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in OTHER_ENV_VARS:
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name in fields:
            continue
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f"; did you mean {ENV_PREFIX + close[0].upper()} ({close[0]})?" if close else ""
        logger.warning(
            "environment variable %s names no EdgeAcc setting and is ignored%s", var, hint
        )


def _env_value(name: str, raw: str) -> Any:
    """Environment strings are parsed by pydantic; list/dict fields take JSON or comma lists."""
    if name == "engine_cpu_cores":
        raw = raw.strip()
        if raw.startswith("["):
            import json

            return json.loads(raw)
        return [part.strip() for part in raw.split(",") if part.strip()]
    if name in ("engine_resources", "sglang") or (
        name.endswith("_replicas") and raw.strip().startswith("{")
    ):
        import json

        return json.loads(raw)
    nullable = (
        "served_model_name",
        "api_key",
        "num_pages",
        "decode_workspace_memory_gb",
        "max_model_len",
        "max_request_choices",
        "tpot_slo_ms",
        "ttft_slo_ms",
        "num_threads",
        "max_queue_wait_s",
        "queue_timeout_s",
        "reservation_clip_tokens",
    )
    if raw.strip().lower() in ("none", "null") and name in nullable:
        return None
    return raw


def _describe(exc: ValidationError, source: Mapping[str, str]) -> str:
    lines = [
        f"invalid EdgeAcc serving config ({exc.error_count()} error{'s' if exc.error_count() > 1 else ''}):"
    ]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        field = str(err["loc"][0]) if err["loc"] else ""
        where = f" (from {source[field]})" if field in source else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting; known settings: " + ", ".join(ServeConfig.model_fields)
        elif not err["loc"]:  # model-level check: its message starts with the field name
            loc = re.split(r"[=\s]", msg, maxsplit=1)[0]
            where = f" (from {source[loc]})" if loc in source else ""
        lines.append(f"  {loc}{where}: {msg}")
    return "\n".join(lines)
