"""Helpers shared by several baselines: row norms, layer normalisation, reference weights.

Kept in one place so that every baseline measures a neuron, normalises a layer and checks a
user-supplied state (initial weights, a rewind point) the same way.
"""

from __future__ import annotations

from typing import Mapping, Optional

from torch import Tensor, nn

from bingo.attention import head_totals
from bingo.errors import InputMismatchError, InvalidOptionError
from bingo.units import UnitGroup, UnitLayout

TINY = 1e-12
"""Keeps an all-zero layer's normalised scores at 0 instead of 0/0."""


def row_norms(weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """float64 L2 norm of each output row / channel of ``weight``, its bias entry included."""
    weight = weight.detach()
    squares = weight.double().pow(2).reshape(weight.shape[0], -1).sum(1)
    if bias is not None:
        squares = squares + bias.detach().double().pow(2)
    return squares.sqrt()


def group_row_norms(group: UnitGroup) -> Tensor:
    """:func:`row_norms` of a layer's current weight and bias."""
    return row_norms(group.module.weight, group.module.bias)


def group_unit_norms(group: UnitGroup) -> Tensor:
    """L2 norm of each structured unit of a group: its output row with bias, or, for an
    attention block, everything a head owns (q/k/v rows with their biases and o columns)."""
    if group.structure is None:
        return group_row_norms(group)
    squares = {name: t.detach().double().pow(2) for name, t in group.tensors().items()}
    return head_totals(group.heads, squares).sqrt().to(group.module.weight.device)


def layer_normalised(values: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """``values / mean(scale)`` as float32 (``scale`` defaults to ``values``).

    Neuron scores of different layers are not comparable raw (fan-in and initialisation scale
    differ), so the neuron baselines divide each layer's scores by the layer mean of a positive
    per-neuron quantity; an all-zero layer scores 0, not NaN.
    """
    scale = values if scale is None else scale
    return (values / scale.double().mean().clamp_min(TINY)).float()


def reference_tensors(state, layout: UnitLayout, option: str, with_bias: bool
                      ) -> dict[str, tuple[Tensor, Optional[Tensor]]]:
    """``{weight name: (weight, bias or None)}`` from a user mapping, checked against ``layout``.

    ``state`` maps parameter names to tensors (a ``state_dict`` copy). A missing option, a
    missing layer or a shape that differs from the model's raises, naming ``option`` and the key.
    Biases are required only when ``with_bias`` and the layer has one.
    """
    require_mapping(state, option, "a copy of model.state_dict() taken before training")
    out = {}
    for g in layout.groups:
        names = [(g.param_name, g.module.weight)]
        if with_bias and g.bias_name is not None:
            names.append((g.bias_name, g.module.bias))
        tensors = [checked_entry(state, option, name, like) for name, like in names]
        out[g.param_name] = (tensors[0], tensors[1] if len(tensors) > 1 else None)
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
    """Raise if a scored layer is already masked with torch.nn.utils.prune."""
    for g in layout.groups:
        if hasattr(g.module, "weight_orig"):
            raise InputMismatchError(
                f"{g.param_name!r} is already pruned with torch.nn.utils.prune; call prune.remove "
                "on it (or pass the unpruned model) first")
