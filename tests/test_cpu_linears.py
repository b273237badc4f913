"""float32 linears through oneDNN: the same sums, on the model's own (shareable) weights; Semi-PD's
prefill process takes the decode side's verdict instead of measuring its own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeacc_ray.engine.kv import StorageSpec, export, map_storage
from edgeacc_ray.engine.runner import kv_pool_shape
from edgeacc_ray.models.cpu_linears import (
    OneDnnLinear,
    onednn_fp32_is_faster,
    runs_on_onednn_fp32,
    use_onednn_fp32,
)
from edgeacc_ray.models.loader import load_model


def test_onednn_linear_keeps_the_weights_and_matches_f_linear():
    linear = nn.Linear(64, 96, bias=True).requires_grad_(False)
    routed = OneDnnLinear(linear)
    assert routed.weight is linear.weight and routed.bias is linear.bias  # no copy: still shared
    assert dict(routed.named_parameters()).keys() == {"weight", "bias"}  # the checkpoint's names
    x = torch.randn(5, 64)
    torch.testing.assert_close(routed(x), F.linear(x, linear.weight, linear.bias))


def test_only_float32_cpu_models_are_routed_and_only_where_onednn_measured_faster():
    args = SimpleNamespace(hidden_size=64, intermediate_size=128)  # the two fields it reads
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    assert not use_onednn_fp32(model, args)
    model = nn.Sequential(nn.Linear(64, 64))
    routed = use_onednn_fp32(model, args)
    assert routed == onednn_fp32_is_faster(64, 256, torch.get_num_threads())
    assert isinstance(model[0], OneDnnLinear) == routed


@pytest.mark.parametrize("verdict", [False, True])
def test_a_given_verdict_is_taken_without_measuring(verdict):
    args = SimpleNamespace(hidden_size=64, intermediate_size=128)
    model = nn.Sequential(nn.Linear(64, 64))
    assert use_onednn_fp32(model, args, verdict=verdict) == verdict
    assert runs_on_onednn_fp32(model) == verdict


@pytest.mark.parametrize("verdict", [False, True])
def test_the_prefill_side_maps_the_model_with_the_decode_sides_verdict(tiny_model_path, verdict):
    """Both processes of a pair run the same kernels, so their float32 sums agree bit for bit."""
    model, args = load_model(tiny_model_path, "float32", "cpu", pack=False)
    storage = export(model, kv_pool_shape(args, 4, 16))
    try:
        spec = StorageSpec(storage.arena.manifest, tiny_model_path, "float32", verdict)
        mapped = map_storage(spec)
        try:
            assert runs_on_onednn_fp32(mapped.model) == verdict
        finally:
            mapped.close()
    finally:
        storage.close()
