"""The targeted search as a baseline-style scoring function (the format :func:`bingo.prune`,
``shrink_mlp`` and the experiment harness take), one search per granularity."""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import Tensor, nn

from bingo.errors import InvalidOptionError, require_option
from bingo.pruning import PruneResult, prune
from bingo.reconstruct import LeastSquaresReconstruction

from .allocation import AllocationConfig, allocate
from .elimination import EliminationConfig, eliminate

SEARCHES: dict[str, tuple[type, Callable]] = {
    "neuron": (EliminationConfig, eliminate),
    "weight": (AllocationConfig, allocate),
}
"""Granularity -> (config dataclass, search function) of its documented default search."""


def targeted_scores(model: nn.Module, granularity: str = "neuron", include=None, exclude=None,
                    data=None, progress: bool = False, **options) -> dict[str, Tensor]:
    """Scores (higher = keep) of the targeted search for ``granularity``.

    ``data`` is the training data ((inputs, targets) or a TensorDataset) the evidence is drawn
    from; ``options`` are fields of :class:`EliminationConfig` (neurons / channels) or
    :class:`AllocationConfig` (weights). The whole search result is attached as ``.result``.
    """
    require_option("granularity", granularity, SEARCHES)
    if data is None:
        raise InvalidOptionError("targeted search needs data= (training (inputs, targets)): its "
                                 "evidence is training data")
    config_type, search = SEARCHES[granularity]
    fields = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise InvalidOptionError(f"unknown option(s) {unknown} for the {granularity} targeted "
                                 f"search; its options are: {', '.join(sorted(fields))}")
    result = search(model, data, config_type(**options), include=include, exclude=exclude,
                    progress=progress)
    scores = _Scores(result.scores)
    scores.result = result
    return scores


class _Scores(dict):
    """A score dict that also carries the search result (``.result``)."""

    result = None


def targeted_prune(model: nn.Module, data, granularity: str = "neuron", *,
                   floor: float | None = None, sparsity: float | None = None, eval_fn=None,
                   reconstruct: bool = True, include=None, exclude=None, progress: bool = False,
                   **options) -> PruneResult:
    """The documented default in one call: :func:`targeted_scores` on the training ``data``,
    then :func:`bingo.prune` to ``floor`` (with ``eval_fn``, e.g. validation accuracy) or to
    ``sparsity``, the survivors refitted by :class:`bingo.LeastSquaresReconstruction` on the same
    ``data`` (``reconstruct=False``: the search's masks alone). ``options`` go to the search's
    config (:class:`EliminationConfig` / :class:`AllocationConfig`)."""
    scores = targeted_scores(model, granularity, include, exclude, data=data, progress=progress,
                             **options)
    return prune(model, scores, floor=floor, sparsity=sparsity, eval_fn=eval_fn,
                 progress=progress,
                 reconstruct=LeastSquaresReconstruction(data) if reconstruct else None)
