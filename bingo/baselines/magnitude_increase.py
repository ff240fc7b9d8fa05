"""Magnitude-increase scores: keep the units that grew most during training.

Paper: H. Zhou, J. Lan, R. Liu, J. Yosinski, "Deconstructing Lottery Tickets: Zeros, Signs, and
the Supermask", NeurIPS 2019 (arXiv:1905.01067), the "magnitude increase" mask criterion
``|w_f| - |w_i|``.

Estimates: how far training moved a unit away from zero, relative to where it started; a weight
that training left as small as it was initialised is taken as unimportant even if its initial value
happened to be large. Data-free; cost: one pass over the final and initial weights. Needs the
initial weights (option ``initial``).

* ``granularity="weight"``: ``|w| - |w0|`` (may be negative), compared globally.
* ``granularity="neuron"``: ``(||row|| - ||row0||) / mean_layer(||row||)``, row norms with the
  bias entry. The divisor is the one :func:`bingo.baselines.magnitude` uses for its neuron scores
  (the layer mean of the final row norms), so the score is magnitude's neuron score minus the
  initial norm in the same units, and layers with different fan-in are comparable. (Dividing the
  difference by its own layer mean is not an option: that mean can be near zero or negative.)
* ``granularity="structured"``: the same with each unit's group L2 norm over every parameter
  slice it owns (:func:`bingo.baselines.magnitude`'s structured norm), final and initial, divided
  by the group mean of the final norms. ``initial`` must then hold every parameter the groups
  own.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

from torch import Tensor, nn

from bingo.errors import InvalidOptionError
from bingo.search import TicketSearch

from bingo.units import find_units

from ._common import UnitScores, layer_normalised, reference_state, unit_norms


def initial_state_of(initial) -> Mapping[str, Tensor]:
    """The mapping of initial tensors behind ``initial``: a mapping, or a TicketSearch's snapshot.

    A :class:`bingo.TicketSearch` built with ``reset="init"`` (or ``"rewind"`` once its snapshot
    exists) stores the weights and biases of its layers, taken at construction, as ``search.init``.
    """
    if isinstance(initial, TicketSearch):
        if initial.init is None:
            raise InvalidOptionError(
                "initial: this TicketSearch holds no snapshot of the initial weights (it was "
                f"built with reset={initial.config.reset!r}); pass a copy of the state_dict "
                "taken before training instead")
        return initial.init
    return initial


def magnitude_increase(model: nn.Module, granularity: str = "weight", include=None, exclude=None,
                       initial: Union[Mapping[str, Tensor], object, None] = None,
                       example_inputs: Any = None) -> UnitScores:
    """Magnitude-increase scores of ``model``'s units (higher = keep); see the module docstring.

    Args:
        model: the trained network.
        granularity: ``"weight"``, ``"neuron"`` or ``"structured"``.
        include, exclude: layer or group names or patterns, as for
            :func:`bingo.units.find_units`.
        initial: parameter name -> initial tensor for every scored layer's weight (and bias, at
            neuron granularity; every parameter of a unit group at structured granularity),
            e.g. ``copy.deepcopy(model.state_dict())`` taken before training, or a
            :class:`bingo.TicketSearch` with ``reset="init"`` (its stored snapshot). Extra
            entries are ignored; a missing entry or a different shape raises.
        example_inputs: structured granularity: one batch to trace the model with.

    Returns:
        ``{score key: float32 scores}`` on each group's device (a :class:`UnitScores`).
    """
    layout = find_units(model, granularity, include, exclude, example_inputs=example_inputs)
    start = reference_state(initial_state_of(initial), layout, "initial")
    scores = UnitScores(granularity=layout.granularity)
    for g in layout.groups:
        if granularity == "weight":
            scores[g.param_name] = (g.module.weight.detach().abs() -
                                    start[g.param_name].abs()).float()
        else:
            norms = unit_norms(g)
            scores[g.param_name] = layer_normalised(norms - unit_norms(g, start), scale=norms)
    return scores
