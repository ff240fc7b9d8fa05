"""bingo: BINGO pruning — ticket search during training, significance, one-shot pruning.

The user-facing API: :class:`TicketSearch` (attach to a training loop), its ``significance()``,
and :func:`prune` (one-shot pruning to an accuracy floor or a sparsity, optionally refitting the
surviving weights with :class:`LeastSquaresReconstruction`), :func:`refit` (the same refit for
units removed with masks of your own), and :func:`save_pruned` / :func:`load_pruned` (a pruned
model on disk). Kernels live in the
separate :mod:`bingo_kernels` package, which this one calls.

Names are imported on first use (PEP 562), so that ``import bingo`` -- and with it the ``bingo``
command's ``--help`` and argument errors -- does not wait seconds for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("BackendUnavailableError", "BingoError", "CheckpointError",
                     "DistributedError", "InputMismatchError", "InvalidOptionError",
                     "NoPrunableLayersError", "NonFiniteError", "UnreachableFloorError"),
                    "errors"),
    **dict.fromkeys(("ESTIMATORS", "Significance", "register_estimator"), "estimators"),
    **dict.fromkeys(("PruneResult", "StructuredResult", "prune", "shrink_mlp",
                     "shrink_structured"), "pruning"),
    "UnitScores": "scoring",
    **dict.fromkeys(("LeastSquaresReconstruction", "RefitResult", "refit"), "reconstruct"),
    **dict.fromkeys(("load_pruned", "save_pruned"), "save"),
    **dict.fromkeys(("SearchConfig", "TicketSearch"), "search"),
    "find_units": "units",
}
"""Public name -> the submodule that defines it."""

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from .errors import (BackendUnavailableError, BingoError, CheckpointError, DistributedError,
                         InputMismatchError, InvalidOptionError, NoPrunableLayersError,
                         NonFiniteError, UnreachableFloorError)
    from .estimators import ESTIMATORS, Significance, register_estimator
    from .pruning import PruneResult, StructuredResult, prune, shrink_mlp, shrink_structured
    from .reconstruct import LeastSquaresReconstruction, RefitResult, refit
    from .scoring import UnitScores
    from .save import load_pruned, save_pruned
    from .search import SearchConfig, TicketSearch
    from .units import find_units


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name.startswith("__"):  # probes such as __wrapped__ or __file__ of tools
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:  # a submodule (bingo.baselines, ...), as when the package imported them eagerly
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
