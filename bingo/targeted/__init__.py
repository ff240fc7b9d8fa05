"""Targeted ticket search: choose which units to test strategically instead of at random.

* :mod:`bingo.targeted.elimination`: neurons / channels / heads, batched greedy backward
  elimination on training evidence (:func:`eliminate`, :class:`EliminationConfig`): the neuron
  and structured default, on a plain nn.Sequential or any model's unit groups.
* :mod:`bingo.targeted.allocation`: weights, per-layer sparsity allocated by greedy search,
  magnitude order inside each layer (:func:`allocate`, :class:`AllocationConfig`).
* :mod:`bingo.targeted.iterative`: weights, IMP's schedule with a least-squares refit in place
  of each retraining (:func:`iterative_refit`, :class:`IterativeRefitConfig`,
  ``search="iterative"``).
* :mod:`bingo.targeted.incremental`: the downstream-only evaluation of an nn.Sequential.
* :mod:`bingo.targeted.grouped`: batched unit removals on any model's unit groups
  (:class:`bingo.executor.BatchedEvaluator`); :mod:`bingo.targeted.macs`: multiply-adds a unit
  saves; :mod:`bingo.targeted.checks`: the data checks run before a search.
* :mod:`bingo.targeted.shrink`: a physically smaller copy of a channel-pruned conv net.
* :func:`targeted_scores`: either search in the baseline score format (registered as
  ``"targeted"`` in :data:`bingo.baselines.BASELINES`).
* :func:`targeted_prune`: the documented default end to end: the search, then :func:`bingo.prune`
  with least-squares reconstruction of the survivors (:mod:`bingo.reconstruct`); the result
  carries the search's ``scores``, its ``search`` result and ``timings``.
"""

from .allocation import AllocationConfig, AllocationResult, allocate
from .elimination import EliminationConfig, EliminationResult, eliminate
from .iterative import IterativeRefitConfig, IterativeRefitResult, iterative_refit
from .scores import DEFAULT_SEARCH, SEARCHES, targeted_prune, targeted_scores

__all__ = ["AllocationConfig", "AllocationResult", "DEFAULT_SEARCH", "EliminationConfig",
           "EliminationResult", "IterativeRefitConfig", "IterativeRefitResult", "SEARCHES",
           "allocate", "eliminate", "iterative_refit", "targeted_prune", "targeted_scores"]
