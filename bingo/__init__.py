"""bingo: BINGO pruning — ticket search during training, significance, one-shot pruning.

The user-facing API: :class:`TicketSearch` (attach to a training loop), its ``significance()``,
and :func:`prune` (one-shot pruning to an accuracy floor or a sparsity, optionally refitting the
surviving weights with :class:`LeastSquaresReconstruction`), and :func:`refit` (the same refit for
units removed with masks of your own). Kernels live in the
separate :mod:`bingo_kernels` package, which this one calls.
"""

__version__ = "0.1.0"

from .errors import (BackendUnavailableError, BingoError, CheckpointError, DistributedError,
                     InputMismatchError, InvalidOptionError, NoPrunableLayersError,
                     NonFiniteError, UnreachableFloorError)
from .estimators import ESTIMATORS, Significance, register_estimator
from .pruning import PruneResult, StructuredResult, prune, shrink_mlp, shrink_structured
from .reconstruct import LeastSquaresReconstruction, RefitResult, refit
from .search import SearchConfig, TicketSearch
from .units import find_units

__all__ = [
    "BackendUnavailableError", "BingoError", "CheckpointError", "DistributedError", "ESTIMATORS",
    "InputMismatchError", "InvalidOptionError", "LeastSquaresReconstruction",
    "NoPrunableLayersError", "NonFiniteError",
    "PruneResult", "RefitResult", "SearchConfig", "StructuredResult", "Significance", "TicketSearch", "UnreachableFloorError", "__version__",
    "find_units", "prune", "refit", "register_estimator", "shrink_mlp", "shrink_structured",
]
