"""Magnitude pruning scores: keep the largest weights (or the strongest units).

Estimates: nothing data-dependent; the weight itself stands in for importance (the classic
baseline of Han et al. 2015, "Learning both Weights and Connections"). Cost: one pass over the
weights, no data.

* ``granularity="weight"``: the score of a weight is ``|w|``, compared globally across layers
  (global magnitude pruning).
* ``granularity="neuron"``: the score of an output row (a conv channel, a Conv1D column) is the
  L2 norm of its weights together with its bias entry, divided by the mean of those norms over
  its layer. Raw norms are not comparable across layers: a layer with many inputs has larger
  rows, and its initialisation scale (~1/sqrt(fan_in)) differs, so a global ranking of raw norms
  would empty the layer with the smallest rows first. Dividing by the layer mean ranks each
  neuron against its own layer's typical neuron, so a globally chosen sparsity spreads over all
  layers.
* ``granularity="structured"``: the *group L2 norm* of a unit, over every parameter slice it owns
  (:mod:`bingo.structure`): its producers' rows with their bias entries, the scale and shift of
  the norms on its channel (BatchNorm), its consumers' input columns, for a head its q/k/v rows
  and biases and its o-projection columns; divided by the mean over its group (the same layer
  normalisation). This follows DepGraph's group importance (G. Fang, X. Ma, M. Song, M. Bi Mi,
  X. Wang, "DepGraph: Towards Any Structural Pruning", CVPR 2023, arXiv:2301.12900, §3.3), which
  aggregates the squared norms of every coupled parameter of a group, ``I_k = sum_{w in g}
  ||w[k]||^2``, as Torch-Pruning's ``GroupNormImportance`` (alias ``MagnitudeImportance``) does
  slice by slice (output rows, input columns, norm scales); the score here is ``sqrt(I_k)``, so
  that a structured score is the same kind of number as the neuron score. Consumers' columns are
  included because removing the unit removes them too (they carry the unit's influence on the
  next layer); biases and norm shifts are included because they are removed with it as well
  (Torch-Pruning leaves biases out by default; bingo's neuron score has always counted the bias
  entry, and the structured score keeps that). Buffers (running statistics) are data, not
  weights, and are left out.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from bingo.units import UnitGroup, find_units

from ._common import UnitScores, layer_normalised, unit_norms


def _weight_scores(group: UnitGroup) -> Tensor:
    return group.module.weight.detach().abs().float()


def _unit_scores(group: UnitGroup) -> Tensor:
    return layer_normalised(unit_norms(group))


# Granularity -> per-group score function.
_SCORERS = {"weight": _weight_scores, "neuron": _unit_scores, "structured": _unit_scores}


def magnitude(model: nn.Module, granularity: str = "weight", include=None, exclude=None,
              example_inputs: Any = None) -> UnitScores:
    """Magnitude scores of ``model``'s units (higher = keep); see the module docstring.

    Args:
        model: the trained network.
        granularity: ``"weight"`` (``|w|``), ``"neuron"`` (layer-normalised row norm with bias)
            or ``"structured"`` (layer-normalised group L2 norm over every slice of the unit).
        include, exclude: layer or group names or patterns, as for
            :func:`bingo.units.find_units`.
        example_inputs: structured granularity: one batch to trace the model with (built from a
            transformers model's config when None).

    Returns:
        ``{score key: float32 scores}`` on each group's device (a :class:`UnitScores`).
    """
    layout = find_units(model, granularity, include, exclude, example_inputs=example_inputs)
    score = _SCORERS[layout.granularity]
    return UnitScores({g.param_name: score(g) for g in layout.groups}, layout.granularity)
