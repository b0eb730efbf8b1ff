"""LayerTaps: outputs of named layers, clear errors for unknown names."""

import pytest
import torch
from monai.networks.nets import DenseNet121
from torch import nn

from lorkd.errors import ConfigError
from lorkd.models.taps import LayerTaps, find_layer, layer_names


def test_taps_keep_the_named_layer_outputs():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 1, 6, 6)
    with LayerTaps(model, ["0", "1"]) as taps:
        model(x)
        torch.testing.assert_close(taps["0"], model[0](x))
        torch.testing.assert_close(taps["1"], model[0](x).relu())
        taps.clear()
        with pytest.raises(KeyError):
            taps["0"]
    assert not model[0]._forward_hooks


def test_unknown_layer_suggests_close_names():
    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    assert "features.denseblock4" in layer_names(model)
    with pytest.raises(ConfigError, match=r"teacher\.features.*did you mean 'features\.denseblock4'"):
        find_layer(model, "features.denseblok4", key="teacher.features")
