"""SGLang's native request shape: /generate, with `sampling_params` as `sglang.srt.sampling.sampling_params`."""

from __future__ import annotations

from typing import Any, Union

from pydantic import ConfigDict

from edgeacc_ray.http.protocol.common import RequestModel


class GenerateSamplingParams(RequestModel):
    """SGLang's sampling parameters (names and defaults as SGLang); unknown names are errors."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    n: int = 1
    sampling_seed: int | None = None
    seed: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    logit_bias: dict[str, float] | None = None
    custom_params: dict[str, Any] | None = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class GenerateRequest(RequestModel):
    text: Union[str, list[str], None] = None
    input_ids: Union[list[int], list[list[int]], None] = None
    sampling_params: Union[GenerateSamplingParams, list[GenerateSamplingParams], None] = None
    stream: bool = False
    return_logprob: Union[bool, list[bool]] = False
    logprob_start_len: Union[int, list[int]] = -1
    top_logprobs_num: Union[int, list[int]] = 0
    return_text_in_logprobs: bool = False
    rid: Union[str, list[str], None] = None
    # Not implemented; declared so that a request setting them is refused with a 400 naming them
    # (preprocess.UNSUPPORTED_GENERATE), not silently dropped as unknown fields.
    input_embeds: Any = None
    image_data: Any = None
    audio_data: Any = None
    video_data: Any = None
    lora_path: Any = None
    custom_logit_processor: Any = None
    token_ids_logprob: Any = None
    session_params: Any = None
    return_hidden_states: bool = False


def sglang_finish_reason(
    reason: str | None, stop_reason: Any, max_new_tokens: int, last_token: int | None
) -> dict[str, Any] | None:
    if reason is None:
        return None
    if reason == "length":
        return {"type": "length", "length": max_new_tokens}
    if reason == "stop":
        return {"type": "stop", "matched": stop_reason if stop_reason is not None else last_token}
    return {"type": "abort", "message": str(stop_reason or "aborted")}
