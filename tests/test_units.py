"""Unit layouts: which layers hold units, default selection, numbering."""

import pytest
from torch import nn

from bingo import InvalidOptionError, NoPrunableLayersError, find_units
from bingo.models import lenet5, lenet_300_100


def test_weight_layout_covers_every_linear_in_order():
    layout = find_units(lenet_300_100(), "weight")
    assert [g.param_name for g in layout.groups] == ["1.weight", "3.weight", "5.weight"]
    assert [g.num_units for g in layout.groups] == [784 * 300, 300 * 100, 100 * 10]
    assert [g.offset for g in layout.groups] == [0, 784 * 300, 784 * 300 + 300 * 100]
    assert layout.total == 784 * 300 + 300 * 100 + 100 * 10
    assert layout.unit_shape(layout.groups[0]) == (300, 784)


def test_neuron_layout_leaves_out_the_output_layer_unless_included():
    layout = find_units(lenet_300_100(), "neuron")
    assert [g.param_name for g in layout.groups] == ["1.weight", "3.weight"]
    assert [g.num_units for g in layout.groups] == [300, 100]
    assert layout.unit_shape(layout.groups[1]) == (100,)
    forced = find_units(lenet_300_100(), "neuron", include=["*"])
    assert [g.param_name for g in forced.groups] == ["1.weight", "3.weight", "5.weight"]


def test_conv_channels_are_units():
    layout = find_units(lenet5(), "neuron")
    kinds = [(g.param_name, g.kind, g.num_units) for g in layout.groups]
    assert kinds[:2] == [("0.weight", "conv2d", 6), ("3.weight", "conv2d", 16)]
    assert layout.groups[0].bias_name == "0.bias"


def test_include_exclude_patterns():
    model = nn.Sequential()
    model.add_module("enc_a", nn.Linear(3, 4))
    model.add_module("enc_b", nn.Linear(4, 4))
    model.add_module("head", nn.Linear(4, 2, bias=False))
    layout = find_units(model, "weight", include=["enc_*"], exclude="enc_b")
    assert [g.name for g in layout.groups] == ["enc_a"]
    head = find_units(model, "weight", include="head").groups[0]
    assert head.bias_name is None and head.param_name == "head.weight"
    with pytest.raises(InvalidOptionError, match="matches no"):
        find_units(model, "weight", include=["dec_*"])


def test_bare_layer_and_errors():
    layout = find_units(nn.Linear(3, 2), "weight")
    assert layout.groups[0].param_name == "weight"
    with pytest.raises(NoPrunableLayersError):
        find_units(nn.Sequential(nn.ReLU()), "weight")
    with pytest.raises(InvalidOptionError, match="granularity"):
        find_units(nn.Linear(3, 2), "channel")
