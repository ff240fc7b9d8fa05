"""Multiply-adds per example that removing one unit of a unit group saves (``saving="macs"``).

Counted, not modelled: one forward of one example under a dispatch mode that sees every ATen
contraction (``mm``, ``addmm``, ``bmm``, ``convolution``, ...) whose weight is (a view of) a
parameter of the model, and adds the call's multiply-adds to that parameter. A unit owns a
fraction of each parameter it has slices in (``width / size`` of the axis; rows and columns of one
parameter counted once), so its saving is that fraction of the parameter's multiply-adds, summed
over its slices: an MLP neuron saves its row of the first layer and its column of the next, a
conv channel its filter at every output position and its input channel of the next conv, a head
its rows of q/k/v and its columns of the output projection.

What is not counted: products of two activations (an attention block's ``QK^T`` and ``AV``,
which grow with the sequence length), elementwise work (norms, activations, biases) and
embedding look-ups. For a language model an example is one sequence, so the counts are per
sequence of the data's length.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from bingo.structure.trace import _AllowSlowPaths
from bingo.units import UnitGroup

aten = torch.ops.aten


def _matmul(args) -> tuple[tuple[Tensor, ...], int]:
    """mm / bmm (a, b): either operand may be the weight; a's last axis is contracted."""
    return (args[0], args[1]), args[0].shape[-1]


def _addmatmul(args) -> tuple[tuple[Tensor, ...], int]:
    """addmm / baddbmm (bias, a, b)."""
    return (args[1], args[2]), args[1].shape[-1]


def _matvec(args) -> tuple[tuple[Tensor, ...], int]:
    """mv (matrix, vector)."""
    return (args[0],), args[0].shape[-1]


def _addmatvec(args) -> tuple[tuple[Tensor, ...], int]:
    """addmv (bias, matrix, vector)."""
    return (args[1],), args[1].shape[-1]


def _convolution(args) -> tuple[tuple[Tensor, ...], int]:
    """convolution (input, weight, bias, stride, padding, dilation, transposed, ...): each output
    element of a plain convolution sums ``in/groups * kernel`` products (the weight's
    ``shape[1:]``); a transposed one is counted per input element (returned as a negative
    contracted size, see :class:`_MacCounter`)."""
    weight = args[1]
    per = math.prod(weight.shape[1:])
    return (weight,), (-per if len(args) > 6 and args[6] else per)


MAC_RULES: dict[Any, Callable[[tuple], tuple[tuple[Tensor, ...], int]]] = {
    aten.mm: _matmul, aten.bmm: _matmul,
    aten.addmm: _addmatmul, aten.baddbmm: _addmatmul,
    aten.mv: _matvec, aten.addmv: _addmatvec,
    aten.convolution: _convolution,
}
"""ATen op -> (operands that may be a parameter, products per output element)."""


class _MacCounter(TorchDispatchMode):
    """Adds up the multiply-adds of every contraction whose operand is a known parameter."""

    def __init__(self, storages: dict[int, str]):
        super().__init__()
        self.storages = storages
        self.macs: dict[str, float] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rule = MAC_RULES.get(func.overloadpacket)
        if rule is None or not isinstance(out, Tensor):
            return out
        operands, per = rule(args)
        for operand in operands:
            name = self._parameter(operand)
            if name is not None:
                count = out.numel() * per if per > 0 else args[0].numel() * -per
                self.macs[name] = self.macs.get(name, 0.0) + float(count)
                break
        return out

    def _parameter(self, t: Any) -> Optional[str]:
        if not isinstance(t, Tensor):
            return None
        return self.storages.get(t.untyped_storage().data_ptr())


@torch.no_grad()
def contraction_macs(model: nn.Module, example: Any) -> dict[str, float]:
    """Parameter name -> multiply-adds per example of the contractions that use it, from one
    forward of ``example`` (a batch: the counts are divided by its size) in eval mode; the
    model's train/eval mode is restored."""
    storages = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters()}
    batch = example.shape[0] if isinstance(example, Tensor) and example.dim() else 1
    counter = _MacCounter(storages)
    was_training = model.training
    model.eval()
    try:
        with _AllowSlowPaths(), counter:
            model(example)
    finally:
        model.train(was_training)
    return {name: macs / batch for name, macs in counter.macs.items()}


def unit_macs(group: UnitGroup, macs: dict[str, float]) -> float:
    """Multiply-adds per example one unit of ``group`` accounts for (``macs`` from
    :func:`contraction_macs`): per parameter, the fraction of its elements the unit owns."""
    kept: dict[str, Fraction] = {}   # parameter -> fraction of its elements a unit leaves
    tensors = group.tensors()
    for s in group.slices:
        if s.param not in macs or s.param not in tensors:
            continue
        size = tensors[s.param].shape[s.axis]
        kept[s.param] = kept.get(s.param, Fraction(1)) * (1 - Fraction(s.width, size))
    return float(sum(Fraction(macs[name]) * (1 - left) for name, left in kept.items()))
