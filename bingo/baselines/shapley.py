"""Monte-Carlo Shapley values of the units, leave-subset-out with a zero baseline.

Papers: L. S. Shapley, "A value for n-person games", 1953; the p-semivalue / multilinear-extension
identity is Owen, "Multilinear extensions of games", Management Science 1972 (the Shapley value
is the integral over p of the marginal contribution in random coalitions of density p); for
network units see A. Ghorbani and J. Zou, "Neuron Shapley: Discovering the Responsible Neurons",
NeurIPS 2020 (arXiv:2002.09815).

Estimates: each unit's Shapley value in the game whose players are the units and whose value of a
coalition S is ``v(S) = -metric`` of the final model with every unit outside S set to zero (the
loss, or minus the accuracy with ``metric="accuracy"``). The weights are never changed: the
coalitions are simulated by the same batched evaluator the ticket search uses.

How: for a presence probability p, the p-semivalue of unit u is

    phi_p(u) = E_T[v(T + u) - v(T)],  T = every other unit present independently with prob. p,

and Shapley(u) = integral_0^1 phi_p(u) dp. A :class:`bingo.TicketSearch` with ``reset="zero"``,
``score="attribution"`` and ``fraction=q`` estimates exactly phi_{1-q}: each of its K subsets
*resets* (zeroes) every unit independently with probability q, so the *present* units form a
coalition of density p = 1 - q; the attribution estimator returns, per unit u, the mean damage
(metric after - before) of the subsets that zero u minus that of the subsets that keep u, i.e.
``E[loss(T without u)] - E[loss(T with u)] = E[v(T + u) - v(T)]`` over the other units' random
membership. So one search per grid point p_j with ``fraction = 1 - p_j`` gives phi_{p_j}, and the
integral is the midpoint rule over ``fractions`` points ``p_j = (j + 1/2) / m`` (the set
{1 - p_j} is the same midpoint grid, so the reset fractions are that grid too). phi_p is a
polynomial in p of degree n - 1, so the midpoint rule's error is O(1/m^2) times its curvature.

Details: the ``samples`` coalitions are split as evenly as possible over the grid points (each
search gets its own hash seed, derived from ``seed``), and all of ``data`` is concatenated into
one evaluation batch, so every coalition is scored on the whole data (the game is exactly the
metric on ``data``); the evaluator chunks the coalitions to its memory budget. A unit that, at
some grid point, no coalition zeroed (or every one did) has no estimate there; its value is the
mean over the grid points where it has one (a warning counts these), and 0 where it has none.
With an additive game (units that do not interact) every phi_p equals the Shapley value, and the
estimate converges to it for any grid.

Any granularity the ticket search has: weights, neurons, or structured units (heads, MLP neurons
with their consumers' columns, conv channels with their BatchNorm entries; the coalitions zero
every slice of a unit, as the search's reset does).

Cost: ``samples`` forward passes of the whole ``data`` (plus one unreset pass per grid point), no
backward; memory: one chunk of coalitions as the ticket search uses.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bingo.errors import InputMismatchError, InvalidOptionError, require_option
from bingo.search import TicketSearch

from bingo.units import find_units

from ._common import UnitScores

METRICS = ("loss", "accuracy")
_SEED_STRIDE = 0x9E3779B9  # decorrelates the hash seeds of the grid points


def midpoint_fractions(points: int) -> list[float]:
    """Reset fractions ``1 - p_j`` of the midpoint grid ``p_j = (j + 1/2) / points``."""
    return [1.0 - (j + 0.5) / points for j in range(points)]


def _grid(fractions: Union[int, Sequence[float]]) -> list[float]:
    if isinstance(fractions, int) and not isinstance(fractions, bool):
        if fractions < 1:
            raise InvalidOptionError(f"fractions must be a positive integer, got {fractions}")
        return midpoint_fractions(fractions)
    try:
        grid = [float(f) for f in fractions]
    except (TypeError, ValueError):
        raise InvalidOptionError(
            "fractions must be a number of grid points or a sequence of reset fractions in "
            f"(0, 1); got {fractions!r}") from None
    if not grid or not all(0.0 < f < 1.0 for f in grid):
        raise InvalidOptionError(f"reset fractions must lie in (0, 1); got {fractions!r}")
    return grid


def _concatenated(data) -> tuple[Tensor, Tensor]:
    """One ``(inputs, targets)`` batch from a batch or an iterable of batches."""
    if data is None:
        raise InvalidOptionError("shapley needs data=: (inputs, targets) tensors or an iterable "
                                 "of such batches")
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0], data[1]
    inputs, targets = [], []
    for batch in data:
        inputs.append(batch[0])
        targets.append(batch[1])
    if not inputs:
        raise InputMismatchError("shapley: data yielded no batch")
    return torch.cat(inputs), torch.cat(targets)


def _split(samples: int, parts: int) -> list[int]:
    base, extra = divmod(samples, parts)
    return [base + (1 if j < extra else 0) for j in range(parts)]


def shapley(model: nn.Module, granularity: str = "weight", include=None, exclude=None,
            data: Union[Iterable, tuple, None] = None, samples: int = 1024,
            fractions: Union[int, Sequence[float]] = 8, seed: int = 0, metric: str = "loss",
            backend: str = "auto", progress: bool = False,
            example_inputs: Any = None) -> UnitScores:
    """Monte-Carlo Shapley values of ``model``'s units (higher = keep); see the module docstring.

    Args:
        model: the trained network (its weights are not changed).
        granularity: ``"weight"``, ``"neuron"`` or ``"structured"``.
        include, exclude: layer or group names or patterns, as for
            :func:`bingo.units.find_units`.
        data: ``(inputs, targets)`` tensors, or an iterable of such batches (concatenated).
        samples: total number of coalitions (forward passes over ``data``), split over the grid;
            at least 2 per grid point.
        fractions: number m of midpoint grid points for the integral over p (default 8), or an
            explicit sequence of reset fractions in (0, 1), weighted equally.
        seed: seed of the coalition hash (grid point j uses a seed derived from it).
        metric: ``"loss"`` (mean cross-entropy; default) or ``"accuracy"``.
        backend: kernel backend for the batched evaluation, as for TicketSearch.
        progress: show a progress bar over the grid points.
        example_inputs: structured granularity: one batch to trace the model with; default the
            inputs of ``data``.

    Returns:
        ``{score key: float32 Shapley values}`` (expected increase of the loss, or decrease of
        accuracy, when the unit leaves a random coalition) on each group's device (a
        :class:`UnitScores`).
    """
    require_option("metric", metric, METRICS)
    grid = _grid(fractions)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2 * len(grid):
        raise InvalidOptionError(f"samples must be an integer >= 2 per grid point "
                                 f"({2 * len(grid)} for {len(grid)} points), got {samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise InvalidOptionError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    inputs, targets = _concatenated(data)
    if example_inputs is None:
        example_inputs = inputs
    # Checks the layer selection before any search runs.
    layout = find_units(model, granularity, include, exclude, example_inputs=example_inputs)
    totals = {g.param_name: torch.zeros(layout.unit_shape(g), dtype=torch.float64,
                                        device=g.device) for g in layout.groups}
    counts = {k: torch.zeros_like(t) for k, t in totals.items()}
    path = "auto"
    for j, (fraction, subsets) in enumerate(tqdm(list(zip(grid, _split(samples, len(grid)))),
                                                 desc="bingo shapley", unit="p",
                                                 disable=not progress)):
        search = TicketSearch(model, granularity, subsets=subsets, fraction=fraction,
                              reset="zero", metric=metric, score="attribution",
                              seed=(seed + _SEED_STRIDE * (j + 1)) % 2**32, backend=backend,
                              include=include, exclude=exclude, path=path,
                              example_inputs=example_inputs)
        search.step(inputs, targets)
        path = search.path  # the first search chose it; the others reuse the choice
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a flat metric only matters for the rescaled scores
            significance = search.significance()
        for key, raw in significance.raw.items():
            covered = significance.coverage[key]
            defined = (covered > 0) & (covered < subsets)
            totals[key] += torch.where(defined, raw.to(totals[key].device), 0.0)
            counts[key] += defined
    missing = sum(int((c < len(grid)).sum()) for c in counts.values())
    if missing:
        never = sum(int((c == 0).sum()) for c in counts.values())
        warnings.warn(
            f"bingo: shapley: {missing} unit(s) had no estimate at some grid point (no coalition "
            f"zeroed them, or all did; {never} at every point, scored 0); their value averages "
            "the other points. Raise samples for a full estimate.", stacklevel=2)
    return UnitScores({k: (totals[k] / counts[k].clamp_min(1)).float() for k in totals},
                      layout.granularity)

