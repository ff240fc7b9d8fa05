"""A physically smaller copy of a neuron/channel-pruned plain nn.Sequential, MLP or conv net.

MLPs go to :func:`bingo.pruning.shrink_mlp`. Conv nets (LeNet-5: Conv2d, ReLU, MaxPool2d, ...,
Flatten, Linear, ...) are handled here: removing output channel j of a Conv2d deletes filter j and
its bias, and input channel j of the next Conv2d, or its block of ``H*W`` columns of the next
Linear after a Flatten. That is exact when a removed channel feeds exact zeros downstream, which
holds for the zero-preserving modules of :data:`ZERO_PRESERVING` (``f(0) = 0``); any other module
between layers raises.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import Tensor, nn

from bingo.errors import InputMismatchError
from bingo.pruning import shrink_mlp, small_linear, with_parameters

ZERO_PRESERVING: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.Identity, nn.Dropout, nn.MaxPool2d,
    nn.AvgPool2d, nn.Flatten,
)
"""Modules a removed channel's zeros pass through unchanged (f(0) = 0), channel by channel."""


def _layer_copy(old: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    if not isinstance(old, nn.Conv2d):
        return small_linear(weight, bias)
    return with_parameters(
        nn.Conv2d(weight.shape[1], weight.shape[0], old.kernel_size, old.stride, old.padding,
                  old.dilation, bias=bias is not None).to(weight.device, weight.dtype),
        weight, bias)


def shrink_sequential(model: nn.Module, unit_masks: Mapping[str, Tensor]) -> nn.Sequential:
    """Remove the pruned neurons / channels of ``model`` (``unit_masks``: ``"<i>.weight"`` ->
    bool keep-mask ``(out,)``, as :attr:`bingo.PruneResult.unit_masks`); same outputs, fewer
    parameters. See the module docstring for what is supported."""
    if not isinstance(model, nn.Sequential):
        raise InputMismatchError(f"shrink_sequential needs an nn.Sequential, got "
                                 f"{type(model).__name__}")
    children = list(model.named_children())
    if not any(isinstance(c, nn.Conv2d) for _, c in children):
        return shrink_mlp(model, unit_masks)
    layers = [n for n, c in children if type(c) in (nn.Linear, nn.Conv2d)]
    for name, child in children:
        if type(child) in (nn.Linear, nn.Conv2d):
            if isinstance(child, nn.Conv2d) and (child.groups != 1
                                                 or child.padding_mode != "zeros"):
                raise InputMismatchError(f"layer {name!r}: only ungrouped zero-padded "
                                         "convolutions can be shrunk")
        elif not isinstance(child, ZERO_PRESERVING):
            raise InputMismatchError(
                f"child {name!r} ({type(child).__name__}) is not a Linear, Conv2d or one of "
                f"{', '.join(t.__name__ for t in ZERO_PRESERVING)}")
    for key, mask in unit_masks.items():
        name = key.rpartition(".")[0]
        if name not in layers or not key.endswith(".weight"):
            raise InputMismatchError(f"unit mask key {key!r} is not the weight of a layer of "
                                     "the model")
        out = model.get_submodule(name).weight.shape[0]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (out,):
            raise InputMismatchError(f"unit_masks[{key!r}] must be a bool tensor of shape "
                                     f"({out},)")
        if name == layers[-1] and not bool(mask.all()):
            raise InputMismatchError(f"the output layer {key!r} must keep all its outputs")
        if not bool(mask.any()):
            raise InputMismatchError(f"unit_masks[{key!r}] removes every unit of the layer")
    new_children, kept = [], None
    for name, child in children:
        if type(child) not in (nn.Linear, nn.Conv2d):
            new_children.append(copy.deepcopy(child))
            continue
        weight = child.weight.detach()
        bias = None if child.bias is None else child.bias.detach()
        if kept is not None:
            # Conv input channels, or the blocks of columns a Flatten made of them.
            columns = kept.repeat_interleave(weight.shape[1] // kept.numel())
            weight = weight[:, columns.to(weight.device)]
        mask = unit_masks.get(f"{name}.weight")
        kept = (torch.ones(weight.shape[0], dtype=torch.bool) if mask is None
                else mask.cpu())
        index = kept.to(weight.device)
        new_children.append(_layer_copy(child, weight[index],
                                        None if bias is None else bias[index]))
    return nn.Sequential(*new_children).train(model.training)
