"""The run-time adapter layer answers as the module it wraps and computes the merged formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from d2export.runtime.layers import AdapterLayer
from d2export.spec import Rescale


@pytest.mark.parametrize("base", [nn.Linear(6, 4), nn.Linear(6, 4, bias=False), nn.Embedding(10, 4)])
def test_layer_exposes_the_wrapped_modules_attributes(base):
    layer = AdapterLayer(base, rank=2, scale=1.0)
    assert layer.weight is base.weight
    if isinstance(base, nn.Linear):
        assert layer.bias is base.bias and layer.in_features == 6 and layer.out_features == 4
    else:
        assert layer.num_embeddings == 10 and layer.padding_idx is None
    with pytest.raises(AttributeError):
        _ = layer.no_such_attribute


def test_forward_equals_the_merged_weight():
    torch.manual_seed(0)
    base = nn.Linear(6, 4).double()
    layer = AdapterLayer(base, rank=2, scale=0.5, branches=("pos", "neg"), rescale=Rescale.ORIGINAL_NORM, tau=0.3)
    layer = layer.double()
    with torch.no_grad():
        for b in layer.branches:
            layer.A[b].normal_()
            layer.B[b].normal_()
    x = torch.randn(3, 6, dtype=torch.float64)
    v = base.weight + 0.5 * (layer.B["pos"] @ layer.A["pos"]) - 0.3 * 0.5 * (layer.B["neg"] @ layer.A["neg"])
    merged = v * (base.weight.norm(dim=1) / v.norm(dim=1))[:, None]
    torch.testing.assert_close(layer(x), x @ merged.T + base.bias, rtol=1e-6, atol=1e-6)
