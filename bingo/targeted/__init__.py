"""Targeted ticket search: choose which units to test strategically instead of at random.

* :mod:`bingo.targeted.elimination`: neurons / channels, batched greedy backward elimination on
  training evidence (:func:`eliminate`, :class:`EliminationConfig`): the neuron default.
* :mod:`bingo.targeted.allocation`: weights, per-layer sparsity allocated by greedy search,
  magnitude order inside each layer (:func:`allocate`, :class:`AllocationConfig`).
* :mod:`bingo.targeted.incremental`: the downstream-only evaluation both run on.
* :mod:`bingo.targeted.shrink`: a physically smaller copy of a channel-pruned conv net.
* :func:`targeted_scores`: either search in the baseline score format (registered as
  ``"targeted"`` in :data:`bingo.baselines.BASELINES`).
* :func:`targeted_prune`: the documented default end to end: the search, then :func:`bingo.prune`
  with least-squares reconstruction of the survivors (:mod:`bingo.reconstruct`).
"""

from .allocation import AllocationConfig, AllocationResult, allocate
from .elimination import EliminationConfig, EliminationResult, eliminate
from .scores import SEARCHES, targeted_prune, targeted_scores

__all__ = ["AllocationConfig", "AllocationResult", "EliminationConfig", "EliminationResult",
           "SEARCHES", "allocate", "eliminate", "targeted_prune", "targeted_scores"]
