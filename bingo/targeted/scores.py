"""The targeted search as a baseline-style scoring function (the format :func:`bingo.prune`,
``shrink_mlp`` and the experiment harness take), one search per granularity, and
:func:`targeted_prune`, search and prune in one call."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from torch import Tensor, nn

from bingo.errors import InvalidOptionError, require_option
from bingo.pruning import PruneResult, prune
from bingo.reconstruct import LeastSquaresReconstruction
from bingo.scoring import UnitScores

from .allocation import AllocationConfig, allocate
from .checks import check_evidence
from .elimination import EliminationConfig, data_tensors, eliminate
from .iterative import IterativeRefitConfig, iterative_refit

SEARCHES: dict[str, tuple[type, Callable]] = {
    "elimination": (EliminationConfig, eliminate),
    "allocation": (AllocationConfig, allocate),
    "iterative": (IterativeRefitConfig, iterative_refit),
}
"""Search name -> (config dataclass, search function)."""
DEFAULT_SEARCH: dict[str, str] = {"neuron": "elimination", "structured": "elimination",
                                  "weight": "iterative"}
"""Granularity -> the search :func:`targeted_scores` runs when none is named: the best measured
one for each (docs/results.md)."""
SEARCH_GRANULARITIES: dict[str, tuple[str, ...]] = {
    "elimination": ("neuron", "structured"), "allocation": ("weight",),
    "iterative": ("weight", "neuron")}
"""Search name -> the granularities it ranks."""
STRUCTURE_SEARCHES: tuple[str, ...] = ("elimination",)
"""Searches that run on any model (its unit groups, traced with ``example_inputs``); the others
need a plain nn.Sequential."""


class _Scores(UnitScores):
    """:class:`bingo.scoring.UnitScores` that also carry the search result (``.result``)."""

    result = None


def targeted_scores(model: nn.Module, granularity: str = "neuron", include=None, exclude=None,
                    data=None, progress: bool = True, search: str | None = None,
                    example_inputs: Any = None, prior=None, **options) -> dict[str, Tensor]:
    """Scores (higher = keep) of a targeted search for ``granularity``.

    ``data`` is the training data ((inputs, targets) tensors or a TensorDataset; inputs may be
    token ids with the next tokens as ``(N, T)`` targets) the evidence is drawn from; ``search``
    a key of :data:`SEARCHES` (default: :data:`DEFAULT_SEARCH` of the granularity); ``options``
    are fields of its config (:class:`EliminationConfig`, :class:`AllocationConfig` or
    :class:`IterativeRefitConfig`). On a plain nn.Sequential ``"neuron"`` ranks its layers'
    neurons as before; on any other model ``"neuron"`` and ``"structured"`` both rank its unit
    groups (attention heads, MLP neurons, channels; ``example_inputs`` is what their trace runs,
    one example of ``data`` by default). The weight searches (allocation, iterative) need a
    plain nn.Sequential. The whole search result is attached as ``.result``, what the scores
    rank as ``.granularity``. ``prior`` (elimination only: scores of every unit group, e.g. a
    training-time :class:`bingo.TicketSearch`'s significance) limits which units the elimination
    measures (:attr:`EliminationConfig.prior_pool`).

    Before any long work the data is checked with one forward of one example: NaN / Inf in the
    model or the inputs, a dtype the model does not take, a wrong feature count or targets that
    do not fit the logits raise one :class:`bingo.errors.BingoError`.
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
    config = config_type(**options)
    config.validate()
    check_evidence(model, *data_tensors(data))
    # A search that ranks several granularities is told which one.
    extra: dict[str, Any] = {"granularity": granularity} \
        if len(SEARCH_GRANULARITIES[search]) > 1 else {}
    if search in STRUCTURE_SEARCHES:
        extra["example_inputs"] = example_inputs
    if prior is not None:
        if search != "elimination":
            raise InvalidOptionError(f"prior= is taken by the elimination search, not {search!r}")
        extra["prior"] = prior
    result = run_search(model, data, config, include=include, exclude=exclude,
                        progress=progress, **extra)
    scores = _Scores(result.scores, getattr(result, "granularity", granularity))
    scores.result = result
    return scores


class _TimedReconstruction(LeastSquaresReconstruction):
    """:class:`bingo.LeastSquaresReconstruction` that adds up the seconds of its preparation and
    refits (``seconds``), so that :func:`targeted_prune` can report the refit apart from the
    floor search."""

    seconds = 0.0

    def prepare(self, model: nn.Module) -> None:
        started = time.perf_counter()
        try:
            return super().prepare(model)
        finally:
            self.seconds += time.perf_counter() - started

    def __call__(self, model: nn.Module, masks) -> None:
        started = time.perf_counter()
        try:
            return super().__call__(model, masks)
        finally:
            self.seconds += time.perf_counter() - started


def targeted_prune(model: nn.Module, data, granularity: str = "neuron", *,
                   floor: float | None = None, sparsity: float | None = None, eval_fn=None,
                   reconstruct: bool = True, include=None, exclude=None, progress: bool = True,
                   search: str | None = None, example_inputs: Any = None,
                   **options) -> PruneResult:
    """The documented default in one call: :func:`targeted_scores` on the training ``data``,
    then :func:`bingo.prune` to ``floor`` (with ``eval_fn``, e.g. validation accuracy) or to
    ``sparsity``, the survivors refitted by :class:`bingo.LeastSquaresReconstruction` on the same
    ``data`` (``reconstruct=False``: the search's masks alone). ``options`` go to the search's
    config (:class:`EliminationConfig` / :class:`AllocationConfig` /
    :class:`IterativeRefitConfig`). ``granularity="structured"`` (or ``"neuron"`` on a model
    that is not a plain nn.Sequential) ranks and prunes the model's unit groups;
    ``example_inputs`` (default: one example of ``data``) is what their trace runs. With
    ``sparsity`` the elimination stops once it has removed that fraction of the units
    (``max_fraction``, unless given): the units it would remove after that are never pruned, so
    ranking them would only cost time.

    Returns the :class:`bingo.PruneResult` with three attributes added: ``scores`` (the
    search's scores), ``search`` (its result, e.g. :class:`EliminationResult`) and ``timings``
    (seconds: ``{"search", "prune", "refit"}``; ``prune`` is the floor search and masking
    without the refit, ``refit`` the least-squares preparation and refits, 0 without).
    """
    started = time.perf_counter()
    # Bad data or calibration inputs the refit cannot take fail here, not after the search.
    check_evidence(model, *data_tensors(data))
    refit = _TimedReconstruction(data, progress=progress) if reconstruct else None
    resolved = search if search is not None else DEFAULT_SEARCH.get(granularity)
    if sparsity is not None and resolved == "elimination" and "max_fraction" not in options \
            and 0.0 < sparsity < EliminationConfig.max_fraction:
        options["max_fraction"] = sparsity
    scores = targeted_scores(model, granularity, include, exclude, data=data, progress=progress,
                             search=search, example_inputs=example_inputs, **options)
    searched = time.perf_counter()
    extra: dict[str, Any] = {}
    if scores.granularity == "structured":
        extra["example_inputs"] = example_inputs if example_inputs is not None else \
            data_tensors(data)[0][:1]
    result = prune(model, scores, floor=floor, sparsity=sparsity, eval_fn=eval_fn,
                   progress=progress, reconstruct=refit, **extra)
    refit_seconds = refit.seconds if refit is not None else 0.0
    result.scores = scores
    result.search = scores.result
    result.timings = {"search": searched - started,
                      "prune": time.perf_counter() - searched - refit_seconds,
                      "refit": refit_seconds}
    return result
