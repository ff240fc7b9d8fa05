"""Helpers shared by several baselines: the score dict, per-unit totals over a unit's slices,
layer normalisation, running a model on a batch, reference weights.

Kept in one place so that every baseline measures a unit, normalises a layer and checks a
user-supplied state (initial weights, a rewind point) the same way. A unit is measured through
its *slices* (:class:`bingo.units.UnitGroup.slices`, from the structure layer): a per-layer
neuron's row (a Conv1D's column) with its bias entry, or everything a structured unit owns
(producers' rows and biases, norm scales and shifts, consumers' columns, a head's q/k/v rows and
o columns), so no baseline looks at a layer's axes on its own.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from bingo.errors import InputMismatchError, InvalidOptionError
from bingo.scoring import UnitScores  # noqa: F401  (the baselines' return type)
from bingo.structure import Slice
from bingo.units import UnitGroup, UnitLayout


def unit_totals(group: UnitGroup,
                values: Union[Mapping[str, Tensor], Iterable[tuple[str, Tensor]]],
                keep: Optional[Callable[[Slice], bool]] = None) -> Tensor:
    """float64 ``(num_units,)``: per unit, the sum of each parameter's values over every slice
    of the group on that parameter (``keep``: only the slices it accepts).

    ``values`` maps parameter names to tensors of the parameter's shape (or broadcastable to it
    along the slice's axis), as a mapping or as an iterable of ``(name, tensor)`` pairs (a
    generator keeps one parameter's values alive at a time); parameters without values are left
    out. This is how a unit's slices become one number: a neuron's row plus its bias entry, a
    head's q/k/v rows plus its o columns, a channel's filters plus its BatchNorm entries plus its
    consumers' input columns.
    """
    out = torch.zeros(group.num_units, dtype=torch.float64, device=group.device)
    for name, value in (values.items() if isinstance(values, Mapping) else values):
        for s in group.slices:
            if s.param != name or (keep is not None and not keep(s)):
                continue
            along = value.movedim(s.axis, 0)
            along = along.reshape(along.shape[0], -1).sum(1).to(out.device, torch.float64)
            out.index_add_(0, s.unit_of.to(out.device), along[s.positions.to(out.device)])
    return out


def unit_norms(group: UnitGroup, tensors: Optional[Mapping[str, Tensor]] = None) -> Tensor:
    """float64 L2 norm of each unit of a neuron or structured group over every parameter slice
    it owns (see :func:`unit_totals`); ``tensors`` (parameter name -> tensor, e.g. initial
    weights) default to the live parameters (never buffers: running statistics are data)."""
    live = group.tensors()
    tensors = live if tensors is None else tensors
    return unit_totals(group, ((n, tensors[n].detach().double().pow(2)) for n in live)).sqrt()


def layer_normalised(values: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """``values / mean(scale)`` as float32 (``scale`` defaults to ``values``).

    Neuron scores of different layers are not comparable raw (fan-in and initialisation scale
    differ), so the neuron baselines divide each layer's scores by the layer mean of a positive
    per-neuron quantity; an all-zero layer scores 0, not NaN, and a layer of tiny but nonzero
    scores (a deep layer of an untrained net) is still scaled to mean 1. A structure group (all
    heads of a block, all channels of a residual stage) is normalised as one layer.
    """
    scale = values if scale is None else scale
    mean = scale.double().mean()
    return torch.where(mean > 0, values / mean, 0.0).float()


# -- running a model on data ----------------------------------------------------------------------


def batch_inputs(batch) -> Any:
    """The inputs of one batch: ``batch[0]`` of an ``(inputs, targets)`` pair, else the batch."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def run_model(model: nn.Module, inputs) -> Any:
    """``model(**inputs)`` for a dict of keyword arguments (transformers), else
    ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def peek_inputs(data: Iterable, example_inputs: Any) -> tuple[Any, Iterable]:
    """``(example_inputs, data)``: when ``example_inputs`` is None, the first batch's inputs
    (``data`` is re-chained, so a one-shot iterator loses nothing)."""
    if example_inputs is not None:
        return example_inputs, data
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise InputMismatchError("data yielded no batch") from None
    return batch_inputs(first), itertools.chain([first], iterator)


# -- reference weights ----------------------------------------------------------------------------


def reference_state(state, layout: UnitLayout, option: str) -> dict[str, Tensor]:
    """``{parameter name: tensor}`` from a user mapping (a ``state_dict`` copy), checked against
    ``layout``: every parameter a unit's measure reads (the weight at weight granularity; the
    weight and bias of a neuron; every parameter of a structured unit). A missing option, a
    missing entry or a shape that differs from the model's raises, naming ``option`` and the key.
    """
    require_mapping(state, option, "a copy of model.state_dict() taken before training")
    out = {}
    for g in layout.groups:
        for name, live in g.tensors().items():
            if layout.granularity == "weight" and name != g.param_name:
                continue  # a weight's score reads the weight only
            out[name] = checked_entry(state, option, name, live)
    return out


def require_mapping(state, option: str, example: str) -> None:
    """Raise InvalidOptionError unless ``state`` is a mapping (``example`` says what to pass)."""
    if state is None:
        raise InvalidOptionError(f"{option} is required: a mapping parameter name -> tensor, "
                                 f"e.g. {example}")
    if not isinstance(state, Mapping):
        raise InvalidOptionError(f"{option} must be a mapping parameter name -> tensor, got "
                                 f"{type(state).__name__}")


def checked_entry(state: Mapping, option: str, name: str, like: Tensor) -> Tensor:
    """``state[name]`` detached, on ``like``'s device and dtype; raises if absent or misshapen."""
    if name not in state:
        shown = ", ".join(list(state)[:8]) + (", ..." if len(state) > 8 else "")
        raise InputMismatchError(f"{option} has no entry {name!r} (it has: {shown or 'nothing'})")
    value = state[name]
    if not isinstance(value, Tensor):
        raise InputMismatchError(f"{option}[{name!r}] must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(like.shape):
        raise InputMismatchError(f"{option}[{name!r}] has shape {tuple(value.shape)} but the "
                                 f"model's {name!r} has shape {tuple(like.shape)}")
    if value.numel() and value.device == like.device and value.data_ptr() == like.data_ptr():
        raise InputMismatchError(
            f"{option}[{name!r}] is the model's live tensor, not a copy (model.state_dict() "
            "shares storage with the parameters); pass copy.deepcopy(model.state_dict()) taken "
            "at that point")
    return value.detach().to(like.device, like.dtype)


def check_unpruned(model: nn.Module, layout: UnitLayout) -> None:
    """Raise if a parameter a scored unit owns is already masked with torch.nn.utils.prune."""
    for g in layout.groups:
        for name in g.tensors():
            owner, _, attr = name.rpartition(".")
            if hasattr(model.get_submodule(owner) if owner else model, attr + "_orig"):
                raise InputMismatchError(
                    f"{name!r} is already pruned with torch.nn.utils.prune; call prune.remove on "
                    "it (or pass the unpruned model) first")


def unsupported_granularity(baseline: str, granularity: str, supported: tuple[str, ...],
                            why: str) -> None:
    """Raise InvalidOptionError naming the baseline, the granularity and why, when
    ``granularity`` is not in ``supported``."""
    if granularity not in supported:
        raise InvalidOptionError(
            f"baseline {baseline!r} does not support granularity={granularity!r} ({why}); "
            f"it supports: {', '.join(supported)}")
