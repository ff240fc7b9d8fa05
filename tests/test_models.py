"""Tests for bingo.models: shapes, the Sequential layout structured pruning needs, registries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bingo.errors import InputMismatchError, InvalidOptionError
from bingo.models import MODELS, build_model, lenet5, lenet_300_100, model_for


def _linear_sizes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)]


def test_lenet_300_100_structure():
    model = lenet_300_100()
    assert type(model) is nn.Sequential
    kinds = [type(m) for m in model]
    assert kinds == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert _linear_sizes(model) == [(784, 300), (300, 100), (100, 10)]


@pytest.mark.parametrize("shape, in_features", [((5, 1, 28, 28), 784), ((5, 1, 8, 8), 64)])
def test_lenet_300_100_output_shape(shape, in_features):
    model = lenet_300_100(in_features=in_features)
    assert model(torch.randn(shape)).shape == (5, 10)


def test_lenet_300_100_num_classes():
    assert lenet_300_100(64, 3)(torch.randn(2, 64)).shape == (2, 3)


def test_lenet5_structure_mnist():
    model = lenet5()
    assert type(model) is nn.Sequential
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 6, (5, 5), (2, 2)),
        (6, 16, (5, 5), (0, 0)),
    ]
    assert _linear_sizes(model) == [(16 * 5 * 5, 120), (120, 84), (84, 10)]


@pytest.mark.parametrize(
    "channels, size, flat",
    [
        (1, 28, 16 * 5 * 5),
        (1, 8, 16 * 2 * 2),
        (3, 32, 16 * 6 * 6),
        (1, 12, 16),
        (1, 10, 64),
        (1, 4, 16),
    ],
)
def test_lenet5_output_shape(channels, size, flat):
    model = lenet5(in_channels=channels, num_classes=7, image_size=size)
    assert _linear_sizes(model)[0] == (flat, 120)
    assert model(torch.randn(3, channels, size, size)).shape == (3, 7)


def test_lenet5_too_small_and_bad_padding():
    with pytest.raises(InputMismatchError, match="image_size=3"):
        lenet5(image_size=3)
    with pytest.raises(InputMismatchError, match="conv2_padding=0"):
        lenet5(image_size=8, conv2_padding=0)
    with pytest.raises(InvalidOptionError, match="conv2_padding"):
        lenet5(conv2_padding=-1)


@pytest.mark.parametrize(
    "kwargs", [{"in_features": 0}, {"num_classes": 2.5}, {"in_features": True}]
)
def test_lenet_300_100_rejects_bad_sizes(kwargs):
    with pytest.raises(InvalidOptionError):
        lenet_300_100(**kwargs)


def test_registry_and_build_model():
    assert MODELS == {"lenet_300_100": lenet_300_100, "lenet5": lenet5}
    model = build_model("lenet_300_100", in_features=64)
    assert _linear_sizes(model)[0] == (64, 300)
    assert build_model("lenet5", image_size=8)(torch.randn(1, 1, 8, 8)).shape == (1, 10)


def test_build_model_unknown_name_lists_choices():
    with pytest.raises(InvalidOptionError, match="'lenet_300_100'.*'lenet5'"):
        build_model("resnet18")


def test_build_model_unknown_argument_lists_accepted():
    with pytest.raises(InvalidOptionError, match="in_features"):
        build_model("lenet_300_100", hidden=50)


def test_model_for_datasets():
    assert model_for("digits")(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert _linear_sizes(model_for("mnist"))[0] == (784, 300)
    assert model_for("digits", "lenet5")(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert model_for("mnist", "lenet5", num_classes=4)(torch.randn(2, 1, 28, 28)).shape == (2, 4)
    with pytest.raises(InvalidOptionError, match="'digits'"):
        model_for("cifar10")
    with pytest.raises(InvalidOptionError, match="'lenet5'"):
        model_for("digits", "vgg")
