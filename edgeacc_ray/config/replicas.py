"""How many replicas a deployment runs: fixed when `min_replicas == max_replicas`, autoscaled between
them otherwise. Nested in `ServeConfig` (`engine_replicas`, `ingress_replicas`); a bare integer means
that many, fixed. `serve_options()` is what `build_app` hands to `Deployment.options`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

ENGINE_POLICY = "deployments.autoscaling_policy:EngineScalingPolicy"
INGRESS_POLICY = "deployments.autoscaling_policy:IngressScalingPolicy"


class ReplicaScaling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    upscale_delay_s: float = Field(
        5.0, ge=0, description="pressure must last this long before a replica is added"
    )
    downscale_delay_s: float = Field(
        60.0, ge=0, description="the quiet period before a replica is removed"
    )
    look_back_period_s: float = Field(
        10.0, gt=0, description="window the replicas' reports are averaged over"
    )

    @model_validator(mode="before")
    @classmethod
    def _count(cls, value: Any) -> Any:
        if (
            isinstance(value, (int, str)) and str(value).strip().isdigit()
        ):  # `engine_replicas: 2` (or env "2")
            return {"min_replicas": int(value), "max_replicas": int(value)}
        return value

    @model_validator(mode="after")
    def _ordered(self) -> "ReplicaScaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas={self.max_replicas} is below min_replicas={self.min_replicas}"
            )
        return self

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas > self.min_replicas

    def _autoscaling(self, **extra: Any) -> dict[str, Any]:
        return dict(
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            initial_replicas=self.min_replicas,
            upscale_delay_s=self.upscale_delay_s,
            downscale_delay_s=self.downscale_delay_s,
            look_back_period_s=self.look_back_period_s,
            **extra,
        )


class EngineScaling(ReplicaScaling):
    """Engine replicas (or Semi-PD pairs), scaled by `deployments.autoscaling_policy.EngineScalingPolicy`
    on waiting requests, KV reserved and TTFT."""

    target_waiting_per_replica: float = Field(
        4.0, gt=0, description="more waiting requests per replica: scale up"
    )
    kv_high: float = Field(
        0.85, gt=0, le=1, description="mean share of KV pages reserved above which to scale up"
    )
    kv_low: float = Field(
        0.5, gt=0, le=1, description="scale down when the rest would stay below this share"
    )

    def serve_options(self, ttft_slo_s: float | None = None) -> dict[str, Any]:
        if not self.autoscaled:
            return {"num_replicas": self.min_replicas}
        policy = {
            "policy_function": ENGINE_POLICY,
            "policy_kwargs": {
                "target_waiting_per_replica": self.target_waiting_per_replica,
                "kv_high": self.kv_high,
                "kv_low": self.kv_low,
                "ttft_slo_s": ttft_slo_s,
            },
        }
        return {"autoscaling_config": self._autoscaling(policy=policy)}


class IngressScaling(ReplicaScaling):
    """HTTP replicas, scaled by `IngressScalingPolicy` on the HTTP requests each replica counts in
    flight (each an open stream). Their own count, not Serve's: requests a replica serves on its own
    socket (`http_server: ingress`) never pass through Serve's request count."""

    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(
        256, gt=0, description="HTTP requests per replica the autoscaler aims at"
    )

    def serve_options(self) -> dict[str, Any]:
        if not self.autoscaled:
            return {"num_replicas": self.min_replicas}
        policy = {
            "policy_function": INGRESS_POLICY,
            "policy_kwargs": {"target_per_replica": self.target_ongoing_requests},
        }
        return {"autoscaling_config": self._autoscaling(policy=policy)}
