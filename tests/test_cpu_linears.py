"""float32 linears through oneDNN: the same sums, on the model's own (shareable) weights."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from edgeacc_ray.models.cpu_linears import OneDnnLinear, onednn_fp32_is_faster, use_onednn_fp32


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
