"""backend: sglang, everything that runs without a GPU or SGLang: the settings -> SGLang ServerArgs mapping (every
field, the image's environment variables, the example config), our requests -> SGLang's sampling_params, SGLang's
recorded stream output -> our RequestOutput chunks, the Serve placement (and that its bundles are placeable on a
Ray cluster with declared GPUs), and the build-time error when SGLang is missing.

The stream items below are the dicts SGLang 0.5.23 yields from `Engine.async_generate(stream=True)` with
`incremental_streaming_output=True` for a request given as input_ids: built in
`python/sglang/srt/managers/tokenizer_manager.py`, `TokenizerManager._handle_batch_output` (meta_info keys "id",
"finish_reason", "prompt_tokens", "weight_version", "num_retractions", then "reasoning_tokens", "completion_tokens",
"cached_tokens"; out_dict {"text", "output_ids", "meta_info"} on the `incremental` branch), logprobs as
`detokenize_logprob_tokens` gives them ((logprob, token_id, None) without return_text_in_logprobs) sliced by
`_slice_streaming_output_meta_info`; finish reasons from `managers/schedule_batch.py` `FINISH_*.to_json()`.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from edgeacc_ray.config import ConfigError, ServeConfig
from edgeacc_ray.engine.request import (
    EngineOverloaded,
    EngineUnavailable,
    InvalidRequest,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
)
from edgeacc_ray.sglang_backend.outputs import SGLangStream
from edgeacc_ray.sglang_backend.requests import logprob_args, sampling_params
from edgeacc_ray.sglang_backend.server_args import server_args

ROOT = Path(__file__).resolve().parents[1]
MODEL = "/models/Qwen3-32B"


def sglang_cfg(**args) -> ServeConfig:
    return ServeConfig.from_sources({"backend": "sglang", **args}, env={})


# ---- ServeConfig -> sglang.Engine kwargs ---------------------------------------------------------------


def test_colocated_args_map_every_setting():
    cfg = sglang_cfg(
        model=MODEL,
        served_model_name="qwen3",
        tensor_parallel_size=8,
        dtype="bfloat16",
        seed=7,
        page_size=32,
        max_num_seqs=128,
        max_num_batched_tokens=8192,
        max_model_len=32768,
        stream_interval=2,
        max_queued_requests=512,
        new_token_ratio_init=0.35,
        enable_hierarchical_cache=True,
        kv_cache_offload_memory_gb=64,
        sglang={
            "mem_fraction_static": 0.8,
            "hicache_size_gb": 16,
            "hicache_timeout_s": 2.0,
            "extra_args": {"schedule_policy": "lpm"},
        },
    )
    args = server_args(cfg, MODEL, "colocated")
    extra = json.loads(args.pop("hicache_storage_backend_extra_config"))
    assert args == {
        "model_path": MODEL,
        "served_model_name": "qwen3",
        "tp_size": 8,
        "dtype": "bfloat16",
        "random_seed": 7,
        "page_size": 32,
        "stream_interval": 2,
        "incremental_streaming_output": True,
        "skip_tokenizer_init": False,
        "disable_radix_cache": False,
        "grammar_backend": "llguidance",
        "constrained_json_disable_any_whitespace": True,
        "max_running_requests": 128,
        "chunked_prefill_size": 8192,
        "schedule_conservativeness": 0.5,
        "context_length": 32768,
        "max_queued_requests": 512,
        "mem_fraction_static": 0.8,
        "enable_hierarchical_cache": True,
        "hicache_storage_backend": "dynamic",
        "hicache_size": 16,
        "schedule_policy": "lpm",
    }
    assert extra == {
        "backend_name": "edgeacc_ray",
        "module_path": "kv_store.sglang_backend",
        "class_name": "HiCacheRayStore",
        "kv_cache_offload_memory_gb": 64.0,
        "timeout_s": 2.0,
    }


def test_native_cpu_defaults_leave_sglang_its_own():
    args = server_args(
        sglang_cfg(model=MODEL, enable_prefix_caching=False, max_queued_requests=-1),
        MODEL,
        "colocated",
    )
    for sglang_default in (
        "max_running_requests",
        "chunked_prefill_size",
        "schedule_conservativeness",
        "context_length",
        "max_queued_requests",
        "mem_fraction_static",
        "enable_hierarchical_cache",
    ):
        assert sglang_default not in args
    assert (
        args["disable_radix_cache"] is True
        and args["tp_size"] == 1
        and args["served_model_name"] == MODEL
    )
    replica_cfg = ServeConfig.model_validate(
        sglang_cfg(model=MODEL).model_dump()
    )  # as a replica rebuilds it
    assert server_args(replica_cfg, MODEL, "colocated") == server_args(
        sglang_cfg(model=MODEL), MODEL, "colocated"
    )


def test_semi_pd_roles_split_one_gpu_and_pair_by_bootstrap():
    cfg = sglang_cfg(
        model=MODEL,
        pd_mode="semi_pd",
        enable_hierarchical_cache=True,
        sglang={"prefill_gpu_share": 0.4, "semi_pd_mem_fraction": 0.9, "transfer_backend": "nixl"},
    )
    prefill, decode = (
        server_args(cfg, MODEL, "prefill", bootstrap_port=9100),
        server_args(cfg, MODEL, "decode"),
    )
    assert (prefill["disaggregation_mode"], decode["disaggregation_mode"]) == ("prefill", "decode")
    assert (prefill["mem_fraction_static"], decode["mem_fraction_static"]) == (0.36, 0.54)
    assert (
        prefill["disaggregation_bootstrap_port"] == 9100
        and decode["disaggregation_bootstrap_port"] == 8998
    )
    assert (
        prefill["disaggregation_transfer_backend"]
        == decode["disaggregation_transfer_backend"]
        == "nixl"
    )
    assert (
        prefill["enable_hierarchical_cache"] and "enable_hierarchical_cache" not in decode
    )  # the tier serves prompts
    assert decode["disaggregation_decode_enable_radix_cache"] is True
    assert (
        "max_queued_requests" not in prefill and "max_queued_requests" not in decode
    )  # ignored by SGLang in PD


@pytest.mark.parametrize(
    "args, field",
    [
        (
            {"pd_mode": "semi_pd", "tensor_parallel_size": 8},
            "pd_mode='semi_pd' with tensor_parallel_size=8",
        ),
        ({"device": "cpu"}, "device='cpu'"),
        ({"sglang": {"extra_args": {"tp_size": 2}}}, "sglang.extra_args"),
        ({"sglang": {"prefill_gpu_share": 1.0}}, "sglang.prefill_gpu_share"),
        ({"sglang": {"mem_fractoin_static": 0.8}}, "sglang.mem_fractoin_static"),
    ],
)
def test_what_sglang_cannot_run_is_refused(args, field):
    with pytest.raises(ConfigError) as err:
        sglang_cfg(**args)
    assert field in str(err.value)


def test_enable_edge_acc_picks_semi_pd_only_where_it_can_be_placed():
    env = {"ENABLE_EDGE_ACC": "True"}
    one_gpu = ServeConfig.from_sources({"backend": "sglang"}, env=env)
    tp8 = ServeConfig.from_sources({"backend": "sglang"}, env={**env, "TENSOR_PARALLEL_SIZE": "8"})
    assert (one_gpu.pd_mode, tp8.pd_mode) == ("semi_pd", "colocated")
    assert one_gpu.enable_hierarchical_cache and tp8.enable_hierarchical_cache


def test_example_config_takes_the_image_environment():
    app = yaml.safe_load((ROOT / "examples" / "qwen3-32b-tp8.yaml").read_text())["applications"][0]
    env = {
        "MODEL_PATH": MODEL,
        "SERVED_MODEL_NAME": "Qwen3-32B",
        "TENSOR_PARALLEL_SIZE": "8",
        "ENABLE_EDGE_ACC": "True",
        "EDGEACC_KV_CACHE_OFFLOAD_MEMORY_GB": "64",
    }
    cfg = ServeConfig.from_sources(app["args"], env=env)
    args = server_args(cfg, cfg.model, "colocated")
    assert (args["model_path"], args["served_model_name"], args["tp_size"]) == (
        MODEL,
        "Qwen3-32B",
        8,
    )
    assert args["enable_hierarchical_cache"] and args["hicache_storage_backend"] == "dynamic"
    assert (
        json.loads(args["hicache_storage_backend_extra_config"])["kv_cache_offload_memory_gb"]
        == 64.0
    )
    assert (
        args["mem_fraction_static"] == 0.85
        and args["hicache_size"] == 16
        and args["schedule_policy"] == "lpm"
    )
    off = ServeConfig.from_sources(
        app["args"], env={**env, "EDGEACC_ENABLE_HIERARCHICAL_CACHE": "false"}
    )
    assert "enable_hierarchical_cache" not in server_args(off, MODEL, "colocated")


def test_the_storage_backend_sglang_is_told_to_load_is_our_tier():
    """What SGLang's `dynamic` backend factory does with the extra config: import module_path, take
    class_name, check it is a HiCacheStorage."""
    extra = json.loads(
        server_args(sglang_cfg(enable_hierarchical_cache=True), MODEL, "colocated")[
            "hicache_storage_backend_extra_config"
        ]
    )
    backend = getattr(importlib.import_module(extra["module_path"]), extra["class_name"])
    from kv_store.sglang_backend import HiCacheStorage

    assert issubclass(backend, HiCacheStorage)


# ---- requests -------------------------------------------------------------------------------------------


def test_sampling_params_map_to_sglang_names():
    params = SamplingParams(
        max_tokens=64,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=3,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=1.1,
        stop=["\n\n"],
        stop_token_ids=[13],
        ignore_eos=True,
        skip_special_tokens=False,
        min_tokens=4,
        logit_bias={42: -100.0},
        structured=StructuredOutput("regex", "[0-9]+"),
    )
    assert sampling_params(params) == {
        "max_new_tokens": 64,
        "min_new_tokens": 4,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "skip_special_tokens": False,
        "n": 1,
        "stop": ["\n\n"],
        "stop_token_ids": [13],
        "logit_bias": {"42": -100.0},
        "sampling_seed": 3,
        "regex": "[0-9]+",
    }
    plain = sampling_params(SamplingParams(top_k=0))
    assert plain["top_k"] == -1 and not {
        "stop",
        "stop_token_ids",
        "logit_bias",
        "sampling_seed",
    } & set(plain)


@pytest.mark.parametrize(
    "structured, expected",
    [
        (
            StructuredOutput("json_schema", '{"type": "integer"}'),
            {"json_schema": '{"type": "integer"}'},
        ),
        (StructuredOutput("json_object"), {"json_schema": '{"type": "object"}'}),
        (StructuredOutput("ebnf", 'root ::= "a"'), {"ebnf": 'root ::= "a"'}),
        (StructuredOutput("lark", 'start: "a"'), {"ebnf": 'start: "a"'}),
    ],
)
def test_structured_outputs_become_sglang_grammars(structured, expected):
    out = sampling_params(SamplingParams(structured=structured))
    assert {k: out[k] for k in ("json_schema", "regex", "ebnf") if k in out} == expected


def test_logprob_arguments():
    assert logprob_args(SamplingParams()) == {"return_logprob": False}
    assert logprob_args(SamplingParams(logprobs=0)) == {
        "return_logprob": True,
        "top_logprobs_num": 0,
        "logprob_start_len": -1,
    }
    assert logprob_args(SamplingParams(logprobs=2))["top_logprobs_num"] == 2


# ---- SGLang's stream -> RequestOutput -------------------------------------------------------------------


def sglang_item(
    text: str, ids: list[int], completion: int, finish: dict | None = None, logprobs=None, top=None
) -> dict:
    """One item as TokenizerManager._handle_batch_output builds it (incremental streaming, BatchStrOutput)."""
    meta = {
        "id": "r1",
        "finish_reason": finish,
        "prompt_tokens": 7,
        "weight_version": "default",
        "num_retractions": 0,
        "reasoning_tokens": 0,
        "completion_tokens": completion,
        "cached_tokens": 4,
    }
    if logprobs is not None:
        meta.update(
            input_token_logprobs=[],
            output_token_logprobs=logprobs,
            output_token_logprobs_length=completion,
            input_top_logprobs=[],
            output_top_logprobs=top,
        )
    if finish is not None:
        meta["e2e_latency"] = 0.25
    return {"text": text, "output_ids": ids, "meta_info": meta}


def test_a_recorded_stream_becomes_our_chunks():
    stream = SGLangStream("r1", stop_token_ids=[])
    recorded = [
        sglang_item(
            " Paris",
            [12095],
            1,
            logprobs=[(-0.125, 12095, None)],
            top=[[(-0.125, 12095, None), (-2.5, 4342, None)]],
        ),
        # two queued items coalesced (_coalesce_streaming_chunks): ids and text joined, logprob lists joined
        sglang_item(
            ".",
            [13, 151645],
            3,
            finish={"type": "stop", "matched": 151645},
            logprobs=[(-0.5, 13, None), (-0.01, 151645, None)],
            top=[[(-0.5, 13, None)], None],
        ),
    ]
    first, last = (stream.chunk(item) for item in recorded)
    assert (first.token_ids, first.text, first.finished, first.num_output_tokens) == (
        [12095],
        " Paris",
        False,
        1,
    )
    assert first.logprobs == [TokenLogprob(12095, -0.125, [(12095, -0.125), (4342, -2.5)])]
    assert (first.num_prompt_tokens, first.num_cached_tokens) == (7, 4)
    assert (last.token_ids, last.text, last.finished, last.finish_reason) == (
        [13, 151645],
        ".",
        True,
        "stop",
    )
    assert (
        last.stop_reason is None
    )  # EOS, as the native engine reports it (SGLang names the EOS id)
    assert last.logprobs == [TokenLogprob(13, -0.5, [(13, -0.5)]), TokenLogprob(151645, -0.01, [])]
    assert last.num_output_tokens == 3


@pytest.mark.parametrize(
    "finish, stop_ids, reason, stop_reason",
    [
        ({"type": "stop", "matched": "\n\n"}, [], "stop", "\n\n"),
        ({"type": "stop", "matched": 13}, [13], "stop", 13),
        ({"type": "length", "length": 16}, [], "length", None),
        (
            {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None},
            [],
            "abort",
            None,
        ),
    ],
)
def test_finish_reasons(finish, stop_ids, reason, stop_reason):
    out = SGLangStream("r1", stop_ids).chunk(sglang_item("", [], 16, finish=finish))
    assert (out.finished, out.finish_reason, out.stop_reason, out.logprobs) == (
        True,
        reason,
        stop_reason,
        None,
    )


@pytest.mark.parametrize(
    "status, error", [(503, EngineOverloaded), (400, InvalidRequest), (500, EngineUnavailable)]
)
def test_aborts_with_a_status_are_typed_errors(status, error):
    finish = {
        "type": "abort",
        "message": "The request queue is full.",
        "status_code": status,
        "err_type": None,
    }
    with pytest.raises(error) as err:
        SGLangStream("r1", []).chunk(sglang_item("", [], 0, finish=finish))
    assert str(err.value) == "The request queue is full."
    if status == 503:
        assert err.value.retry_after_s == 1


# ---- Serve placement ------------------------------------------------------------------------------------


def test_colocated_replica_holds_one_gpu_bundle_per_rank():
    from deployments.sglang_server import bind_sglang_engine

    cfg = sglang_cfg(model=MODEL, tensor_parallel_size=8, engine_num_cpus=1)
    deployment = bind_sglang_engine(cfg, MODEL, {"max_ongoing_requests": 64})._bound_deployment
    assert deployment.name == "SGLangEngineServer" and deployment.max_ongoing_requests == 64
    assert deployment.ray_actor_options["num_gpus"] == 0
    assert deployment._replica_config.placement_group_bundles == [{"CPU": 1.0}] + [{"GPU": 1.0}] * 8
    assert deployment._replica_config.placement_group_strategy == "STRICT_PACK"


def test_semi_pd_replicas_take_shares_of_one_gpu():
    from deployments.sglang_server import bind_sglang_engine

    cfg = sglang_cfg(model=MODEL, pd_mode="semi_pd", sglang={"prefill_gpu_share": 0.4})
    decode = bind_sglang_engine(cfg, MODEL, {})._bound_deployment
    prefill = decode.init_args[2]._bound_deployment
    assert (decode.name, prefill.name) == ("SGLangDecodeServer", "SGLangPrefillServer")
    assert (prefill.ray_actor_options["num_gpus"], decode.ray_actor_options["num_gpus"]) == (
        0.4,
        0.6,
    )
    assert decode._replica_config.placement_group_bundles is None


PLACEABLE = textwrap.dedent("""
    import json, sys
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from deployments.sglang_server import placement
    from edgeacc_ray.config import ServeConfig

    ray.init(address="local", num_cpus=2, num_gpus=8, include_dashboard=False, log_to_driver=False)
    result = {}
    tp8 = placement(ServeConfig.from_sources({"backend": "sglang", "tensor_parallel_size": 8}, env={}), "colocated")
    group = placement_group(tp8["placement_group_bundles"], strategy=tp8["placement_group_strategy"])
    result["tp8_ready"] = group.wait(30)
    second = placement_group(tp8["placement_group_bundles"], strategy=tp8["placement_group_strategy"])
    result["second_tp8_ready"] = second.wait(2)  # the node has 8 GPUs: one TP=8 replica only
    remove_placement_group(second)
    remove_placement_group(group)

    # semi_pd: leave one GPU free, then the prefill and decode shares must land on it together.
    others = placement_group([{"GPU": 1}] * 7, strategy="STRICT_PACK")
    assert others.wait(30)
    cfg = ServeConfig.from_sources({"backend": "sglang", "pd_mode": "semi_pd",
                                    "sglang": {"prefill_gpu_share": 0.4}}, env={})

    @ray.remote(num_cpus=0)
    class Replica:
        def gpus(self):
            import os
            return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

    sides = [Replica.options(**placement(cfg, role)["ray_actor_options"]).remote() for role in ("prefill", "decode")]
    result["sides"] = ray.get([side.gpus.remote() for side in sides], timeout=60)
    third = Replica.options(num_gpus=0.4).remote()
    ready, _ = ray.wait([third.gpus.remote()], timeout=3)
    result["third_placed"] = bool(ready)
    print("RESULT " + json.dumps(result))
