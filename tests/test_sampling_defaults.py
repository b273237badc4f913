"""The model's sampling defaults (generation_config.json) fill what an OpenAI request leaves out, as
vLLM does: a request without temperature or repetition_penalty samples as if it had given the model's
values, a request that gives its own keeps them, /get_server_info says which defaults apply, and a
generation_config.json with a value of the wrong type is refused at start-up naming the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from serve_helpers import local_app

from edgeacc_ray.config import ServeConfig
from edgeacc_ray.http.sampling_defaults import GenerationConfigError, SamplingDefaults

MODEL_DEFAULTS = {"temperature": 0.0, "repetition_penalty": 1.8, "top_k": 0}


@pytest.fixture(scope="module")
def model_with_defaults(tiny_model_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_with_defaults") / "tiny"
    shutil.copytree(tiny_model_path, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, **MODEL_DEFAULTS}))
    return folder


@pytest.fixture(scope="module")
def http(model_with_defaults):
    cfg = ServeConfig(
        model=str(model_with_defaults), served_model_name="tiny", kv_cache_memory_gb=0.05
    )
    with local_app(cfg) as client:
        yield client


def completion(http, **fields) -> list[str]:
    body = {"model": "tiny", "prompt": "one two one two one", "max_tokens": 24, **fields}
    r = http.post("/v1/completions", json={**body, "n": 2, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return [c["text"] for c in r.json()["choices"]]


def test_left_out_fields_take_the_models_defaults(http):
    left_out = completion(http)
    assert left_out[0] == left_out[1]  # temperature 0 from the model: greedy, both choices alike
    assert left_out == completion(http, temperature=0, repetition_penalty=1.8)
    assert left_out != completion(http, temperature=0, repetition_penalty=1.0)
    sampled = completion(http, temperature=1.0, seed=7)  # the request's own value wins
    assert sampled[0] != sampled[1]


def test_server_info_says_the_defaults(http):
    info = http.get("/get_server_info").json()
    assert info["default_sampling_params"] == {"temperature": 0.0, "repetition_penalty": 1.8}
    model_info = http.get("/get_model_info").json()
    assert model_info["preferred_sampling_params"] == info["default_sampling_params"]


def test_neutral_without_a_generation_config_and_bad_values_refused(tmp_path):
    assert SamplingDefaults.of_model(tmp_path) == SamplingDefaults()
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": "high"}))
    with pytest.raises(GenerationConfigError, match="top_p must be a number"):
        SamplingDefaults.of_model(tmp_path)
