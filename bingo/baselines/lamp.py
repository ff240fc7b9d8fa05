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
* ``granularity="neuron"``: ``s`` = L2 norm of the output row / conv channel, bias included (the
  same row norm as :func:`bingo.baselines.magnitude`; the paper defines weights only, this is the
  natural structured extension); ``"structured"``: the same, and for an attention head the norm of
  all its rows and columns.

Properties: scores lie in [0, 1]; the largest unit of every layer scores exactly 1, so no layer is
ever emptied before the others are down to one unit; an all-zero layer scores 0 everywhere. Ties
are broken deterministically: among equal magnitudes the unit with the lower flat index comes
first in the ascending order, so it gets the lower score (its denominator includes the tied units
after it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bingo.units import find_units

from ._common import TINY, group_unit_norms


def lamp_from_magnitudes(magnitudes: Tensor) -> Tensor:
    """LAMP scores (float32, same shape) of one layer's unit magnitudes ``s`` (any shape)."""
    squares = magnitudes.detach().double().reshape(-1).pow(2)
    # Ascending by value, ties by flat index (a stable sort of the flat tensor).
    order = torch.sort(squares, stable=True).indices
    sorted_squares = squares[order]
    # Suffix sums: the energy of each unit and of every unit after it in the order.
    suffix = sorted_squares.flip(0).cumsum(0).flip(0)
    scores = torch.empty_like(squares)
    scores[order] = sorted_squares / suffix.clamp_min(TINY)
    return scores.reshape(magnitudes.shape).float()


def lamp(model: nn.Module, granularity: str = "weight", include=None,
         exclude=None) -> dict[str, Tensor]:
    """LAMP scores of ``model``'s units (higher = keep); see the module docstring.

    Args:
        model: the trained network.
        granularity: ``"weight"`` (``s = |w|``) or ``"neuron"`` (``s`` = row norm with bias).
        include, exclude: layer names or patterns, as for :func:`bingo.units.find_units`.

    Returns:
        ``{weight parameter name: float32 scores in [0, 1]}`` on each weight's device.
    """
    layout = find_units(model, granularity, include, exclude)
    scores = {}
    for g in layout.groups:
        s = g.module.weight.detach().abs() if granularity == "weight" else group_unit_norms(g)
        scores[g.param_name] = lamp_from_magnitudes(s)
    return scores
