"""Score dicts that say what they score.

:class:`UnitScores` is what bingo's scorers return (the baselines, the targeted search) and what
:func:`bingo.prune` reads besides :class:`bingo.Significance`: a plain ``dict`` of score key ->
tensor (higher = keep) that also carries its ``granularity``, so that pruning never has to guess
from shapes whether ``"0.weight": (8,)`` means one layer's rows or a unit group (a conv channel
with its BatchNorm entries and its consumers' columns).
"""

from __future__ import annotations

from typing import Mapping, Optional

from torch import Tensor

from .errors import require_option

GRANULARITIES = ("weight", "neuron", "structured")


class UnitScores(dict):
    """Score key -> scores, with ``granularity`` (``"weight"``, ``"neuron"`` or
    ``"structured"``, or None: unknown) and ``coverage`` (sample counts with the scores' keys
    and shapes, or None). ``dict(scores)`` drops the attributes; a copy or pickle keeps them."""

    def __init__(self, scores: Mapping[str, Tensor] = (), granularity: Optional[str] = None,
                 coverage: Optional[Mapping[str, Tensor]] = None):
        if granularity is not None:
            require_option("granularity", granularity, GRANULARITIES)
        super().__init__(scores)
        self.granularity = granularity
        self.coverage = coverage
