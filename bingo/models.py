"""The reference networks of the experiments, LeNet-300-100 and LeNet-5, as plain Sequentials.

Plain Sequentials on purpose: structured pruning shrinks a model by rebuilding consecutive
layers, which needs the layer order to be the module order.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from bingo.errors import InputMismatchError, InvalidOptionError, require_option

__all__ = ["MODELS", "build_model", "lenet5", "lenet_300_100", "model_for"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(f"{name} must be a positive integer, got {value!r}")
    return value


def lenet_300_100(in_features: int = 784, num_classes: int = 10) -> nn.Sequential:
    """The lottery-ticket paper's MLP: ``in_features -> 300 -> 100 -> num_classes`` with ReLUs.

    Accepts any input whose trailing dimensions flatten to ``in_features``
    (784 for 28x28 MNIST, 64 for 8x8 digits).
    """
    _positive_int("in_features", in_features)
    _positive_int("num_classes", num_classes)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


LENET5_MIN_IMAGE_SIZE = 4
"""Smallest image side LeNet-5 accepts (with the padded second convolution)."""


def _lenet5_conv2_padding(image_size: int) -> int:
    # The classic valid 5x5 conv after the first pool needs image_size >= 12 to leave a pixel
    # after the second pool; below that (8x8 digits) "same" padding keeps the net usable.
    return 0 if (image_size // 2 - 4) // 2 >= 1 else 2


def lenet5(
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    conv2_padding: int | None = None,
) -> nn.Sequential:
    """LeNet-5 (with ReLU and max-pooling) for square ``image_size`` x ``image_size`` inputs.

    Layers: Conv(in, 6, 5, pad 2), ReLU, MaxPool(2), Conv(6, 16, 5, pad p), ReLU, MaxPool(2),
    Flatten, Linear(16*s*s, 120), ReLU, Linear(120, 84), ReLU, Linear(84, num_classes).

    ``conv2_padding=None`` picks ``p``: 0 (the classic net; s = 5 for 28x28) when the image is
    at least 12 pixels wide, else 2 ("same"), so small images such as the 8x8 digits still work
    (s = 2 there). Images smaller than :data:`LENET5_MIN_IMAGE_SIZE` raise InputMismatchError.
    """
    _positive_int("in_channels", in_channels)
    _positive_int("num_classes", num_classes)
    _positive_int("image_size", image_size)
    pad = _lenet5_conv2_padding(image_size) if conv2_padding is None else conv2_padding
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise InvalidOptionError(f"conv2_padding must be None or an integer >= 0, got {pad!r}")
    # conv1 keeps the size (5x5, pad 2); each pool halves (floor); conv2 is 5x5 with padding pad.
    s = ((image_size // 2) + 2 * pad - 4) // 2
    if s < 1:
        raise InputMismatchError(
            f"lenet5: image_size={image_size} with conv2_padding={pad} leaves no pixels after the "
            f"second pooling; use image_size >= {LENET5_MIN_IMAGE_SIZE} (conv2_padding=2) "
            f"or >= 12 (conv2_padding=0)"
        )
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * s * s, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


MODELS: dict[str, Callable[..., nn.Sequential]] = {
    "lenet_300_100": lenet_300_100,
    "lenet5": lenet5,
}


def build_model(name: str, **kwargs) -> nn.Sequential:
    """Build a model of :data:`MODELS`; an unknown name or keyword raises InvalidOptionError."""
    require_option("model", name, MODELS)
    factory = MODELS[name]
    signature = inspect.signature(factory)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        accepted = ", ".join(signature.parameters)
        raise InvalidOptionError(f"model {name!r}: {exc}; accepted arguments: {accepted}") from exc
    return factory(**kwargs)


# How each model family reads a dataset's input shape.
_SHAPE_ARGS: dict[str, Callable[..., dict]] = {
    "lenet_300_100": lambda spec: {
        "in_features": spec.in_features,
        "num_classes": spec.num_classes,
    },
    "lenet5": lambda spec: {
        "in_channels": spec.in_channels,
        "image_size": spec.image_size,
        "num_classes": spec.num_classes,
    },
}


def model_for(dataset_name: str, model: str = "lenet_300_100", **kwargs) -> nn.Sequential:
    """Build ``model`` sized for a dataset of :data:`bingo.data.DATASETS`; ``kwargs`` override."""
    from bingo.data import DATASETS  # keeps `import bingo.models` free of the data module

    require_option("dataset", dataset_name, DATASETS)
    require_option("model", model, MODELS)
    args = {**_SHAPE_ARGS[model](DATASETS[dataset_name]), **kwargs}
    return build_model(model, **args)
