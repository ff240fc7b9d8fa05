"""Least-squares reconstruction: refit the surviving weights of a pruned model, no retraining.

* :class:`LeastSquaresReconstruction` (:mod:`.reconstruction`): the refit ``bingo.prune(...,
  reconstruct=)`` applies; its module docstring has the method.
* :func:`refit` (:mod:`.own_masks`): the same for masks of your own.
* :mod:`.calibration` (the data), :mod:`.layers` (which layers, how each reads its input),
  :mod:`.moments` (statistics), :mod:`.solve` (the constrained fit), :mod:`.sequential` (the
  one-pass nn.Sequential stream) and :mod:`.general` (any model, hooks).
"""

from .reconstruction import DTYPES, LAYER_POLICIES, LeastSquaresReconstruction
from .own_masks import RefitResult, refit

__all__ = ["DTYPES", "LAYER_POLICIES", "LeastSquaresReconstruction", "RefitResult", "refit"]
