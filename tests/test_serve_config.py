"""ServeConfig: YAML args over the EdgeAcc-SGLang image's environment; bad settings name their field."""

from __future__ import annotations

import pytest
import yaml

from edgeacc_ray.config import ConfigError, ServeConfig


def test_defaults_serve_smollm2_on_localhost():
    cfg = ServeConfig.from_sources({}, env={})
    assert (cfg.model, cfg.model_name, cfg.host, cfg.port) == (
        "SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct",
        "127.0.0.1",
        8000,
    )
    assert cfg.api_key is None and cfg.engine_num_cpus == 0 and cfg.tensor_parallel_size == 1


def test_image_environment_variables():
    env = {
        "MODEL_PATH": "small",
        "SERVED_MODEL_NAME": "qwen",
        "SERVER_HOST": "0.0.0.0",
        "SERVER_PORT": "30000",
        "TENSOR_PARALLEL_SIZE": "1",
        "ENABLE_EDGE_ACC": "true",
        "EDGEACC_API_KEY": "sk-1",
        "EDGEACC_STREAM_INTERVAL": "4",
        "EDGEACC_ENGINE_CPU_CORES": "0",
    }
    cfg = ServeConfig.from_sources({}, env=env)
    assert (cfg.model, cfg.model_name, cfg.host, cfg.port) == ("small", "qwen", "0.0.0.0", 30000)
    assert cfg.enable_edge_acc is True and cfg.api_key == "sk-1" and cfg.stream_interval == 4
    assert cfg.engine_cpu_cores == [0]
    assert cfg.public_dict()["api_key"] == "***"


def test_args_override_environment():
    cfg = ServeConfig.from_sources(
        {"model": "tiny", "port": 9000}, env={"MODEL_PATH": "small", "SERVER_PORT": "1"}
    )
    assert (cfg.model, cfg.port) == ("tiny", 9000)


@pytest.mark.parametrize(
    "args, env, field",
    [
        ({"port": "http"}, {}, "port (from args)"),
        ({}, {"SERVER_PORT": "99999"}, "port (from env SERVER_PORT='99999')"),
        ({}, {"ENABLE_EDGE_ACC": "maybe"}, "enable_edge_acc (from env ENABLE_EDGE_ACC='maybe')"),
        ({"stream_interval": 0}, {}, "stream_interval"),
        ({"max_num_seqs": -1}, {}, "max_num_seqs"),
        ({"dtype": "int3"}, {}, "dtype"),
        ({"modle": "tiny"}, {}, "modle (from args): unknown setting"),
        (
            {},
            {"TENSOR_PARALLEL_SIZE": "0"},
            "tensor_parallel_size (from env TENSOR_PARALLEL_SIZE='0')",
        ),
        (
            {"pd_mode": "semi_pd"},
            {"TENSOR_PARALLEL_SIZE": "2"},
            "tensor_parallel_size (from env TENSOR_PARALLEL_SIZE='2')",
        ),
        ({"device": "cuda"}, {}, "device"),
        ({"engine_num_gpus": 1.5}, {}, "engine_num_gpus"),
        ({"engine_cpu_cores": [4096]}, {}, "engine_cpu_cores"),
    ],
)
def test_invalid_settings_name_the_field(args, env, field):
    with pytest.raises(ConfigError) as info:
        ServeConfig.from_sources(args, env=env)
    assert field in str(info.value)


def test_serve_config_yaml_is_valid():
    from ray.serve.schema import ServeDeploySchema

    with open("serve_config.yaml") as f:
        doc = yaml.safe_load(f)
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "deployments.app:build_app" and app.route_prefix == "/"
    cfg = ServeConfig.from_sources(app.args, env={})  # its args are valid settings
    # The Ingress replicas serve HTTP on 127.0.0.1:8000 themselves, so Serve's proxy must be off.
    assert cfg.http_server == "ingress" and (cfg.host, cfg.port) == ("127.0.0.1", 8000)
    assert schema.proxy_location == "Disabled"


def test_build_app_rejects_bad_settings_before_deploying():
    from deployments.app import build_app

    with pytest.raises(ConfigError, match="max_request_body_bytes"):
        build_app({"max_request_body_bytes": 1})
    with pytest.raises(ConfigError, match="model: 'no-such-model'"):
        build_app({"model": "no-such-model"})


def test_build_app_binds_ingress_and_colocated_engine():
    from deployments.app import build_app

    app = build_app({"model": "tiny", "engine_num_gpus": 0.5, "ingress_replicas": 1})
    ingress = app._bound_deployment
    assert ingress.name == "Ingress"
    engine = ingress.init_args[1]._bound_deployment
    assert engine.name == "EngineServer"
    assert engine.ray_actor_options["num_cpus"] == 0 and engine.ray_actor_options["num_gpus"] == 0.5
    assert ingress.ray_actor_options["num_cpus"] == 0


def test_enable_edge_acc_selects_semi_pd_unless_pd_mode_is_given():
    assert ServeConfig.from_sources({}, env={}).pd_mode == "colocated"
    cfg = ServeConfig.from_sources({}, env={"ENABLE_EDGE_ACC": "True"})
    assert cfg.pd_mode == "semi_pd" and cfg.engine_config().semi_pd is not None
    assert (
        ServeConfig.model_validate(cfg.model_dump()).pd_mode == "semi_pd"
    )  # survives the trip to replicas
    assert (
        ServeConfig.from_sources({"pd_mode": "colocated"}, env={"ENABLE_EDGE_ACC": "1"}).pd_mode
        == "colocated"
    )
    assert ServeConfig.from_sources({"enable_edge_acc": True}, env={}).pd_mode == "semi_pd"
    with pytest.raises(ConfigError, match="pd_mode"):
        ServeConfig.from_sources(
            {"pd_mode": "semi_pd", "device": "cuda", "engine_num_gpus": 0.5}, env={}
        )


def test_build_app_binds_decode_and_prefill_deployments_for_semi_pd():
    from deployments.app import build_app

    app = build_app({"model": "tiny", "pd_mode": "semi_pd"})
    decode = app._bound_deployment.init_args[1]._bound_deployment
    assert decode.name == "DecodeServer"
    prefill = decode.init_args[1]._bound_deployment
    assert prefill.name == "PrefillServer"
    assert decode.ray_actor_options["num_cpus"] == 0 and prefill.ray_actor_options["num_cpus"] == 0


def test_unknown_edgeacc_variable_warns_with_the_closest_setting(caplog):
    with caplog.at_level("WARNING", logger="ray.serve"):
        cfg = ServeConfig.from_sources(
            {}, env={"EDGEACC_STREAM_INTERVALL": "8", "EDGEACC_CACHE_DIR": "/tmp/x"}
        )
    assert cfg.stream_interval == 4  # ignored, not applied
    [record] = [r for r in caplog.records if "EDGEACC_" in r.getMessage()]
    assert (
        "EDGEACC_STREAM_INTERVALL" in record.getMessage()
        and "EDGEACC_STREAM_INTERVAL " in record.getMessage()
    )


def test_engine_settings_are_inherited_not_copied():
    from edgeacc_ray.config.engine import EngineConfig, EngineSettings

    cfg = ServeConfig.from_sources(
        {"decode_workspace_memory_gb": 0.5}, env={"EDGEACC_PAGE_SIZE": "8"}
    )
    engine = cfg.engine_config()
    assert engine.decode_workspace_memory_gb == 0.5 and engine.page_size == 8
    for name in EngineSettings.model_fields:  # one default for each setting, in one place
        assert ServeConfig.model_fields[name].default == EngineConfig.model_fields[name].default
