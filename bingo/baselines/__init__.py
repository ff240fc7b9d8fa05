"""Baseline pruning scores, in the same format as :meth:`bingo.TicketSearch.significance`.

Every baseline returns a dict keyed by weight parameter name (``"1.weight"``) with one tensor per
layer: shaped like the weight at ``granularity="weight"``, ``(out_features,)`` at ``"neuron"``;
higher means keep. Layers are chosen with :func:`bingo.units.find_units`, so a baseline scores
exactly the layers a ticket search with the same ``include``/``exclude`` would (at neuron
granularity that leaves out the output layer by default), and :func:`bingo.prune` takes the result
as it takes a significance.

Register a new baseline by adding it to :data:`BASELINES`; every entry accepts
``(model, granularity="weight", include=None, exclude=None, **options)``.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import Tensor, nn

from bingo.errors import InvalidOptionError, require_option

from .magnitude import magnitude
from .random import random_scores

Scores = dict[str, Tensor]

BASELINES: dict[str, Callable[..., Scores]] = {
    "magnitude": magnitude,
    "random": random_scores,
}
"""Name -> scoring function (see the module docstring for the common signature)."""


def baseline_scores(name: str, model: nn.Module, granularity: str = "weight", **options) -> Scores:
    """Scores of the baseline ``name`` for ``model``; unknown names or options raise.

    Example: ``baseline_scores("random", model, "neuron", seed=3)``.
    """
    require_option("baseline", name, BASELINES)
    function = BASELINES[name]
    try:
        inspect.signature(function).bind(model, granularity=granularity, **options)
    except TypeError as exc:
        accepted = ", ".join(list(inspect.signature(function).parameters)[2:])
        raise InvalidOptionError(
            f"baseline {name!r}: {exc}; its options are: {accepted}") from exc
    return function(model, granularity=granularity, **options)


__all__ = ["BASELINES", "Scores", "baseline_scores", "magnitude", "random_scores"]
