"""Magnitude pruning scores: keep the largest weights (or the strongest neurons).

Estimates: nothing data-dependent; the weight itself stands in for importance (the classic
baseline of Han et al. 2015, "Learning both Weights and Connections"). Cost: one pass over the
weights, no data.

* ``granularity="weight"``: the score of a weight is ``|w|``, compared globally across layers
  (global magnitude pruning).
* ``granularity="neuron"``: the score of an output row (or conv channel) is the L2 norm of its
  weights together with its bias entry, divided by the mean of those norms over its layer. Raw
  norms are not comparable across layers: a layer with many inputs has larger rows, and its
  initialisation scale (~1/sqrt(fan_in)) differs, so a global ranking of raw norms would empty the
  layer with the smallest rows first. Dividing by the layer mean ranks each neuron against its own
  layer's typical neuron, so a globally chosen sparsity spreads over all layers.
* ``granularity="structured"``: MLP neurons as above; an attention head scores the L2 norm of its
  q/k/v rows, their bias entries and its o-projection columns, divided by the block's mean head
  norm (the same layer normalisation).
"""

from __future__ import annotations

from torch import Tensor, nn

from bingo.units import UnitGroup, find_units

from ._common import group_unit_norms, layer_normalised


def _weight_scores(group: UnitGroup) -> Tensor:
    return group.module.weight.detach().abs().float()


def _unit_scores(group: UnitGroup) -> Tensor:
    return layer_normalised(group_unit_norms(group))


# Granularity -> per-layer score function.
_SCORERS = {"weight": _weight_scores, "neuron": _unit_scores, "structured": _unit_scores}


def magnitude(model: nn.Module, granularity: str = "weight", include=None,
              exclude=None) -> dict[str, Tensor]:
    """Magnitude scores of ``model``'s units (higher = keep); see the module docstring.

    Args:
        model: the trained network.
        granularity: ``"weight"`` (``|w|``) or ``"neuron"`` (layer-normalised row norm).
        include, exclude: layer names or patterns, as for :func:`bingo.units.find_units`.

    Returns:
        ``{weight parameter name: float32 scores}`` on each weight's device.
    """
    score = _SCORERS[granularity]
    return {g.param_name: score(g) for g in find_units(model, granularity, include, exclude).groups}
