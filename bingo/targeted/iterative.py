"""Targeted search for weights: iterative pruning with a least-squares refit instead of retraining.

What it does. IMP's schedule (remove ``rate`` of the remaining weights per round, ranked by a
magnitude criterion of the *current* weights, lowest first), but where IMP rewinds and retrains
the survivors, each round here refits them in closed form to the dense layer outputs on
training data (:class:`bingo.LeastSquaresReconstruction`). A weight that the refit made
important (it compensates for removed neighbours) grows and survives the next round; one-shot
ranking never sees that. The ranking is the removal order (higher = removed later = keep): round
by round, and within a round by the criterion on the weights refitted after the round before.
Pruning to a sparsity that a round reached gives exactly that round's mask; :func:`bingo.prune`
with ``reconstruct=`` refits it again, so the result is that round's model.

What it estimates: the greedy (round-by-round) answer to "which weights can go if the rest are
optimally compensated on the training data", the question a reconstructed one-shot prune asks.

Cost: ``rounds = ceil(log(1 - max_sparsity) / log(1 - rate))`` refits (21 for 99% at the
default 20%), each one forward per layer over ``samples`` calibration images plus the
per-row solves of :mod:`bingo.reconstruct` (largest in the early, dense rounds), and one
criterion ranking; no training. Variance: deterministic given the calibration subset (``seed``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bingo.errors import InvalidOptionError, require_option
from bingo.pruning import prune
from bingo.reconstruct import LeastSquaresReconstruction

from .incremental import require_sequential

RANKINGS = ("lamp", "magnitude")
"""Per-round rankings of the refitted weights (names of :data:`bingo.baselines.BASELINES`)."""


@dataclass
class IterativeRefitConfig:
    """Hyper-parameters of :func:`iterative_refit`; the defaults are IMP's schedule."""

    rate: float = 0.2
    """Fraction of the remaining weights removed per round (IMP's 20%; not tuned)."""
    max_sparsity: float = 0.99
    """Stop after the round that reaches this fraction of all scored weights; the survivors rank
    above every removed weight, by the last round's criterion."""
    ranking: str = "lamp"
    """Criterion each round ranks the refitted units by, one of :data:`RANKINGS` (LAMP's layer
    normalisation keeps one layer from being emptied first). For neurons the harness uses
    "magnitude" (layer-normalised row norms): on LeNet-300-100 seed 0 it pruned 82% at the floor
    where "lamp" pruned 74% (one seed, validation floors)."""
    samples: int = 4096
    """Calibration examples of the refits (seeded subset of ``data``)."""
    damping: float = 0.01
    """Ridge term of the refits (see :class:`bingo.LeastSquaresReconstruction`)."""
    seed: int = 0
    """Seed of the calibration subset."""

    def validate(self) -> None:
        """Raise InvalidOptionError naming the first bad value."""
        if not 0.0 < self.rate < 1.0:
            raise InvalidOptionError(f"rate must lie in (0, 1), got {self.rate}")
        if not 0.0 < self.max_sparsity < 1.0:
            raise InvalidOptionError(f"max_sparsity must lie in (0, 1), got {self.max_sparsity}")
        require_option("ranking", self.ranking, RANKINGS)


@dataclass
class IterativeRefitResult:
    """What :func:`iterative_refit` returns."""

    scores: dict[str, Tensor]
    """Score key -> float32 scores shaped like the weight, higher = keep (= removed later)."""
    rounds: list[dict] = field(default_factory=list)
    """Per round: target sparsity, weights removed so far, seconds."""
    seconds: float = 0.0
    """Wall time of the whole search."""


def _rounds(rate: float, max_sparsity: float) -> list[float]:
    count = math.ceil(math.log(1.0 - max_sparsity) / math.log(1.0 - rate))
    return [min(1.0 - (1.0 - rate) ** r, max_sparsity) for r in range(1, count + 1)]


