"""Baseline pruning scores, in the same format as :meth:`bingo.TicketSearch.significance`.

Every baseline returns a :class:`UnitScores` (a plain dict with a ``granularity`` attribute) keyed
by score key, one tensor per unit group, higher means keep:

* ``granularity="weight"``: keyed by weight parameter name (``"1.weight"``), shaped like the
  weight;
* ``"neuron"``: keyed by weight name, ``(out_features,)``: an output row, conv channel or
  Conv1D column (transformers' GPT-2 layer, whose outputs are on axis 1) with its bias entry;
* ``"structured"``: keyed by structure group key (``"<attention block>.heads"``, the first
  producer's weight name), ``(num_units,)``: the unit groups of :mod:`bingo.structure` (heads or
  key/value groups with their q/k/v rows and o columns, MLP neurons with their consumers'
  columns, conv channels with their BatchNorm entries and residual partners), for any model the
  structure layer traces. Pass ``example_inputs=`` (one batch) for a model that is neither a
  transformers model nor an MLP; the data-driven baselines default it to their first batch.

Units are chosen with :func:`bingo.units.find_units`, so a baseline scores exactly the units a
ticket search with the same ``include``/``exclude`` would (at neuron granularity that leaves out
the output layer by default), and :func:`bingo.prune` takes the result as it takes a
significance. A unit's measure is taken over its slices (``UnitGroup.slices``), so neurons,
heads and channels are measured by one piece of code (``bingo/baselines/_common.py``).

==============================  ========================================  ==================  ======
name (module)                   estimates                                 cost                gran.
==============================  ========================================  ==================  ======
``magnitude`` (magnitude)       ``|w|``; units: L2 norm over all the      weights only        w n s
                                unit's slices / group mean (DepGraph)
``random`` (random)             uniform noise (the floor to beat)         none                w n s
``lamp`` (lamp)                 layer-adaptive magnitude (Lee et al.      one sort per        w n s
                                2021); units: of the group norms          group
``magnitude_increase``          ``|w| - |w0|`` (Zhou et al. 2019);        weights only        w n s
(magnitude_increase)            units: norm increase / group mean;
                                needs ``initial=``
``taylor`` (taylor)             first-order Taylor ``|w dL/dw|``; units:  free during         w n s
                                ``|sum w dL/dw|`` over the unit's slices  training (hooks),
                                (Molchanov et al. 2017/2019); needs       or one backward
                                ``accumulator=`` or ``data=``             per batch
``shapley`` (shapley)           Monte-Carlo Shapley value, zero           ``samples``         w n s
                                baseline, via TicketSearch semivalues;    forward passes
                                needs ``data=``                           over ``data``
``imp`` (imp)                   iterative magnitude pruning with          ``rounds``          w n
                                rewinding (Frankle & Carbin 2019);        trainings
                                needs ``train_fn=``, ``rewind_state=``,
                                ``rounds=``
``wanda`` (wanda)               ``|w| * ||x||`` (Sun et al. 2023), input  one forward per     w n s
                                norms from hooks (grouped / depthwise     calibration batch
                                convs read their group's channels);
                                units: summed over the unit's weight
                                slices, or FLAP's Wanda-sp
                                (``variant="wanda-sp"``); needs data
``lamp_taylor`` (lamp_taylor)   LAMP's rescaling of the Taylor            as ``taylor``       w n s
                                saliency; needs ``accumulator=`` or
                                ``data=``
``flap`` (flap)                  FLAP (An et al. 2024): input-variance     one forward per     s
                                times squared consumer column norm,       calibration batch
                                standardised per group (adaptive global
                                structure); ``FlapCompensation`` is its
                                bias compensation; needs ``data=``
``bonsai`` (bonsai)             Bonsai (Dery et al. 2024): L1 regression  ``submodels *       s
                                of sub-model perplexity on which units    rounds`` forwards
                                they keep, over random masks, pruned in   (or batched)
                                rounds; needs ``data=`` (inputs, targets)
``targeted``                    greedy elimination order (neurons,        ~removed/4          see
(bingo.targeted)                channels) or searched per-layer           batched             bingo.
                                allocation (weights), or                  downstream          tar-
                                ``search="iterative"``: IMP's schedule    passes; one refit   geted
                                with a least-squares refit per round; on  a round
                                training ``data=``
==============================  ========================================  ==================  ======

Granularities: w = weight, n = neuron, s = structured. A baseline asked for a granularity it does
not support raises :class:`bingo.errors.InvalidOptionError` naming itself, the granularity and
why (``imp`` masks and retrains per layer; structured units span several layers).

Any of these scores can be pruned with ``bingo.prune(..., reconstruct=
bingo.LeastSquaresReconstruction(data))``, which refits the surviving weights to the dense layer
outputs (:mod:`bingo.reconstruct`); the experiment harness measures that as ``"<name>+ls"``.

Beyond the registry: :class:`TaylorAccumulator` (attach during training; any granularity),
:func:`imp` / :class:`IMPResult` / :class:`IMPRound` (per-round masks, accuracies, timings and
states). Shared helpers (unit totals over slices, layer normalisation, checking reference states)
live in ``bingo/baselines/_common.py``; the layer-input recorder Wanda uses (which module feeds
each weight, per module type) in ``bingo/baselines/_inputs.py``.

Register a new baseline by adding it to :data:`BASELINES`; every entry accepts
``(model, granularity="weight", include=None, exclude=None, **options)``.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from bingo.errors import InvalidOptionError, require_option

from ._common import UnitScores
from .bonsai import bonsai
from .flap import FlapCompensation, flap
from .imp import IMPResult, IMPRound, imp, imp_scores
from .lamp import lamp
from .lamp_taylor import lamp_taylor
from .magnitude import magnitude
from .magnitude_increase import magnitude_increase
from .random import random_scores
from .shapley import shapley
from .taylor import TaylorAccumulator, taylor
from .wanda import wanda
from bingo.targeted import targeted_scores  # noqa: E402  (bingo.targeted needs no baseline)

Scores = UnitScores
"""What every baseline returns (a dict score key -> tensor with ``.granularity``)."""

BASELINES: dict[str, Callable[..., Scores]] = {
    "magnitude": magnitude,
    "random": random_scores,
    "lamp": lamp,
    "magnitude_increase": magnitude_increase,
    "taylor": taylor,
    "shapley": shapley,
    "imp": imp_scores,
    "wanda": wanda,
    "lamp_taylor": lamp_taylor,
    "flap": flap,
    "bonsai": bonsai,
    "targeted": targeted_scores,
}
"""Name -> scoring function (see the module docstring for the common signature)."""


def baseline_scores(name: str, model: nn.Module, granularity: str = "weight", **options) -> Scores:
    """Scores of the baseline ``name`` for ``model``; unknown names or options raise.

    Example: ``baseline_scores("random", model, "neuron", seed=3)``.
    """
    require_option("baseline", name, BASELINES)
    function = BASELINES[name]
    try:
        inspect.signature(function).bind(model, granularity=granularity, **options)
    except TypeError as exc:
        accepted = ", ".join(list(inspect.signature(function).parameters)[2:])
        raise InvalidOptionError(
            f"baseline {name!r}: {exc}; its options are: {accepted}") from exc
    return function(model, granularity=granularity, **options)


__all__ = ["BASELINES", "FlapCompensation", "IMPResult", "IMPRound", "Scores", "TaylorAccumulator", "UnitScores",
           "baseline_scores", "bonsai", "flap", "imp", "imp_scores", "lamp", "magnitude", "magnitude_increase",
           "random_scores", "shapley", "taylor", "wanda"]
