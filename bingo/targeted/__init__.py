"""Targeted ticket search: choose which units to test strategically instead of at random.

* :mod:`bingo.targeted.elimination`: neurons / channels, batched greedy backward elimination on
  training evidence (:func:`eliminate`, :class:`EliminationConfig`): the neuron default.
* :mod:`bingo.targeted.allocation`: weights, per-layer sparsity allocated by greedy search,
  magnitude order inside each layer (:func:`allocate`, :class:`AllocationConfig`).
* :mod:`bingo.targeted.iterative`: weights, IMP's schedule with a least-squares refit in place
  of each retraining (:func:`iterative_refit`, :class:`IterativeRefitConfig`,
  ``search="iterative"``).
* :mod:`bingo.targeted.incremental`: the downstream-only evaluation the first two run on.
* :mod:`bingo.targeted.shrink`: a physically smaller copy of a channel-pruned conv net.
* :func:`targeted_scores`: either search in the baseline score format (registered as
  ``"targeted"`` in :data:`bingo.baselines.BASELINES`).
* :func:`targeted_prune`: the documented default end to end: the search, then :func:`bingo.prune`
  with least-squares reconstruction of the survivors (:mod:`bingo.reconstruct`).
"""

from .allocation import AllocationConfig, AllocationResult, allocate
from .elimination import EliminationConfig, EliminationResult, eliminate
from .iterative import IterativeRefitConfig, IterativeRefitResult, iterative_refit
from .scores import DEFAULT_SEARCH, SEARCHES, targeted_prune, targeted_scores

__all__ = ["AllocationConfig", "AllocationResult", "DEFAULT_SEARCH", "EliminationConfig",
           "EliminationResult", "IterativeRefitConfig", "IterativeRefitResult", "SEARCHES",
           "allocate", "eliminate", "iterative_refit", "targeted_prune", "targeted_scores"]
