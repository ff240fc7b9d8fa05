"""Wanda-style scores: weight magnitude times input activation norm, ``|W_ij| * ||X_j||``.

Paper: M. Sun, Z. Liu, A. Bair, J. Z. Kolter, "A Simple and Effective Pruning Approach for Large
Language Models", ICLR 2024 (arXiv:2306.11695). Structured variant ("Wanda-sp"): Y. An, X. Zhao,
T. Yu, M. Tang, J. Wang, "Fluctuation-based Adaptive Structured Pruning for Large Language
Models" (FLAP), AAAI 2024 (arXiv:2312.11983).

Estimates: how much output a weight carries on typical inputs: ``|W_ij|`` times the L2 norm of
input feature ``j`` over all calibration rows (tokens, or batch and positions for a conv).
``||X_j||`` is measured by hooks on the modules that multiply each weight with an input
(:mod:`bingo.baselines._inputs`: nn.Linear, transformers' Conv1D, nn.Conv2d with any ``groups``,
nn.MultiheadAttention, which uses its out-projection functionally) on ``data``.

* ``granularity="weight"``: ``|W_ij| * ||X_j||`` per weight of each layer, ranked globally.
  (Wanda proper compares weights within each output row; bingo's :func:`bingo.prune` ranks all
  units globally, so this is the global variant.)
* ``granularity="neuron"``: an output unit's sum ``sum_j |W_ij| ||X_j||`` over its row (conv
  channel, Conv1D column), divided by the layer mean (the same layer normalisation as
  :func:`bingo.baselines.magnitude`).
* ``granularity="structured"``, ``variant="slices"`` (default): per unit, the sum of
  ``|W| * ||X||`` over every weight slice the unit owns (:mod:`bingo.structure`): its producers'
  rows (each with that producer's input: a head's q, k and v rows read the query, key and value
  inputs), its consumers' columns (whose input is the unit's own activation: the head outputs, the
  MLP neuron, the conv channel), divided by the group mean. Biases and norm scales and shifts are
  left out (a bias reads the constant 1; Wanda scores the weights that multiply an input), and so
  are embedding tables (they look up token ids, not features).
* ``granularity="structured"``, ``variant="wanda-sp"``: FLAP's Wanda-sp exactly as published
  (its ``prune_wanda_sp``): only the consumers' columns count, each column scoring the *mean*
  over its rows of ``|W_ij| * ||X_j||``, summed over the unit's columns (a head: its head_dim
  columns of o_proj, a key/value group: those of its query heads; an MLP neuron: its down_proj
  column), then divided by the group mean. The paper scores only the layer after the unit;
  ``"slices"`` also counts what the producers' rows carry into the unit.

Convolutions use one norm per input channel (over batch and positions), not per unfolded patch
element: a simplification of Wanda for convolutions. A grouped or depthwise convolution's output
channel ``o`` reads only the input channels of its group (depthwise: input channel
``o // multiplier``), and is scored with those.

Cost: one forward pass per calibration batch, no backward; memory one float64 vector per layer
input.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from torch import Tensor, nn

from bingo.errors import InvalidOptionError, require_option
from bingo.units import UnitGroup, find_units

from ._common import UnitScores, check_unpruned, layer_normalised, peek_inputs, unit_totals
from ._inputs import input_axis, input_squares, weight_users

VARIANTS = ("slices", "wanda-sp")
"""Structured scores: every weight slice of a unit, or FLAP's Wanda-sp (consumers' columns)."""


def _weight_scores(group: UnitGroup, squares: dict[str, Tensor]):
    """``(name, |W| * ||X||)`` (float64, the weight's shape) for each of the group's weights with
    recorded inputs, one at a time (a float64 copy of a large model's weights would not fit)."""
    for name, t in group.tensors().items():
        if name in squares:
            yield name, t.detach().abs().double() * squares[name].sqrt()


def _column_means(group: UnitGroup, squares: dict[str, Tensor], in_axis: dict[str, int]):
    """Wanda-sp's per-weight values: ``|W| * ||X||`` divided by the number of rows each input
    column has, so that a consumer column's sum is its row mean (weights the group holds no
    columns of are skipped)."""
    consumed = {s.param for s in group.slices if in_axis.get(s.param) == s.axis}
    for name, value in _weight_scores(group, {n: q for n, q in squares.items() if n in consumed}):
        yield name, value / (value.numel() // value.shape[in_axis[name]])


def wanda(model: nn.Module, granularity: str = "weight", include=None, exclude=None, *,
          data: Optional[Iterable] = None, batches: Optional[int] = None,
          example_inputs: Any = None, variant: str = "slices") -> UnitScores:
    """Wanda scores ``|W| * ||X||`` of ``model``'s units (higher = keep); see the module docstring.

    Args:
        model: the trained network (run in eval mode on ``data``, restored after).
        granularity: ``"weight"``, ``"neuron"`` or ``"structured"``.
        include, exclude: layer or group names or patterns, as for
            :func:`bingo.units.find_units`.
        data: calibration batches: ``(inputs, targets)`` pairs or bare inputs (a tensor, or a
            dict of keyword arguments).
        batches: use at most this many batches of ``data`` (None: all).
        example_inputs: structured granularity: one batch to trace the model with; default the
            first batch of ``data``.
        variant: structured granularity: ``"slices"`` (every weight slice of a unit) or
            ``"wanda-sp"`` (FLAP's Wanda-sp: the consumers' columns only).

    Returns:
        ``{score key: float32 scores}`` on each group's device (a :class:`UnitScores`).
    """
    if data is None:
        raise InvalidOptionError("wanda needs data=: calibration batches (inputs, targets)")
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int)
                                or batches < 1):
        raise InvalidOptionError(f"batches must be a positive integer or None, got {batches!r}")
    require_option("variant", variant, VARIANTS)
    if variant != "slices" and granularity != "structured":
        raise InvalidOptionError(f"wanda: variant={variant!r} scores structured units; "
                                 f"granularity={granularity!r} takes the default variant")
    if granularity == "structured":
        example_inputs, data = peek_inputs(data, example_inputs)
    layout = find_units(model, granularity, include, exclude, example_inputs=example_inputs)
    check_unpruned(model, layout)
    if layout.granularity == "structured":
        wanted = {name for g in layout.groups for name, t in g.tensors().items() if t.dim() > 1}
    else:
        wanted = {g.param_name for g in layout.groups}
    users = weight_users(model, layout, wanted, example_inputs)
    squares = input_squares(model, users, data, batches, what="wanda")
    scores = UnitScores(granularity=layout.granularity)
    for g in layout.groups:
        if layout.granularity == "weight":
            scores[g.param_name] = dict(_weight_scores(g, squares))[g.param_name].float()
        elif variant == "wanda-sp":
            in_axis = {p: input_axis(model, users, p) for p in g.tensors() if p in squares}
            consumers = unit_totals(g, _column_means(g, squares, in_axis),
                                    keep=lambda s: s.axis == in_axis[s.param])
            scores[g.param_name] = layer_normalised(consumers)
        else:
            scores[g.param_name] = layer_normalised(unit_totals(g, _weight_scores(g, squares)))
    return scores


__all__ = ["VARIANTS", "wanda"]
