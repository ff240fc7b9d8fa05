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
from .iterative import IterativeRefitConfig, iterative_refit

SEARCHES: dict[str, tuple[type, Callable]] = {
    "elimination": (EliminationConfig, eliminate),
    "allocation": (AllocationConfig, allocate),
    "iterative": (IterativeRefitConfig, iterative_refit),
}
"""Search name -> (config dataclass, search function)."""
DEFAULT_SEARCH: dict[str, str] = {"neuron": "elimination", "weight": "iterative"}
"""Granularity -> the search :func:`targeted_scores` runs when none is named: the best measured
one for each (docs/results.md)."""
SEARCH_GRANULARITIES: dict[str, tuple[str, ...]] = {
    "elimination": ("neuron",), "allocation": ("weight",), "iterative": ("weight", "neuron")}
"""Search name -> the granularities it ranks."""


def targeted_scores(model: nn.Module, granularity: str = "neuron", include=None, exclude=None,
                    data=None, progress: bool = False, search: str | None = None,
                    **options) -> dict[str, Tensor]:
    """Scores (higher = keep) of a targeted search for ``granularity``.

    ``data`` is the training data ((inputs, targets) or a TensorDataset) the evidence is drawn
    from; ``search`` a key of :data:`SEARCHES` (default: :data:`DEFAULT_SEARCH` of the
    granularity); ``options`` are fields of its config (:class:`EliminationConfig`,
    :class:`AllocationConfig` or :class:`IterativeRefitConfig`). The whole search result is
    attached as ``.result``.
    """
    require_option("granularity", granularity, DEFAULT_SEARCH)
    search = DEFAULT_SEARCH[granularity] if search is None else search
    require_option("search", search, SEARCHES)
    if granularity not in SEARCH_GRANULARITIES[search]:
        raise InvalidOptionError(f"the {search} search ranks {SEARCH_GRANULARITIES[search]} "
                                 f"units, not {granularity!r}")
    if data is None:
        raise InvalidOptionError("targeted search needs data= (training (inputs, targets)): its "
                                 "evidence is training data")
    config_type, run_search = SEARCHES[search]
    fields = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise InvalidOptionError(f"unknown option(s) {unknown} for the {search} targeted "
                                 f"search; its options are: {', '.join(sorted(fields))}")
    # A search that ranks several granularities is told which one.
    extra = {"granularity": granularity} if len(SEARCH_GRANULARITIES[search]) > 1 else {}
    result = run_search(model, data, config_type(**options), include=include, exclude=exclude,
                        progress=progress, **extra)
    scores = _Scores(result.scores)
    scores.result = result
    return scores


class _Scores(dict):
    """A score dict that also carries the search result (``.result``)."""

    result = None


def targeted_prune(model: nn.Module, data, granularity: str = "neuron", *,
                   floor: float | None = None, sparsity: float | None = None, eval_fn=None,
                   reconstruct: bool = True, include=None, exclude=None, progress: bool = False,
                   search: str | None = None, **options) -> PruneResult:
    """The documented default in one call: :func:`targeted_scores` on the training ``data``,
    then :func:`bingo.prune` to ``floor`` (with ``eval_fn``, e.g. validation accuracy) or to
    ``sparsity``, the survivors refitted by :class:`bingo.LeastSquaresReconstruction` on the same
    ``data`` (``reconstruct=False``: the search's masks alone). ``options`` go to the search's
    config (:class:`EliminationConfig` / :class:`AllocationConfig`)."""
    scores = targeted_scores(model, granularity, include, exclude, data=data, progress=progress,
                             search=search, **options)
    return prune(model, scores, floor=floor, sparsity=sparsity, eval_fn=eval_fn,
                 progress=progress,
                 reconstruct=LeastSquaresReconstruction(data) if reconstruct else None)
