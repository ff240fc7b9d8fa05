"""The exceptions bingo raises. Each names the problem; all derive from :class:`BingoError`.

The ones the kernels raise too are defined in :mod:`bingo_kernels.errors` and re-exported here,
so ``bingo.errors`` is the one place a user looks.
"""

from __future__ import annotations

from typing import Iterable

from torch import Tensor

from bingo_kernels.errors import (  # noqa: F401  (re-exported)
    BackendUnavailableError,
    BingoError,
    InputMismatchError,
    InvalidOptionError,
    require_option,
)


class NoPrunableLayersError(BingoError, ValueError):
    """The model (after include/exclude) has no nn.Linear or nn.Conv2d layer to search or prune."""


class NonFiniteError(BingoError, FloatingPointError):
    """NaN or Inf in the weights, in the initial snapshot, or in a metric."""


class UnreachableFloorError(BingoError, ValueError):
    """The accuracy floor is above what the unpruned model reaches."""


class CheckpointError(BingoError, RuntimeError):
    """A state_dict or checkpoint file is corrupt or belongs to a different model or config."""


class DistributedError(BingoError, RuntimeError):
    """A distributed ticket search cannot go on: a rank failed, timed out or disagrees with rank 0."""


def require_data(what: str, named_tensors: Iterable[tuple[str, object]]) -> None:
    """Raise InputMismatchError naming the first meta tensor (a shape without values) of
    ``named_tensors``: nothing can be searched, pruned or measured on it."""
    for name, t in named_tensors:
        if isinstance(t, Tensor) and t.is_meta:
            raise InputMismatchError(
                f"{what} {name!r} is on the meta device (a shape without values); materialise "
                "the model first, e.g. model.to_empty(device=...) and load_state_dict")
