"""LAMP: layer-adaptive magnitude-based pruning scores (Lee et al., ICLR 2021).

Paper: J. Lee, S. Park, S. Mo, S. Ahn, J. Shin, "Layer-adaptive sparsity for the magnitude-based
pruning", ICLR 2021 (arXiv:2010.07611).

Estimates: how much of a layer's remaining squared magnitude a unit carries. Inside each layer,
sort the units by ascending squared magnitude ``s**2``; the score of unit u is

    score(u) = s_u**2 / sum_{v >= u in that order} s_v**2

i.e. u's share of the energy of itself and every unit that would survive it. The scores are then
compared globally, which chooses a per-layer sparsity without any hyper-parameter (LAMP is the
distortion-minimising rescaling of magnitude pruning). Data-free; cost: one sort per layer.

* ``granularity="weight"``: ``s = |w|``;
* ``granularity="neuron"``: ``s`` = L2 norm of the output row / conv channel / Conv1D column,
  bias included (the same norm as :func:`bingo.baselines.magnitude`);
* ``granularity="structured"``: ``s`` = the unit's group L2 norm over every parameter slice it
  owns (producers' rows and biases, norm entries, consumers' columns, a head's q/k/v rows and o
  columns; :func:`bingo.baselines.magnitude`'s structured norm), and a *structure group* (all
  heads of one attention block, all neurons of one MLP, all channels of one residual stage)
  plays the part of the paper's layer.

The paper defines LAMP for single weights. The generalisation to units is the one Torch-Pruning's
``LAMPImportance`` makes (the LAMP normaliser applied to a group importance): a unit's squared
group norm is the distortion its removal causes in the paper's argument (the Frobenius norm of
the weights removed), exactly as a weight's ``w**2`` is, so LAMP's derivation carries over with
"weight" read as "unit" and "layer" as "group".

Properties: scores lie in [0, 1]; the largest unit of every layer scores exactly 1, so no layer is
ever emptied before the others are down to one unit; an all-zero layer scores 0 everywhere. Ties
are broken deterministically: among equal magnitudes the unit with the lower flat index comes
first in the ascending order, so it gets the lower score (its denominator includes the tied units
after it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bingo.units import find_units

from ._common import UnitScores, unit_norms


def lamp_from_magnitudes(magnitudes: Tensor) -> Tensor:
    """LAMP scores (float32, same shape) of one layer's unit magnitudes ``s`` (any shape)."""
    squares = magnitudes.detach().double().reshape(-1).pow(2)
    # Ascending by value, ties by flat index (a stable sort of the flat tensor).
    order = torch.sort(squares, stable=True).indices
    sorted_squares = squares[order]
    # Suffix sums: the energy of each unit and of every unit after it in the order.
    suffix = sorted_squares.flip(0).cumsum(0).flip(0)
    scores = torch.empty_like(squares)
    # 0/0 only where every unit from here on is zero: those score 0.
    scores[order] = torch.where(suffix > 0, sorted_squares / suffix, 0.0)
    return scores.reshape(magnitudes.shape).float()


def lamp(model: nn.Module, granularity: str = "weight", include=None, exclude=None,
         example_inputs: Any = None) -> UnitScores:
    """LAMP scores of ``model``'s units (higher = keep); see the module docstring.

    Args:
        model: the trained network.
        granularity: ``"weight"`` (``s = |w|``), ``"neuron"`` (``s`` = row norm with bias) or
            ``"structured"`` (``s`` = group L2 norm of the unit).
        include, exclude: layer or group names or patterns, as for
            :func:`bingo.units.find_units`.
        example_inputs: structured granularity: one batch to trace the model with.

    Returns:
        ``{score key: float32 scores in [0, 1]}`` on each group's device (a :class:`UnitScores`).
    """
    layout = find_units(model, granularity, include, exclude, example_inputs=example_inputs)
    scores = UnitScores(granularity=layout.granularity)
    for g in layout.groups:
        s = g.module.weight.detach().abs() if granularity == "weight" else unit_norms(g)
        scores[g.param_name] = lamp_from_magnitudes(s)
    return scores