@torch.no_grad()
def iterative_refit(model: nn.Module, data, config: Optional[IterativeRefitConfig] = None, *,
                    include=None, exclude=None, progress: bool = True,
                    granularity: str = "weight") -> IterativeRefitResult:
    """Iterative pruning of ``model``'s weights (or neurons / channels: ``granularity``) with a
    least-squares refit per round.

    Args:
        model: the trained nn.Sequential (not modified); other models raise (the elimination,
            ``granularity="structured"``, ranks their unit groups).
        data: training data, (inputs, targets) or a TensorDataset (the refits' calibration data).
        config: :class:`IterativeRefitConfig` (defaults when None).
        include, exclude: layers, as for :func:`bingo.units.find_units`.
        progress: tqdm bar over rounds.

    Returns:
        :class:`IterativeRefitResult`; ``.scores`` goes to :func:`bingo.prune` (with
        ``reconstruct=``) like any baseline.
    """
    from bingo.baselines import baseline_scores  # bingo.baselines imports this package

    config = config or IterativeRefitConfig()
    config.validate()
    require_sequential(model, "iterative refit search")
    started = time.perf_counter()
    refit = LeastSquaresReconstruction(data, samples=config.samples, damping=config.damping,
                                       seed=config.seed)
    refit.prepare(model)
    current = model
    keep = None
    removed_at: dict[str, Tensor] = {}   # round each weight went in (inf: never)
    within: dict[str, Tensor] = {}       # its rank inside that round
    result = IterativeRefitResult(scores={})
    for r, sparsity in enumerate(tqdm(_rounds(config.rate, config.max_sparsity),
                                      desc="iterative refit", unit="round",
                                      disable=not progress)):
        scores = baseline_scores(config.ranking, current, granularity, include=include,
                                 exclude=exclude)
        if keep is None:
            removed_at = {k: torch.full(v.shape, math.inf, dtype=torch.float64)
                          for k, v in scores.items()}
            within = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in scores.items()}
        else:  # what is gone stays gone: it ranks below everything still there
            scores = {k: torch.where(keep[k], v.double(), float(v.min()) - 1.0)
                      for k, v in scores.items()}
        pruned = prune(current, scores, sparsity=sparsity, structured=False, progress=False,
                       allow_unsampled=True)
        order = _flat_order(scores)
        for k, mask in pruned.unit_masks.items():
            new = (~mask.cpu()) & torch.isinf(removed_at[k])
            removed_at[k][new] = r
            within[k][new] = order[k][new]
        keep = {k: m.cpu() for k, m in pruned.unit_masks.items()}
        # The next round ranks the refitted survivors: a plain copy of the dense model with
        # this round's mask written and refitted (no torch.nn.utils.prune wrappers).
        current = copy.deepcopy(model)
        params = dict(current.named_parameters())
        for name, mask in pruned.masks.items():
            params[name].mul_(mask.to(params[name].dtype))
        refit(current, pruned.masks)
        result.rounds.append(dict(sparsity=sparsity, removed=int(sum(
            (~m).sum() for m in keep.values())), seconds=time.perf_counter() - started))
    last = _flat_order(baseline_scores(config.ranking, current, granularity, include=include,
                                       exclude=exclude))
    result.scores = _scores(removed_at, within, last)
    result.seconds = time.perf_counter() - started
    return result


def _flat_order(scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each unit's position in one global ascending order of ``scores`` (ties by key, index)."""
    keys = list(scores)
    flat = torch.cat([scores[k].reshape(-1).double().cpu() for k in keys])
    position = torch.empty_like(flat)
    position[torch.argsort(flat, stable=True)] = torch.arange(flat.numel(), dtype=flat.dtype)
    parts = torch.split(position, [scores[k].numel() for k in keys])
    return {k: p.view(scores[k].shape) for k, p in zip(keys, parts)}


def _scores(removed_at: dict, within: dict, last: dict) -> dict[str, Tensor]:
    """Removal order as the score (float32 positions 0, 1, ..., like every baseline's format):
    by round, then by rank inside the round; survivors last, by the criterion on the final
    refitted weights."""
    total = sum(v.numel() for v in removed_at.values())
    rounds = 1 + max((float(v[torch.isfinite(v)].max()) for v in removed_at.values()
                      if torch.isfinite(v).any()), default=-1.0)
    key = {k: torch.where(torch.isfinite(v), v.nan_to_num(posinf=0.0) * total + within[k],
                          rounds * total + last[k]) for k, v in removed_at.items()}
    return {k: p.float() for k, p in _flat_order(key).items()}