""")


def test_the_placements_fit_a_node_with_declared_gpus():
    """On a Ray cluster of its own (8 declared GPUs; the session's cluster is left alone)."""
    proc = subprocess.run(
        [sys.executable, "-c", PLACEABLE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["tp8_ready"] is True and result["second_tp8_ready"] is False
    (prefill_ids, prefill_visible), (decode_ids, decode_visible) = result["sides"]
    assert len(prefill_ids) == 1 and prefill_ids == decode_ids  # one GPU, shared
    assert (
        prefill_visible == decode_visible == str(prefill_ids[0])
    )  # what SGLang's scheduler process will use
    assert result["third_placed"] is False  # 0.4 + 0.6 fill it


# ---- SGLang missing -------------------------------------------------------------------------------------


def test_building_without_sglang_names_the_extra(tiny_model_path):
    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("SGLang is installed here")
    from deployments.app import build_app

    with pytest.raises(ConfigError) as err:
        build_app({"backend": "sglang", "model": tiny_model_path})
    assert "backend: 'sglang' needs SGLang" in str(err.value) and "edgeacc-ray[sglang]" in str(
        err.value
    )


def test_a_replica_without_sglang_fails_at_start_with_the_extra_named():
    from edgeacc_ray.sglang_backend.engine import SGLangEngine, SGLangNotInstalled

    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("SGLang is installed here")
    with pytest.raises(SGLangNotInstalled, match=r"edgeacc-ray\[sglang\]"):
        SGLangEngine(sglang_cfg(model=MODEL), MODEL, "colocated", rank_bundles=[1])
