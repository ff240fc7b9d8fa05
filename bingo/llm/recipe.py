"""bingo's setting for pruning a causal LM's heads and MLP neurons after training: the targeted
elimination on calibration windows, sized to the model, then the least-squares refit of the
survivors. ``bingo llm prune`` runs it on a user's checkpoint and ``bingo llm bench`` measures it
against the field (docs/llm.md).

Why these values: on the 4-layer Llama of the bench (784 units) removing 8 units a step took
over 20 minutes on 2 CPU cores, and a full pass over every unit dominates the cost; the step size
therefore grows with the unit count (:func:`units_per_step`), and the elimination stops a margin
past the fraction asked for (:func:`elimination_limit`): the units it would rank after that are
never pruned.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from torch import Tensor, nn

UNITS_PER_STEP_DIVISOR = 50
"""Units removed per elimination step: the unit count over this (at least 4, the neuron
default), so that a search takes about the same number of steps on any model size."""
LIMIT_MARGIN = 0.15
"""The elimination removes up to the asked fraction of units plus this; past it the units keep
their last measured ranking."""
EVIDENCE_WINDOWS = 32
"""Calibration windows the elimination's damages are measured on."""
REFIT_CHUNK_TOKENS = 8192
"""Tokens per forward pass of the refit (memory, not results: its statistics add up over the
chunks). The refit's own default counts examples (1024), and a language model's example is a
whole window: on a 25M-parameter Llama with 281 windows of 128 tokens one chunk held every
window, and the refit's peak was 2.4 GB above the loaded model's 0.9 GB."""


def least_squares_refit(calibration: tuple[Tensor, Tensor], *, progress: bool = True):
    """The least-squares refit on ``calibration`` windows ``(inputs (N, T), targets)``, run
    :data:`REFIT_CHUNK_TOKENS` tokens at a time."""
    from bingo import LeastSquaresReconstruction

    tokens_per_window = calibration[0].shape[-1]
    return LeastSquaresReconstruction(
        calibration, chunk=max(1, REFIT_CHUNK_TOKENS // tokens_per_window), progress=progress)


def units_per_step(units: int) -> int:
    """Units an elimination step removes on a model with ``units`` scored units."""
    return max(4, math.ceil(units / UNITS_PER_STEP_DIVISOR))


def elimination_limit(fraction: float) -> float:
    """``max_fraction`` of the elimination for a target ``fraction`` of the units."""
    return min(0.98, fraction + LIMIT_MARGIN)


def targeted_llm_scores(model: nn.Module, calibration: tuple[Tensor, Tensor], *,
                        fraction: float, example_inputs: Any = None,
                        prior: Optional[Mapping[str, Tensor]] = None, progress: bool = True,
                        evidence: int = EVIDENCE_WINDOWS, seed: int = 0):
    """Targeted elimination scores (higher = keep) of ``model``'s heads and MLP neurons on
    ``calibration`` windows ``(inputs (N, T) token ids, targets (N, T) next tokens)``, removing up
    to ``fraction`` of the units plus :data:`LIMIT_MARGIN` (``fraction`` is the share of block
    parameters to remove; the share of units it takes depends on which units go, and the margin
    covers the difference). ``prior`` (scores from a
    training-time :class:`bingo.TicketSearch`) restricts the measured candidates to the units
    it ranks lowest (:attr:`bingo.targeted.EliminationConfig.prior_pool`). The loss is the damage
    measure and the accuracy never stops it: a language model's per-token accuracy says little
    about its perplexity."""
    from bingo.structure import discover
    from bingo.targeted import targeted_scores

    units = sum(g.num_units for g in discover(model, example_inputs).groups)
    return targeted_scores(model, "structured", data=calibration, evidence=evidence,
                           per_step=units_per_step(units),
                           max_fraction=elimination_limit(fraction), stop_drop=1.0,
                           example_inputs=example_inputs, progress=progress, prior=prior,
                           seed=seed)
