"""Baseline pruning scores, in the same format as :meth:`bingo.TicketSearch.significance`.

Every baseline returns a dict keyed by weight parameter name (``"1.weight"``) with one tensor per
layer: shaped like the weight at ``granularity="weight"``, ``(out_features,)`` at ``"neuron"``;
higher means keep. Layers are chosen with :func:`bingo.units.find_units`, so a baseline scores
exactly the layers a ticket search with the same ``include``/``exclude`` would (at neuron
granularity that leaves out the output layer by default), and :func:`bingo.prune` takes the result
as it takes a significance. All work on nn.Linear and nn.Conv2d layers (a neuron is an output row
or conv channel, with its bias entry).

============================  ============================================  ======================
name (module)                 estimates                                     cost
============================  ============================================  ======================
``magnitude`` (magnitude)     ``|w|``; neurons: row norm / layer mean       weights only
``random`` (random)           uniform noise (the floor to beat)             none
``lamp`` (lamp)               layer-adaptive magnitude (Lee et al. 2021)    one sort per layer
``magnitude_increase``        ``|w| - |w0|`` (Zhou et al. 2019); needs      weights only
(magnitude_increase)          ``initial=``
``taylor`` (taylor)           first-order Taylor ``|w dL/dw|``; neurons     free during training
                              Molchanov et al. 2017/2019; needs             (hooks), or one
                              ``accumulator=`` or ``data=``                 backward per batch
``shapley`` (shapley)         Monte-Carlo Shapley value, zero baseline,     ``samples`` forward
                              via TicketSearch semivalues; needs ``data=``  passes over ``data``
``imp`` (imp)                 iterative magnitude pruning with rewinding    ``rounds`` trainings
                              (Frankle & Carbin 2019); needs ``train_fn=``,
                              ``rewind_state=``, ``rounds=``
``wanda`` (wanda)             ``|w| * ||x||`` (Sun et al. 2023), input      one forward per
                              norms from hooks; neurons / heads: summed;    calibration batch
                              needs ``data=``
``lamp_taylor`` (lamp_taylor) LAMP's rescaling of the Taylor saliency;      as ``taylor``
                              needs ``accumulator=`` or ``data=``
``targeted``                  greedy elimination order (neurons, channels)  ~removed/4 batched
(bingo.targeted)              or searched per-layer allocation (weights),   downstream passes;
                              or ``search="iterative"``: IMP's schedule     one refit a round;
                              with a least-squares refit per round;         see bingo.targeted
                              on training ``data=``
============================  ============================================  ======================

``granularity="structured"`` (heads + MLP neurons, see :mod:`bingo.attention`) works with
magnitude, random, lamp, taylor, lamp_taylor and wanda; the others raise an error naming it.

Any of these scores can be pruned with ``bingo.prune(..., reconstruct=
bingo.LeastSquaresReconstruction(data))``, which refits the surviving weights to the dense layer
outputs (:mod:`bingo.reconstruct`); the experiment harness measures that as ``"<name>+ls"``.

Beyond the registry: :class:`TaylorAccumulator` (attach during training), :func:`imp` /
:class:`IMPResult` / :class:`IMPRound` (per-round masks, accuracies, timings and states).
Shared helpers (row norms, layer normalisation, checking reference states) live in
``bingo/baselines/_common.py``.

Register a new baseline by adding it to :data:`BASELINES`; every entry accepts
``(model, granularity="weight", include=None, exclude=None, **options)``.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import Tensor, nn

from bingo.errors import InvalidOptionError, require_option

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

Scores = dict[str, Tensor]

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


__all__ = ["BASELINES", "IMPResult", "IMPRound", "Scores", "TaylorAccumulator", "baseline_scores",
           "imp", "imp_scores", "lamp", "magnitude", "magnitude_increase", "random_scores",
           "shapley", "taylor"]
