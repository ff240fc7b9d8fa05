"""Pruning to a fraction of the transformer blocks' *parameters* (what LLM pruning papers report),
where :func:`bingo.prune` counts *units*: a key/value group of a GQA block owns far more weights
than an MLP neuron, so the same number of units is a different model size depending on which
units a method removes.

* :func:`block_parameter_names`: the parameters of the model's stack of blocks (its largest
  ``nn.ModuleList``: Llama's ``model.layers``, GPT-2's ``transformer.h``, BERT's
  ``encoder.layer``), the base of the fraction;
* :func:`unit_parameters`: how many of those elements each unit of each structure group owns
  (every slice of the unit: a head's q/k/v rows and o columns, a neuron's gate/up rows and its
  down column);
* :func:`removal_fractions`: the fraction removed after each unit of a method's removal order;
* :func:`count_for_fraction`: walking a method's removal order (:func:`bingo.pruning.pruning_order`,
  the order :func:`bingo.prune` removes units in), the number of units whose removal comes
  closest to a fraction of the block parameters, and the fraction it removes.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from bingo.errors import InputMismatchError, InvalidOptionError
from bingo.pruning import pruning_order
from bingo.structure import Structure, discover


def block_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters under the model's largest ``nn.ModuleList`` (by parameter
    count): its transformer blocks. Raises for a model without one."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise InputMismatchError(f"{type(model).__name__} has no nn.ModuleList of blocks: a "
                                 "fraction of block parameters is not defined for it")
    return {f"{best}.{n}" for n, _ in model.get_submodule(best).named_parameters()}


def unit_parameters(model: nn.Module, structure: Structure, names: set[str] | None = None
                    ) -> dict[str, Tensor]:
    """Score key -> int64 ``(num_units,)``: the elements of the parameters in ``names`` (default:
    every parameter) that each unit of the group owns, counting an element once even where a
    unit holds both its row and its column (a weight square in its own units)."""
    params = dict(model.named_parameters())
    names = set(params) if names is None else names
    out = {}
    for group in structure.groups:
        count = torch.zeros(group.num_units, dtype=torch.float64)
        per_param: dict[str, list] = {}
        for s in group.slices:
            if s.param in params and s.param in names:
                per_param.setdefault(s.param, []).append(s)
        for name, slices in per_param.items():
            shape = params[name].shape
            numel = params[name].numel()
            by_axis: dict[int, Tensor] = {}
            for s in slices:
                along = torch.bincount(s.unit_of.cpu(), minlength=group.num_units).double()
                by_axis[s.axis] = by_axis.get(s.axis, 0) + along
            if len(by_axis) > 2:
                raise InputMismatchError(f"{name}: units of {group.key!r} hold slices along more "
                                         "than two of its axes")
            lines = {axis: k * (numel // shape[axis]) for axis, k in by_axis.items()}
            count += sum(lines.values())
            if len(by_axis) == 2:  # rows x columns both owned: counted twice above
                (a, ka), (b, kb) = by_axis.items()
                count -= ka * kb * (numel // (shape[a] * shape[b]))
        out[group.key] = count.round().long()
    return out


def removal_fractions(model: nn.Module, scores: Mapping[str, Tensor], *,
                      example_inputs: Any = None) -> tuple[Tensor, int]:
    """``(removed, total units)``: ``removed[c]`` (float64, one entry per count ``c`` = 0 ..
    the removable units) is the fraction of the block parameters that removing the first ``c``
    units of the scores' removal order takes; prune them with ``bingo.prune(model, scores,
    sparsity=c / total units)``."""
    structure = discover(model, example_inputs)
    names = block_parameter_names(model)
    total = sum(p.numel() for n, p in model.named_parameters() if n in names)
    owned = unit_parameters(model, structure, names)
    order = pruning_order(model, scores, granularity="structured", example_inputs=example_inputs)
    units = sum(int(t.numel()) for t in scores.values())
    removed = torch.tensor([0] + [int(owned[key][unit]) for key, unit in order]).cumsum(0)
    return removed.double() / total, units


def count_for_fraction(model: nn.Module, scores: Mapping[str, Tensor], fraction: float, *,
                       example_inputs: Any = None) -> tuple[int, float, int]:
    """``(units, removed fraction, total units)``: removing the first ``units`` of the scores'
    removal order takes the fraction of the block parameters closest to ``fraction``; prune
    them with ``bingo.prune(model, scores, sparsity=units / total units)``."""
    if not 0.0 < fraction < 1.0:
        raise InvalidOptionError(f"fraction must lie in (0, 1), got {fraction!r}")
    removed, units = removal_fractions(model, scores, example_inputs=example_inputs)
    count = int(torch.argmin((removed - fraction).abs()))
    return count, float(removed[count]), units
